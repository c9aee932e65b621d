import dspy
import pytest

from helpers.program import metrics


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


def test_ranked_recall_credits_gold_pages_just_below_the_cut():
    ranked = {"claim": ["C | c"] * 5, "q0": ["A | a", "X | x", "Y | y", "Z | z", "B | b"],
              "q1": ["X | x"] * 7 + ["B | b", "W | w", "C | c"]}
    reward = metrics.ranked_recall(lambda query, k: ranked[query][:k], num_docs=4, depth=50, weight=0.5)
    example = dspy.Example(titles=["A", "B", "C"])
    # hop 0 searched the claim (the same in every rollout): its ranks earn nothing
    pred = dspy.Prediction(retrieved_docs=["A | a", "X | x"], queries=["claim", "q0", "q1"])
    # A found (1/3); B best ranked 4th-from-zero by q0: 0.5*4/5/3; C ranked 9 by q1: 0.5*4/10/3
    assert reward(example, pred) == pytest.approx(1 / 3 + 0.4 / 3 + 0.2 / 3)
    assert reward(dspy.Example(titles=["A"]), pred) == 1.0  # nothing missing: plain recall
    assert reward(example, dspy.Prediction(retrieved_docs=["A | a"])) == pytest.approx(1 / 3)  # no queries known
    shallow = metrics.ranked_recall(lambda query, k: ranked[query][:k], num_docs=4, depth=5)
    assert shallow(example, pred) == pytest.approx(1 / 3 + 0.4 / 3)  # C lies below the depth searched


def test_ranked_recall_on_the_mini_world_stays_below_the_next_found_page(mini_cache):
    from helpers.data import hover
    from helpers.search import retrieval

    search = retrieval.load_search(mini_cache)
    reward = metrics.ranked_recall(search)
    _, devset, _ = hover.seed_splits(mini_cache)
    bonuses = []
    for ex in devset[:40]:
        pred = dspy.Prediction(retrieved_docs=search(ex.claim, k=4), queries=[ex.claim, ex.claim])
        plain = metrics.recall(ex, pred)
        missing = sum(t not in {d.split(" | ")[0] for d in pred.retrieved_docs} for t in set(ex.titles))
        bonus = reward(ex, pred) - plain
        assert 0 <= bonus <= 0.4 * missing / len(ex.titles) + 1e-9, (ex.claim, bonus)
        bonuses.append(bonus)
    assert sum(b > 0 for b in bonuses) >= 10  # the claim ranks many missed gold pages within the top 50
    hop0_only = dspy.Prediction(retrieved_docs=search(devset[0].claim, k=4), queries=[devset[0].claim])
    assert reward(devset[0], hop0_only) == metrics.recall(devset[0], hop0_only)


def test_hidden_titles_are_gold_titles_the_claim_does_not_name():
    example = dspy.Example(claim="The author of Journey of penes was born where CRIMSON Kingdom Press sits.",
                           titles=["Stenfo Fasdrar", "Journey of Penes", "Crimson Kingdom Press", "Stenfo Fasdrar"])
    assert metrics.hidden_titles(example) == {"Stenfo Fasdrar"}  # case-insensitive; duplicates counted once
    assert metrics.hidden_titles(dspy.Example(claim="A met B.", titles=["A", "B"])) == set()
    assert metrics.hidden_titles(dspy.Example(claim="Port Zarso", titles=["University of Port Zarso"])) == {
        "University of Port Zarso"}  # the whole title must appear, not a part of it


def test_hidden_recall_counts_only_hidden_titles():
    example = dspy.Example(claim="Alpha met the mayor.", titles=["Alpha", "Beta", "Gamma"])
    pred = lambda docs: dspy.Prediction(retrieved_docs=docs)
    assert metrics.hidden_recall(example, pred(["Alpha | a", "Beta | b | c"])) == 0.5  # Alpha is named: not counted
    assert metrics.hidden_recall(example, pred(["Gamma | g", "Beta | b"])) == 1.0
    assert metrics.hidden_recall(example, pred(["Alpha | a", "Beta Gamma | x"])) == 0.0
    named = dspy.Example(claim="Alpha met Beta.", titles=["Alpha", "Beta"])
    assert metrics.hidden_recall(named, pred(["Alpha | a"])) is None


def test_every_mini_dev_claim_hides_a_gold_page(mini_cache):
    from helpers.data import hover

    _, devset, _ = hover.seed_splits(mini_cache)
    dev = devset[:300]
    hidden = [len(metrics.hidden_titles(ex)) for ex in dev]
    assert len(dev) == 300
    assert sum(n >= 1 for n in hidden) / len(dev) == 1.0  # every claim needs a hop the claim cannot search for
    assert (hidden.count(1), hidden.count(2)) == (251, 49)


def test_hidden_page_bonus_pays_a_page_the_claim_does_not_name_more():
    from helpers.rl.grpo_training import hidden_page_bonus
    from helpers.util.errors import TutorialError

    reward = hidden_page_bonus(metrics.recall, 1.0)
    example = dspy.Example(claim="Ann Zell was born in the city.", titles=["Ann Zell", "Bo Vik"])  # Bo Vik is hidden
    named = reward(example, dspy.Prediction(retrieved_docs=["Ann Zell | a"]))
    hidden = reward(example, dspy.Prediction(retrieved_docs=["Bo Vik | b"]))
    assert (named, hidden) == (pytest.approx(0.5), pytest.approx(1.5))
    assert hidden_page_bonus(metrics.recall, 0.0)(example, dspy.Prediction(retrieved_docs=["Bo Vik | b"])) == 0.5
    all_named = dspy.Example(claim="Ann Zell and Bo Vik met.", titles=["Ann Zell", "Bo Vik"])  # nothing hidden
    assert reward(all_named, dspy.Prediction(retrieved_docs=["Bo Vik | b"])) == pytest.approx(0.5)
    with pytest.raises(TutorialError, match="bonus=-1"):
        hidden_page_bonus(metrics.recall, -1)
