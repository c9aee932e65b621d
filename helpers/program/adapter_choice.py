"""Measuring which DSPy adapter the LM can follow (introduced in 04_research_hop).

A 135M model cannot follow every output format. We count, for each adapter and each of the two
ResearchHop signatures, how often the LM's reply parses. The winner is configured globally and
handed to GRPO too, because GRPO formats its training data with its own adapter argument.
``GuidedChatAdapter`` needs an LM that continues a prefilled assistant turn (the embedded engine).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import dspy
import pandas as pd

from helpers.profiles import Profile
from helpers.program.guided_adapter import GuidedChatAdapter
from helpers.program.research_hop import ResearchHop
from helpers.util import atomic
from helpers.util.errors import TutorialError

ADAPTERS = {
    # no silent retry in JSON: dspy's ChatAdapter and XMLAdapter (a ChatAdapter) fall back to JSONAdapter by default
    "ChatAdapter": lambda: dspy.ChatAdapter(use_json_adapter_fallback=False),
    "JSONAdapter": lambda: dspy.JSONAdapter(),
    "XMLAdapter": lambda: dspy.XMLAdapter(use_json_adapter_fallback=False),
    "GuidedChatAdapter": lambda: GuidedChatAdapter(),
}


def _calls(examples, search, num_docs=4):
    """The two predictors' inputs for each claim, as ResearchHop produces them at hops 0 and 1."""
    for ex in examples:
        results = search(ex.claim, k=num_docs)
        yield "append_notes", dict(claim=ex.claim, key_facts=[], new_search_results=results)
        yield "generate_query", dict(claim=ex.claim, key_facts=[results[0].split(" | ", 1)[1]])


def _parses(lm, adapter, predictor, module, kwargs) -> bool:
    try:
        with dspy.context(lm=lm, adapter=adapter):
            prediction = predictor(**kwargs)
    except Exception:  # noqa: BLE001 - any failure to produce the fields counts as a parse failure
        return False
    field = "followup_search_query" if module == "generate_query" else "new_key_facts"
    return bool(str(prediction.get(field, "")).strip())


def parse_rates(lm, examples, search, threads: int = 8, adapters=None) -> pd.DataFrame:
    """Parse successes per adapter (rows) and predictor (columns), over ``len(examples)`` claims each."""
    calls = list(_calls(examples, search))
    program = ResearchHop(num_docs=4, num_hops=2, search=search)
    table = {}
    for name in adapters or ADAPTERS:
        make = ADAPTERS[name]
        adapter = make()
        with ThreadPoolExecutor(threads) as pool:
            ok = list(pool.map(lambda c: _parses(lm, adapter, getattr(program, c[0]), *c), calls))
        row = {}
        for module in ("generate_query", "append_notes"):
            hits = [o for (m, _), o in zip(calls, ok) if m == module]
            row[module] = f"{sum(hits)}/{len(hits)}"
        row["total parsed"] = sum(ok) / len(ok)
        table[name] = row
    return pd.DataFrame(table).T


def best_adapter(rates: pd.DataFrame) -> str:
    """The name of the adapter with the highest parse rate (ties: the first row)."""
    return rates["total parsed"].astype(float).idxmax()


def save_choice(profile: Profile, name: str, rates: pd.DataFrame) -> None:
    """Record the chosen adapter and its measurements for 05 and 06 (``<cache>/results/adapter.json``)."""
    atomic.write_text(_choice_path(profile), json.dumps({"adapter": name, "rates": rates.astype(str).to_dict()}, indent=1))


def chosen_adapter(profile: Profile) -> dspy.Adapter:
    """A fresh instance of the adapter 04 chose, else the profile's default (05, 06)."""
    path = _choice_path(profile)
    name = profile.adapter
    if path.exists():
        try:
            name = json.loads(path.read_text(encoding="utf-8"))["adapter"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
            raise TutorialError(f"{path} is damaged: delete the file and re-run 04_research_hop") from None
    if not isinstance(name, str) or name not in ADAPTERS:
        raise TutorialError(f"unknown adapter {name!r} in {path}: delete the file and re-run 04_research_hop")
    return ADAPTERS[name]()


def _choice_path(profile: Profile):
    return profile.cache_dir / "results" / "adapter.json"
