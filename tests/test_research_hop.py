"""ResearchHop with the real embedded model: the guided adapter, evaluation rows, the walkthrough."""

import concurrent.futures
import io
import json
import re

import dspy
import pytest

from helpers.data import hover
from helpers.engine import local_lm
from helpers.program import adapter_choice, evaluation, lm_setup
from helpers.program.guided_adapter import GuidedChatAdapter
from helpers.program.research_hop import ResearchHop, walkthrough
from helpers.search import retrieval
from helpers.util.errors import TutorialError



@pytest.fixture(scope="module")
def setup(mini_cache):
    lm = lm_setup.make_lm(mini_cache, temperature=0.0, cache=False)
    _, dev, _ = hover.seed_splits(mini_cache)
    return lm, retrieval.load_search(mini_cache), dev


@pytest.mark.model
def test_guided_adapter_writes_the_markers_and_parses(setup):
    lm, _, _ = setup
    with dspy.context(lm=lm, adapter=GuidedChatAdapter()):
        prediction = dspy.ChainOfThought("question -> answer")(question="What color is the sky on a clear day?")
    assert prediction.reasoning.strip() and "blue" in prediction.answer.lower()
    last = lm.history[-1]["messages"]
    assert last[-1]["role"] == "assistant" and last[-1]["content"].endswith("[[ ## answer ## ]]\n")


@pytest.mark.model
def test_guided_reply_is_a_complete_chat_adapter_reply(setup):
    """The joined reply ends with ChatAdapter's ``[[ ## completed ## ]]`` marker, as GRPO's training format does."""
    lm, _, _ = setup
    adapter = GuidedChatAdapter(max_tokens_per_field=8)
    signature = dspy.ChainOfThought("question -> answer").predict.signature
    messages = adapter.format(signature, [], {"question": "What color is grass?"})
    reply = adapter._reply(lm, messages, signature, {"temperature": 0.0, "stop": ["\n\n", "[["], "max_tokens": 8})
    assert reply.startswith("[[ ## reasoning ## ]]\n") and reply.endswith("\n\n[[ ## completed ## ]]\n")
    assert reply == adapter.format_assistant_message_content(signature, adapter.parse(signature, reply))


@pytest.mark.model
def test_max_tokens_of_a_dspy_call_reaches_the_engine(setup):
    lm, _, _ = setup
    engine = local_lm.live_engine(local_lm.MODEL_NAME)
    before = engine.stats.generated_tokens
    text = lm("Tell me a very long story about a river and its towns.", max_tokens=5)[0]
    assert text and 0 < engine.stats.generated_tokens - before <= 5


@pytest.mark.model
def test_run_eval_rows_match_the_claim_only_search_at_hop_0(setup):
    lm, search, dev = setup
    program = ResearchHop(num_docs=4, num_hops=2, search=search)
    with dspy.context(lm=lm, adapter=GuidedChatAdapter()):
        report = evaluation.run_eval(program, dev[:4], threads=4)
    top4 = evaluation.claim_only_report(dev[:4], search, k=4)
    rows = report.per_claim
    assert len(rows) == 4 and report.score == pytest.approx(100 * rows["recall"].mean(), abs=0.01)
    ok = rows["failed_module"].isna()
    assert (rows.loc[ok, "found_hop0"] == top4.per_claim.loc[ok, "found_hop0"]).all()
    assert (rows["recall"] >= top4.per_claim["recall"] - 1e-9)[ok].all()  # hop 1 only adds pages


@pytest.mark.model
def test_parse_failures_score_zero_and_name_the_module(setup, capsys):
    lm, search, dev = setup
    program = ResearchHop(num_docs=4, num_hops=2, search=search)
    with dspy.context(lm=lm.copy(max_tokens=8), adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        report = evaluation.run_eval(program, dev[:3], threads=3, progress="dev claims scored")
    assert (report.per_claim["failed_module"] == "append_notes").all() and report.score == 0.0
    # failed claims count as finished too: the progress line reaches 3 of 3
    assert re.fullmatch(r"ResearchHop · dev claims scored: 1 2 3 · \d+\.\d s\n", capsys.readouterr().out)


def test_progress_prints_fixed_counts_whatever_order_threads_finish_in():
    stream = io.StringIO()
    shown = evaluation.Progress("scored", 25, stream=stream)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: shown.tick(), range(25)))
    shown.close(1.5)
    assert stream.getvalue() == "scored: 3 5 8 10 13 15 18 20 23 25 · 1.5 s\n"


@pytest.mark.model
def test_walkthrough_lists_both_hops(setup):
    lm, search, dev = setup
    program = ResearchHop(num_docs=4, num_hops=2, search=search)
    with dspy.context(lm=lm, adapter=GuidedChatAdapter()):
        steps = walkthrough(program, dev[0])
    names = [step for _, step in steps.index]
    assert names == ["search(query, k=4)", "append_notes: reasoning", "append_notes: new_key_facts",
                     "generate_query: reasoning", "generate_query: followup_search_query", "search(query, k=4)"]
    assert steps.loc[(0, "search(query, k=4)"), "text"].count(",") == 3


def test_adapter_choice_is_saved_and_bad_names_fail_in_one_line(mini_profile):
    rates = adapter_choice.pd.DataFrame({"total parsed": [0.1, 0.9]}, index=["XMLAdapter", "JSONAdapter"])
    adapter_choice.save_choice(mini_profile, adapter_choice.best_adapter(rates), rates)
    assert isinstance(adapter_choice.chosen_adapter(mini_profile), dspy.JSONAdapter)
    adapter_choice.save_choice(mini_profile, "NoSuchAdapter", rates)
    with pytest.raises(TutorialError, match="re-run 04_research_hop") as err:
        adapter_choice.chosen_adapter(mini_profile)
    assert "\n" not in str(err.value)
    adapter_choice._choice_path(mini_profile).unlink()
    assert isinstance(adapter_choice.chosen_adapter(mini_profile), GuidedChatAdapter)  # the profile's default


@pytest.mark.model
def test_reports_round_trip_through_the_cache(setup, mini_profile):
    _, search, dev = setup
    report = evaluation.claim_only_report(dev[:5], search, k=8)
    evaluation.save_report(mini_profile, "unit", report)
    again = evaluation.load_report(mini_profile, "unit")
    assert again.score == report.score and again.per_claim.equals(report.per_claim)
    assert evaluation.load_report(mini_profile, "missing") is None


@pytest.mark.model
@pytest.mark.parametrize("name", ["ChatAdapter", "XMLAdapter"])
def test_a_parse_rate_measures_its_own_format_without_a_silent_json_retry(setup, name):
    """dspy's ChatAdapter and XMLAdapter retry a failed parse with JSONAdapter by default: a rate would count the
    retry's successes as theirs (and cost a second call). Each call of a claim must reach the LM once, in its format."""
    lm, search, dev = setup
    short = lm.copy(max_tokens=8)  # 8 tokens cannot hold the fields: every parse fails
    rates = adapter_choice.parse_rates(short, dev[:1], search, threads=1, adapters=[name])
    assert rates.loc[name, "total parsed"] == 0.0
    assert len(short.history) == 2  # append_notes and generate_query, one LM call each
    assert not any("JSON" in m["content"] for call in short.history for m in call["messages"])


@pytest.mark.parametrize("text", ["{", "[]", "null", '{"rates": {}}', '{"adapter": 5}', '{"adapter": ["x"]}', "\x00\xff",
                                  '{"adapter": null}', '"GuidedChatAdapter"'])
def test_a_damaged_adapter_choice_is_one_line(mini_profile, text):
    path = adapter_choice._choice_path(mini_profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="latin-1")
    try:
        with pytest.raises(TutorialError, match="re-run 04_research_hop") as err:
            adapter_choice.chosen_adapter(mini_profile)
        assert "\n" not in str(err.value)
    finally:
        path.unlink()


def _report(claims, score=50.0):
    rows = [{"claim": c, "recall": score / 100, "found_hop0": 1, "found_later": 0, "hidden": None, "failed_module": None}
            for c in claims]
    return evaluation.EvalReport("saved", score, evaluation.pd.DataFrame(rows), 1.0)


@pytest.mark.parametrize("text", ["{", "[]", "null", '{"system": "x"}', '{"per_claim": 3, "score": 1, "system": "x", "seconds": 1}'])
def test_a_damaged_saved_report_is_scored_again_not_a_traceback(mini_profile, capsys, monkeypatch, text):
    claims = [dspy.Example(claim=f"claim {i}", titles=["A"]).with_inputs("claim") for i in range(3)]
    evaluation.results_path(mini_profile, "unit_damaged").parent.mkdir(parents=True, exist_ok=True)
    evaluation.results_path(mini_profile, "unit_damaged").write_text(text)
    ran = []
    monkeypatch.setattr(evaluation, "run_eval", lambda program, examples, **kw: ran.append(1) or _report([e.claim for e in examples]))
    report = evaluation.load_or_run(mini_profile, "unit_damaged", None, claims, 1, "x")
    assert ran == [1] and list(report.per_claim["claim"]) == [e.claim for e in claims]
    assert "is damaged" in capsys.readouterr().out
    assert evaluation.load_report(mini_profile, "unit_damaged").score == 50.0  # written again, whole


def test_a_saved_report_from_another_adapter_or_lm_is_not_reused(mini_profile, monkeypatch):
    claims = [dspy.Example(claim=f"claim {i}", titles=["A"]).with_inputs("claim") for i in range(3)]
    ran = []
    monkeypatch.setattr(evaluation, "run_eval", lambda program, examples, **kw: ran.append(1) or _report([e.claim for e in examples]))
    with dspy.context(adapter=dspy.ChatAdapter(), lm=dspy.LM("openai/one")):
        evaluation.load_or_run(mini_profile, "unit_other", None, claims, 1, "x")
        evaluation.load_or_run(mini_profile, "unit_other", None, claims, 1, "x")
    assert ran == [1]  # the same settings: reused
    with dspy.context(adapter=dspy.JSONAdapter(), lm=dspy.LM("openai/one")):
        evaluation.load_or_run(mini_profile, "unit_other", None, claims, 1, "x")
    with dspy.context(adapter=dspy.JSONAdapter(), lm=dspy.LM("openai/two")):
        evaluation.load_or_run(mini_profile, "unit_other", None, claims, 1, "x")
    assert ran == [1, 1, 1]


def test_another_lms_report_goes_beside_the_saved_one(mini_profile, monkeypatch):
    """06 through the Arbor server scores 05's baseline with another LM name: 05's report must stay for the next
    in-kernel run, and each LM's report is reused on its own next run."""
    claims = [dspy.Example(claim=f"claim {i}", titles=["A"]).with_inputs("claim") for i in range(3)]
    ran = []
    monkeypatch.setattr(evaluation, "run_eval", lambda program, examples, **kw: ran.append(1) or _report([e.claim for e in examples]))
    for lm in ("local/model", "openai/arbor:model", "local/model", "openai/arbor:model"):
        with dspy.context(adapter=dspy.ChatAdapter(), lm=dspy.LM(lm)):
            evaluation.load_or_run(mini_profile, "unit_beside", None, claims, 1, "x")
    assert ran == [1, 1]
    saved = json.loads(evaluation.results_path(mini_profile, "unit_beside").read_text())
    assert saved["evaluated_with"]["lm"] == "local/model"


def test_an_evaluation_with_no_threads_is_one_line():
    with pytest.raises(TutorialError, match="threads") as err:
        evaluation.run_eval(None, [], threads=-1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sizes", [dict(num_docs=4, num_hops=1.5), dict(num_docs=0, num_hops=2),
                                   dict(num_docs="4", num_hops=2), dict(num_docs=4, num_hops=True)])
def test_sizes_that_are_not_whole_numbers_are_refused_in_one_line(sizes):
    with pytest.raises(TutorialError) as err:
        ResearchHop(search=lambda q, k: [], **sizes)
    bad = next(k for k, v in sizes.items() if not (type(v) is int and v >= 1))
    assert bad in str(err.value) and "whole number" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("claim", ["", "   \n", None])
def test_an_empty_claim_is_refused_before_any_search(claim):
    searched = []
    program = ResearchHop(4, 2, search=lambda q, k: searched.append(q) or [])
    with pytest.raises(TutorialError, match="claim"):
        program(claim=claim)
    assert searched == []
