"""The recall metric of the seeds and the claim-only BM25 baseline (03_hover_loading, 05_baseline_eval)."""

import dspy


def recall(example, pred, trace=None):
    """Share of the gold titles that appear among the retrieved documents, exactly as in the seeds."""
    gold_titles = example.titles
    retrieved_titles = [doc.split(" | ")[0] for doc in pred.retrieved_docs]
    return sum(x in retrieved_titles for x in set(gold_titles)) / len(gold_titles)


def claim_only_recall(examples, search, k: int = 8) -> float:
    """Mean recall when the claim itself is the only query, with no LM: the floor a second hop must beat."""
    scores = [recall(ex, dspy.Prediction(retrieved_docs=search(ex.claim, k))) for ex in examples]
    return sum(scores) / len(scores)
