"""The seeds' ``recall`` and 06's training reward ``ranked_recall`` (both written in 05_baseline_eval, ``#@save``),
the claim-only BM25 baseline (03, 05) and hidden-page recall, the multi-hop skill (05, 06).

``ranked_recall``: a gold page the program missed but one of the LM's queries (hops after 0) ranked at position r
(0-based, r < depth) adds ``weight * num_docs / (r + 1) / len(gold)``: always less than finding it, more the nearer
the cut. Hop 0 searches the claim itself, the same in every rollout, so only the LM's queries earn credit.
Evaluation keeps the seeds' ``recall``; this gives rollouts of the same claim different rewards when none of them
finds a new page, so GRPO still learns which query came closer.
"""

import dspy


def recall(example, pred, trace=None):  #@save
    gold_titles = example.titles
    retrieved_titles = [doc.split(" | ")[0] for doc in pred.retrieved_docs]
    return sum(x in retrieved_titles for x in set(gold_titles)) / len(gold_titles)


def claim_only_recall(examples, search, k: int = 8) -> float:
    """Mean recall when the claim itself is the only query, with no LM: the floor a second hop must beat."""
    scores = [recall(ex, dspy.Prediction(retrieved_docs=search(ex.claim, k))) for ex in examples]
    return sum(scores) / len(scores)


def ranked_recall(search, num_docs=4, depth=50, weight=0.5):  #@save
    """``recall`` plus partial credit for each missed gold page that one of the LM's queries ranked below the cut."""
    def reward(example, pred, trace=None):
        missing = set(example.titles) - {doc.split(" | ")[0] for doc in pred.retrieved_docs}
        best = {}  # missed gold title -> its best rank under the LM's queries (hop 0 searched the claim itself)
        for query in (getattr(pred, "queries", None) or [])[1:]:
            for rank, doc in enumerate(search(query, k=depth)):
                title = doc.split(" | ")[0]
                if title in missing and rank < best.get(title, depth):
                    best[title] = rank
        credit = sum(weight * num_docs / (rank + 1) for rank in best.values())
        return recall(example, pred) + credit / len(example.titles)
    return reward


def hidden_titles(example) -> set[str]:
    """Gold titles the claim does not name (case-insensitive substring test): the pages only a later hop can find."""
    claim = example.claim.lower()
    return {title for title in set(example.titles) if title.lower() not in claim}


def hidden_recall(example, pred, trace=None) -> float | None:
    """Share of ``hidden_titles`` among the retrieved documents: the multi-hop skill; None if none are hidden."""
    hidden = hidden_titles(example)
    if not hidden:
        return None
    retrieved = {doc.split(" | ")[0] for doc in pred.retrieved_docs}
    return len(hidden & retrieved) / len(hidden)
