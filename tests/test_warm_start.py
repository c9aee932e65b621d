"""The warm-start stage (behaviour cloning of a scripted teacher, not RL): teacher, SFT rows, LoRA SFT on the real model."""

import dspy
import pytest
import torch

from helpers.backend import lora_policy
from helpers.data import hover
from helpers.engine import decoding, local_lm
from helpers.program import lm_setup, metrics
from helpers.program.guided_adapter import GuidedChatAdapter
from helpers.program.research_hop import ResearchHop
from helpers.rl import warm_start
from helpers.search import retrieval
from helpers.util.errors import TutorialError


CLAIM = "The Forest of Velvet Shadows's director was born in the same town that is home to Endless Ember Pictures."
DOCS = [
    "The Forest of Velvet Shadows | The Forest of Velvet Shadows is a 2014 thriller film directed by Zonnes Breskis. "
    "It was produced by Posbram Pictures. The film tells the story of a winter near Lunra.",
    "Velvet Ember Pictures | Velvet Ember Pictures is a film studio founded in 1980. It is headquartered in Lenga. "
    "Velvet Ember Pictures was founded by Degre Drakis.",
]


@pytest.fixture(scope="module")
def setup(mini_cache):
    lm = lm_setup.make_lm(mini_cache, temperature=0.0, cache=False)
    train, dev, _ = hover.seed_splits(mini_cache)
    return lm, lm_setup.embedded_engine(mini_cache), retrieval.load_search(mini_cache), train, dev


def test_teacher_copies_the_maker_from_the_page_the_claim_names():
    notes = warm_start.teach_notes(CLAIM, [], DOCS)
    assert notes["new_key_facts"] == "Names in The Forest of Velvet Shadows: Zonnes Breskis; Posbram Pictures."
    query = warm_start.teach_query(CLAIM, [notes["new_key_facts"]])
    assert query["followup_search_query"] == "Zonnes Breskis Posbram Pictures"
    # a page the claim names but nobody retrieved: the teacher notes it and searches for it
    missing = warm_start.teach_notes("The Silver City was made by a painter who studied at University of Port Zarso.", [],
                                     ["Londta Moltem | Londta Moltem (born 1916) is a painter. Moltem studied at University of Port Zarso."])
    assert missing["new_key_facts"] == "The results do not include The Silver City."
    assert warm_start.teach_query("The Silver City was made by ...", [missing["new_key_facts"]])["followup_search_query"] == "The Silver City"


@pytest.mark.model
def test_teacher_finds_hidden_pages_with_bm25_alone(setup):
    _, _, search, _, dev = setup
    checked = 0
    for ex in dev:
        docs = search(ex.claim, 4)
        named = [d for d in docs if d.split(" | ")[0].lower() in ex.claim.lower()]
        hidden = [t for t in metrics.hidden_titles(ex) if any(f"by {t}." in d for d in named)]
        if not hidden:
            continue
        notes = warm_start.teach_notes(ex.claim, [], docs)["new_key_facts"]
        query = warm_start.teach_query(ex.claim, [notes])["followup_search_query"]
        assert hidden[0] in notes and hidden[0] in query
        assert hidden[0] in {d.split(" | ")[0] for d in search(query, 4)}
        checked += 1
        if checked == 3:
            break
    assert checked == 3
    teacher = warm_start.teacher_recall(dev[:40], search)
    assert teacher["recall %"] > 100 * metrics.claim_only_recall(dev[:40], search, 8) + 10
    assert teacher["hidden-page recall %"] > 20


def test_teacher_recall_never_looks_at_the_gold_pages(mini_cache):
    """The teacher's pages depend on the claim alone: scored against another claim's gold pages, its recall is what
    its title-blind run gives against those pages (a teacher steered by gold titles would score higher)."""
    search = retrieval.load_search(mini_cache)
    _, dev, _ = hover.seed_splits(mini_cache)
    examples = dev[:12]
    swapped = [dspy.Example(claim=ex.claim, titles=other.titles).with_inputs("claim")
               for ex, other in zip(examples, examples[1:] + examples[:1])]
    expected = []
    for ex in swapped:
        docs = [d for name, _, out in warm_start.teacher_run(ex.claim, search) if name == "search" for d in out["docs"]]
        expected.append(metrics.recall(ex, dspy.Prediction(retrieved_docs=docs)))
    assert warm_start.teacher_recall(swapped, search)["recall %"] == pytest.approx(100 * sum(expected) / len(expected))
    assert warm_start.teacher_recall(swapped, search)["recall %"] < warm_start.teacher_recall(examples, search)["recall %"]


@pytest.mark.model
def test_sft_rows_are_the_prompts_the_engine_is_fed(setup, monkeypatch):
    """Run ResearchHop through dspy, the adapter and the engine with the teacher's values as the LM's output:
    the token ids the decoder receives for each field call are the rows' prompt ids, in order."""
    lm, engine, search, train, _ = setup
    program = ResearchHop(4, 2, search)
    example = train[0]
    rows = warm_start.teacher_traces(program, [example], search)
    assert [(r.predictor, r.field) for r in rows] == [("append_notes", "reasoning"), ("append_notes", "new_key_facts"),
                                                      ("generate_query", "reasoning"), ("generate_query", "followup_search_query")]
    stop = engine.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert all(r.completion_ids[-len(stop):] == stop for r in rows)
    fed, replies = [], iter(rows)

    class TeacherBatch:
        """Stands in for the engine's running batch: records each prompt's ids, answers with the teacher's row."""

        steps = row_steps = 0

        def __init__(self, model, tokenizer, *args, **kwargs):
            self.tokenizer, self.rows = tokenizer, []

        def __len__(self):
            return len(self.rows)

        def add(self, ids, max_tokens, stops=(), nonblank=False, owner=None):
            fed.append(list(ids))
            reply = next(replies).completion_ids
            row = decoding.Row(list(ids), max_tokens, stops, nonblank, owner=owner)
            row.result = decoding.Sampled(list(ids), reply, [0.0] * len(reply), 0.0,
                                          self.tokenizer.decode(reply[:-len(stop)]), "stop")
            self.rows.append(row)
            return row

        def step(self):
            done, self.rows = self.rows, []
            return done

    monkeypatch.setattr(decoding, "RunningBatch", TeacherBatch)
    with dspy.context(lm=lm, adapter=GuidedChatAdapter()):
        pred = program(claim=example.claim)
    assert fed == [r.prompt_ids for r in rows]
    teacher = warm_start.teacher_run(example.claim, search)
    assert pred.queries[1] == teacher[2][2]["followup_search_query"]  # the program searched the teacher's query


@pytest.mark.model
def test_shared_prefix_logprobs_equal_the_per_row_ones(setup):
    _, engine, search, train, _ = setup
    rows = warm_start.teacher_traces(ResearchHop(4, 2, search), train[1:2], search)
    groups = [g for g in warm_start.calls(rows) if g[0].predictor == "generate_query"]
    with torch.no_grad():
        shared, m1 = warm_start.shared_prefix_logprobs(engine.model, engine.tokenizer,
                                                       [[(r.prompt_ids, r.completion_ids) for r in g] for g in groups])
        single, m2 = lora_policy._completion_logprobs(engine.model, engine.tokenizer,
                                                       [(r.prompt_ids, r.completion_ids) for g in groups for r in g], 1.0)
    assert torch.equal(m1, m2)
    assert torch.allclose(shared, single, atol=1e-4)


@pytest.mark.model
def test_one_sft_step_lowers_the_nll_and_clears_the_prefix_cache(setup):
    lm, engine, search, train, _ = setup
    rows = [r for r in warm_start.teacher_traces(ResearchHop(4, 2, search), train[2:3], search)
            if r.predictor == "generate_query"]
    try:
        before = warm_start.nll(engine, rows)
        engine.generate([[{"role": "user", "content": "Hi"}]], local_lm.Sampling(0.0, 1.0, 0, 2))
        assert engine.prefix_cache.stats.entries > 0
        log = warm_start.sft(engine, rows, steps=1, lr=1e-3, batch=1)
        assert log.steps == 1 and len(log.losses) == 1
        assert engine.prefix_cache.stats.entries == 0
        assert warm_start.nll(engine, rows) < before
        assert warm_start.ADAPTER_NAME in engine.peft_model.peft_config
    finally:
        lora_policy.remove_lora(engine)


@pytest.mark.model
def test_a_saved_warm_start_is_merged_once_and_keeps_what_it_learned(setup, tmp_path):
    lm, engine, search, train, _ = setup
    rows = [r for r in warm_start.teacher_traces(ResearchHop(4, 2, search), train[2:3], search)
            if r.predictor == "generate_query"]
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    untrained = warm_start.nll(engine, rows)
    try:
        warm_start.sft(engine, rows, steps=2, lr=5e-3, batch=1)
        learned = warm_start.nll(engine, rows)
        assert learned < untrained - 0.05
        warm_start.save_adapter(engine, tmp_path / "warm", label="test warm start")
        held = []  # was the engine's lock held when the merge declared the weights changed? (no call in between)
        declare = engine.weights_changed
        engine.weights_changed = lambda: (held.append(engine.lock._is_owned()), declare())
        try:
            warm_start.merge_into_base(engine, "test warm start")
        finally:
            del engine.weights_changed
        assert held == [True]
        assert engine.peft_model is None and engine.merged == "test warm start"
        assert warm_start.nll(engine, rows) == pytest.approx(learned, abs=1e-3)
        warm_start.apply_saved(engine, tmp_path / "warm")  # already carried: nothing happens
        assert warm_start.nll(engine, rows) == pytest.approx(learned, abs=1e-3)
        engine.model.load_state_dict(original)  # as in a fresh kernel: the original weights
        engine.merged = None
        engine.weights_changed()
        assert warm_start.nll(engine, rows) == pytest.approx(untrained, abs=1e-4)
        warm_start.apply_saved(engine, tmp_path / "warm")
        assert engine.merged == "test warm start" and engine.peft_model is None
        assert warm_start.nll(engine, rows) == pytest.approx(learned, abs=1e-3)
        engine.merged = "another warm start"
        with pytest.raises(TutorialError, match="restart the kernel"):
            warm_start.apply_saved(engine, tmp_path / "warm")
    finally:
        lora_policy.remove_lora(engine)
        engine.model.load_state_dict(original)
        engine.merged = None
        engine.weights_changed()
    assert warm_start.nll(engine, rows) == pytest.approx(untrained, abs=1e-4)


def _slow_clock(monkeypatch, seconds_per_reading: float):
    """Every reading of time.perf_counter is ``seconds_per_reading`` later: a machine that is very slow, or busy."""
    now = [0.0]

    def reading():
        now[0] += seconds_per_reading
        return now[0]

    monkeypatch.setattr(warm_start.time, "perf_counter", reading)


@pytest.mark.model
def test_the_warm_start_trains_every_step_however_slow_the_machine(setup, monkeypatch):
    """What is learnt must not depend on how fast the machine is: no wall-clock cap unless one is asked for."""
    lm, engine, search, train, _ = setup
    merged = []
    monkeypatch.setattr(warm_start, "merge_into_base", lambda engine, label: merged.append(label))
    _slow_clock(monkeypatch, 11 * 60)  # eleven minutes pass between any two readings of the clock
    try:
        log = warm_start.run(ResearchHop(4, 2, search), train[2:3], search, GuidedChatAdapter(),
                             warm_start.Settings(train_claims=1, steps=3, batch=1))
        assert log.steps == 3 and len(log.losses) == 3 and not log.stopped_early
        assert len(merged) == 1
    finally:
        lora_policy.remove_lora(engine)


@pytest.mark.model
def test_a_time_cap_that_is_hit_says_so(setup, monkeypatch, capsys):
    lm, engine, search, train, _ = setup
    rows = [r for r in warm_start.teacher_traces(ResearchHop(4, 2, search), train[2:3], search)
            if r.predictor == "generate_query"]
    _slow_clock(monkeypatch, 60)
    try:
        log = warm_start.sft(engine, rows, steps=5, lr=1e-3, batch=1, max_seconds=90)
        assert log.stopped_early and log.steps < 5
        said = capsys.readouterr().out
        assert f"stopped after {log.steps} of 5 steps" in said and "time cap" in said
    finally:
        lora_policy.remove_lora(engine)
