"""Evaluating ResearchHop on dev claims, per claim and per hop (05_baseline_eval, 06).

``evaluator`` is 05's ``dspy.Evaluate(...)`` call (``#@save``): the seed's, with ``max_errors`` above the number
of claims, so a small model's parse failures score 0 instead of aborting. ``report`` runs it and keeps one row per
claim: recall, gold pages found at hop 0 and at later hops, and which module failed to parse, if any.
"""

import hashlib
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass

import dspy
import pandas as pd
from dspy.utils.exceptions import AdapterParseError

from helpers.profiles import Profile
from helpers.program.metrics import hidden_recall, recall
from helpers.util import atomic, stats
from helpers.util.dspy_compat import loggers_quieted, stragglers_not_resubmitted
from helpers.util.errors import TutorialError


@dataclass
class EvalReport:
    name: str
    score: float  # mean recall in percent, failures counted as 0
    per_claim: pd.DataFrame
    seconds: float

    def summary(self) -> dict:
        rows = self.per_claim
        return {
            "system": self.name,
            "claims": len(rows),
            "recall %": round(self.score, 1),
            "gold found at hop 0": int(rows["found_hop0"].sum()),
            "gold found at hop 1": int(rows["found_later"].sum()),
            "hidden-page recall %": round(self.hidden_score, 1),
            "parse failures": int(rows["failed_module"].notna().sum()),
        }

    @property
    def hidden_score(self) -> float:
        """Recall (%) of the gold pages the claims do not name: the multi-hop skill (claims without one left out)."""
        if "hidden" not in self.per_claim:
            return float("nan")
        return 100 * float(self.per_claim["hidden"].dropna().mean())


class Progress:
    """One labelled line that grows as claims finish: ``label: 10 20 … 100 · 71.2 s``.

    It prints at fixed counts (every tenth of the claims), whatever order the threads finish in, so a stored
    notebook output stays comparable; it writes to the stream of the cell that started the evaluation.
    """

    def __init__(self, label: str, total: int, stream=None, parts: int = 10):
        self.total, self.done = total, 0
        self.marks = {math.ceil(total * k / parts) for k in range(1, parts + 1)}
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._write(f"{label}: ")

    def tick(self) -> None:
        with self._lock:
            self.done += 1
            if self.done in self.marks:
                self._write(f"{self.done} ")

    def close(self, seconds: float) -> None:
        self._write(f"· {seconds:.1f} s\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class _RecordFailures(dspy.Module):
    """Runs the program; remembers which predictor failed to parse for each claim, then re-raises."""

    def __init__(self, program, progress: Progress | None = None):
        self.program = program
        self.progress = progress
        self.failures = {}
        self._lock = threading.Lock()

    def forward(self, claim):
        try:
            return self.program(claim=claim)
        except AdapterParseError as exc:
            with self._lock:
                self.failures[claim] = _module_name(self.program, exc.signature)
            raise
        finally:
            if self.progress is not None:
                self.progress.tick()


def _module_name(program, signature):
    for name, predictor in program.named_predictors():
        if predictor.signature.equals(signature):
            return name.removesuffix(".predict")
    return "unknown"


def evaluator(devset, threads):  #@save
    return dspy.Evaluate(
        devset=devset, metric=recall,
        num_threads=threads,                          # seed: 16
        display_progress=False, display_table=False,  # seed: True, 5 (report() prints a progress line, keeps every row)
        max_errors=len(devset) + 1,                   # not in the seed: a reply that does not parse scores 0, never stops the run
        failure_score=0.0,
    )


def report(evaluate: dspy.Evaluate, program, name: str = "ResearchHop", num_docs: int = 4,
           progress: str | None = None) -> EvalReport:
    """Run ``evaluate`` (see ``evaluator``) on ``program``; an EvalReport with one row per claim (05, 06).

    ``progress``: a label such as ``"dev claims scored"``; then a line counts the finished claims (``Progress``).
    """
    examples = evaluate.devset
    if not isinstance(evaluate.num_threads, int) or evaluate.num_threads < 1:
        raise TutorialError(f"threads={evaluate.num_threads!r}: give a whole number of threads, 1 or more "
                            "(e.g. profile.eval_threads)")
    shown = Progress(f"{name} · {progress}", len(examples)) if progress else None
    wrapped = _RecordFailures(program, shown)
    start = time.perf_counter()
    # Evaluate logs every failed example; the per-claim table reports them instead
    with loggers_quieted(logging.CRITICAL, "dspy.evaluate.evaluate"), stragglers_not_resubmitted():
        result = evaluate(wrapped)
    seconds = time.perf_counter() - start
    if shown is not None:
        shown.close(seconds)
    rows = []
    for example, prediction, score in result.results:
        docs = prediction.get("retrieved_docs") or []
        gold = set(example.titles)
        hop0 = {d.split(" | ")[0] for d in docs[:num_docs]} & gold
        later = ({d.split(" | ")[0] for d in docs[num_docs:]} & gold) - hop0
        rows.append({"claim": example.claim, "recall": float(score), "found_hop0": len(hop0), "found_later": len(later),
                     "hidden": hidden_recall(example, dspy.Prediction(retrieved_docs=docs)),
                     "failed_module": wrapped.failures.get(example.claim)})
    return EvalReport(name, float(result.score), pd.DataFrame(rows), seconds)


def run_eval(program, examples, threads: int, name: str = "ResearchHop", num_docs: int = 4,
             progress: str | None = None) -> EvalReport:
    """``report(evaluator(examples, threads), program, ...)``: recall of ``program`` over ``examples`` (06, benchmarks)."""
    return report(evaluator(examples, threads), program, name=name, num_docs=num_docs, progress=progress)


def gain(before: EvalReport, after: EvalReport, seed: int = 0) -> tuple[float, float, float]:
    """Recall gain in points with its paired bootstrap 95 % CI: ``(gain, low, high)`` over the same claims."""
    b, a = before.per_claim.set_index("claim")["recall"], after.per_claim.set_index("claim")["recall"]
    if list(b.index) != list(a.index):  # pair by claim, never by position: the CI depends on the pairs
        if b.index.has_duplicates or a.index.has_duplicates or set(b.index) != set(a.index):
            raise TutorialError(f"{before.name!r} and {after.name!r} cover different claims: evaluate both on the same list")
        a = a.reindex(b.index)
    mean, low, high = stats.paired_bootstrap_ci(list(100 * b), list(100 * a), seed=seed)
    return mean, low, high


def claim_only_report(examples, search, k: int) -> EvalReport:
    """The no-LM baseline as an EvalReport: the claim is the only query, top ``k`` pages."""
    start = time.perf_counter()
    rows = []
    for ex in examples:
        docs = search(ex.claim, k)
        rows.append({"claim": ex.claim, "recall": recall(ex, dspy.Prediction(retrieved_docs=docs)),
                     "found_hop0": len({d.split(" | ")[0] for d in docs} & set(ex.titles)), "found_later": 0,
                     "hidden": hidden_recall(ex, dspy.Prediction(retrieved_docs=docs)), "failed_module": None})
    table = pd.DataFrame(rows)
    return EvalReport(f"claim only, BM25 top {k}", 100 * table["recall"].mean(), table, time.perf_counter() - start)


def summary_table(*reports: EvalReport) -> pd.DataFrame:
    """One row per system: the table 05 and 06 show."""
    return pd.DataFrame([r.summary() for r in reports]).set_index("system")


def comparison_table(pairs: dict) -> pd.DataFrame:
    """Recall before and after, per split: ``{"dev": (before, after), ...}`` -> one row per split (06)."""
    rows = {}
    for split, (before, after) in pairs.items():
        change, low, high = gain(before, after)
        rows[split] = {"claims": len(after.per_claim), "recall before %": round(before.score, 1),
                       "recall after %": round(after.score, 1), "change (points)": round(change, 1),
                       "95% CI": f"{low:+.1f} to {high:+.1f}",
                       "hidden-page recall before %": round(before.hidden_score, 1),
                       "hidden-page recall after %": round(after.hidden_score, 1),
                       "parse failures before": int(before.per_claim["failed_module"].notna().sum()),
                       "parse failures after": int(after.per_claim["failed_module"].notna().sum())}
    return pd.DataFrame(rows).T


def results_path(profile: Profile, name: str):
    return profile.cache_dir / "results" / f"{name}.json"


def evaluated_with() -> dict:
    """What a saved report's scores depend on besides the claims: the configured adapter and LM."""
    adapter, lm = dspy.settings.adapter, dspy.settings.lm
    return {"adapter": type(adapter).__name__ if adapter is not None else None, "lm": getattr(lm, "model", None)}


def save_report(profile: Profile, key: str, report: EvalReport, **extra) -> None:
    """Write a report to ``<cache>/results/<key>.json`` atomically (05 writes the baseline for 06), with the adapter
    and LM it was evaluated with (``evaluated_with``)."""
    payload = {**report.summary(), "score": report.score, "seconds": report.seconds, **extra,
               "evaluated_with": evaluated_with(), "per_claim": report.per_claim.to_dict(orient="records")}
    atomic.write_text(results_path(profile, key), json.dumps(payload, indent=1))


def load_report(profile: Profile, key: str) -> EvalReport | None:
    """The saved report, or None if 05 has not written it yet or the file is damaged (it says so: score again)."""
    return _load_saved(profile, key)[0]


def _load_saved(profile: Profile, key: str) -> tuple[EvalReport | None, dict]:
    path = results_path(profile, key)
    if not path.exists():
        return None, {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        table = pd.DataFrame(payload["per_claim"])
        report = EvalReport(str(payload["system"]), float(payload["score"]), table, float(payload["seconds"]))
        if not {"claim", "recall"} <= set(table.columns):
            raise KeyError("per_claim")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        print(f"{path} is damaged ({type(exc).__name__}): it will be scored again.")
        return None, {}
    return report, payload.get("evaluated_with") or {}


def load_or_run(profile: Profile, key: str, program, examples, threads: int, name: str,
                progress: str | None = None) -> EvalReport:
    """The report saved under ``key`` if it covers the same claims with the same adapter and LM, else run and save it
    (06 reuses 05's). ``key`` keeps the report of the settings that wrote it; another LM's or adapter's report goes
    beside it (``<key>-<digest of the settings>``), so 06 through an Arbor server leaves 05's in place."""
    settings = evaluated_with()
    beside = f"{key}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}"
    claims = [ex.claim for ex in examples]
    held = {}
    for candidate in (key, beside):
        saved, held[candidate] = _load_saved(profile, candidate)
        if saved is not None and list(saved.per_claim["claim"]) == claims and held[candidate] == settings:
            return saved
    report = run_eval(program, examples, threads=threads, name=name, progress=progress)
    save_report(profile, key if held[key] in ({}, settings) else beside, report)
    return report
