import dspy
import pytest

from helpers import metrics


def _recall(titles, docs):
    return metrics.recall(dspy.Example(titles=titles), dspy.Prediction(retrieved_docs=docs))


def test_recall_counts_gold_titles_found():
    docs = ["A | text", "B | more | with bars", "Z | other"]
    assert _recall(["A", "B", "C"], docs) == pytest.approx(2 / 3)
    assert _recall(["A"], docs) == 1.0
    assert _recall(["C"], []) == 0.0


def test_recall_matches_whole_titles_only():
    assert _recall(["Port Zarso"], ["University of Port Zarso | x", "Port Zarso Press | y"]) == 0.0
    assert _recall(["B | more"], ["B | more | with bars"]) == 0.0  # a title ends at the first " | "


def test_recall_keeps_the_seeds_denominator():
    # The seed divides by len(titles) but counts set(titles): duplicates lower the score.
    assert _recall(["A", "A"], ["A | x"]) == 0.5


def test_claim_only_recall():
    examples = [dspy.Example(claim="q1", titles=["A", "B"]), dspy.Example(claim="q2", titles=["C"])]
    search = lambda query, k: {"q1": ["A | x", "Q | y"], "q2": ["C | z"]}[query][:k]
    assert metrics.claim_only_recall(examples, search, k=8) == pytest.approx(0.75)
    assert metrics.claim_only_recall(examples, search, k=1) == pytest.approx(0.75)
