"""Running GRPO on ResearchHop and keeping its results (06_grpo_training).

06 writes the seed's ``GRPO(...)`` call out; what it needs around that call is here, one call each:
``HiddenPageLog`` (the reward, noting the multi-hop skill per step), ``backend_kwargs`` (where checkpoints go),
``one_line_per_step`` and ``job_of``; 06 keeps the last step's weights. ``train`` runs the same path from a preset
(dspy's ``GRPO``, or Arbor's ``ArborGRPO`` in the full profile) for the benchmarks and tests. ``save_trained`` /
``load_trained`` write and read back the program and its adapter.
"""

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from helpers.engine import local_lm
from helpers.profiles import Profile
from helpers.program import metrics
from helpers.rl.grpo_presets import GRPOPreset, train_kwargs_for
from helpers.util import arbor_files, atomic
from helpers.util.dspy_compat import loggers_quieted, rollout_bars_hidden, stragglers_not_resubmitted
from helpers.util.errors import TutorialError
from helpers.util.paths import display_path


def make_compiler(preset: GRPOPreset, metric, adapter, train_kwargs, lm=None, **overrides):
    """``GRPO(...)`` or ``ArborGRPO(...)`` with the preset's settings; ``overrides`` win (e.g. num_train_steps)."""
    kwargs = {**preset.compile_kwargs, **overrides}
    if preset.optimizer == "ArborGRPO" and lm is not None and str(lm.model).startswith("local/"):
        raise TutorialError(f"preset {preset.name!r} runs ArborGRPO, which needs an Arbor server; the embedded LM "
                            "trains with dspy's GRPO: use the 'mini' preset (or RLMH_PROFILE=full on GPUs)")
    if preset.optimizer == "ArborGRPO":
        ArborGRPO = arbor_files.grpo_class()  # Arbor's own optimizer, without Arbor's server stack
        return ArborGRPO(metric=metric, train_kwargs=train_kwargs, adapter=adapter, **kwargs)
    from dspy.teleprompt.grpo import GRPO

    return GRPO(metric=metric, adapter=adapter, train_kwargs=train_kwargs, **kwargs)


def training_reward(preset: GRPOPreset, search):
    """The metric GRPO rewards rollouts with: the seeds' ``recall``, or ``ranked_recall`` where the preset says so."""
    if preset.reward == "ranked_recall":
        return metrics.ranked_recall(search)
    if preset.reward != "recall":
        raise TutorialError(f"preset {preset.name!r} names an unknown reward {preset.reward!r}: use recall or ranked_recall")
    return metrics.recall


def hidden_page_bonus(metric, bonus: float):
    """``metric`` plus ``bonus`` x hidden-page recall: a gold page the claim does not name pays more than one it names.

    ``ranked_recall`` pays every gold page alike, and the pages a claim names are the easy ones to reach again; runs
    that gained that way lost the multi-hop skill (benchmarks/RESULTS.md, Learning). Claims with no hidden page get
    ``metric`` alone.
    """
    if not bonus >= 0:
        raise TutorialError(f"hidden_page_bonus: bonus={bonus!r} must be a number >= 0 (0 gives the metric unchanged)")

    def reward(example, pred, trace=None):
        hidden = metrics.hidden_recall(example, pred)
        return metric(example, pred, trace) + bonus * (hidden or 0.0)

    reward.__name__ = f"{getattr(metric, '__name__', 'metric')}+{bonus:g}*hidden"
    return reward


def checkpoint_dir(profile: Profile) -> Path:
    return profile.cache_dir / "checkpoints"


def backend_kwargs(preset: GRPOPreset, profile: Profile, program, log: "HiddenPageLog", on_step=None,
                   initial_score=None, progress: bool = True, **overrides) -> dict:
    """The ``train_kwargs`` for ``GRPO(...)``: the preset's, plus what the local backend needs (06, ``train``).

    ``log`` is the metric GRPO gets (``HiddenPageLog``). ``on_step(record)`` may return a score, and then the job
    loads the best-scoring checkpoint at the end instead of the last; ``initial_score`` is the starting model's score on
    the same scale, so the starting adapter can win too (``benchmarks/grpo_mini.py --select`` scores held-back train
    claims that way; 06 passes neither and keeps the last step). ``progress=True`` prints one line per step.
    """
    settings = {**preset.compile_kwargs, **overrides}
    log.steps = settings["num_train_steps"]
    extra = {"on_step": log.wrap(on_step, progress),
             "initial_score": initial_score if on_step else None,
             "predictors": len(program.predictors()),
             # one group per example and predictor
             "groups_per_step": settings["num_dspy_examples_per_grpo_step"] * len(program.predictors()),
             "seed": overrides.get("seed", 0)}  # GRPO's own seed only picks the claims; this one also picks the samples
    return train_kwargs_for(preset, checkpoint_dir(profile), **extra)


def fit_backend(compiler, train_kwargs: dict) -> dict:
    """Make the CPU backend follow the ``GRPO(...)`` call it serves: groups per step, step count, format reward.

    ``backend_kwargs`` starts from the preset; a call written with other values (06 invites that) would otherwise
    have the job promise dspy the preset's number of groups per step -- dspy then refills each step with repeated
    groups -- and the progress lines count the preset's steps. ``train_kwargs`` must be the dict the call was given.
    """
    train_kwargs["groups_per_step"] = compiler.num_dspy_examples_per_grpo_step * train_kwargs["predictors"]
    train_kwargs["format_failure_score"] = compiler.format_failure_score
    if isinstance(compiler.metric, HiddenPageLog):
        compiler.metric.steps = compiler.num_train_steps
    return train_kwargs


@contextlib.contextmanager
def one_line_per_step():
    """dspy's rollout bars and per-rollout warnings off while GRPO compiles: ``step_line`` says what they would."""
    with _quiet_grpo_logs(), stragglers_not_resubmitted(), rollout_bars_hidden():
        yield


def job_of(lm):
    """The job that trained ``lm`` last (its per-step log is the training curve), or None.

    In this kernel: the CPU backend's own job. Through an Arbor server (``RLMH_LM=arbor``): what the server reports of
    the job ``lm.model`` names (``arbor_job.read``).
    """
    jobs = getattr(lm.provider, "jobs", None)
    if jobs is not None:
        return jobs[-1] if jobs else None
    if type(lm.provider).__name__ == "ArborProvider":
        from helpers.rl import arbor_job

        return arbor_job.read(lm)
    return None


def trained_lm(train_lm, fresh_lm):
    """The LM that answers with the trained weights, greedy and uncached (06 scores and saves with it).

    In this kernel that is ``fresh_lm`` itself: GRPO's adapter is on the engine it shares. Through Arbor, the weights
    are on the server, under the job's name, which the client wrote into ``train_lm.model``.
    """
    if isinstance(fresh_lm, local_lm.EmbeddedLM):
        return fresh_lm
    return fresh_lm.copy(model=train_lm.model)


def train(program, trainset, lm, adapter, metric, preset: GRPOPreset, profile: Profile, on_step=None,
          initial_score=None, progress: bool = False, **overrides):
    """Compile ``program`` (its predictors use ``lm``) with the preset's GRPO; returns ``(trained_program, job)``.

    What 06 writes out cell by cell, for the benchmarks and tests: ``backend_kwargs``, ``make_compiler``, compile.
    """
    log = HiddenPageLog(metric)
    train_kwargs = backend_kwargs(preset, profile, program, log, on_step, initial_score, progress, **overrides)
    program.set_lm(lm)
    compiler = make_compiler(preset, log, adapter, train_kwargs, lm=lm, **overrides)
    fit_backend(compiler, train_kwargs)
    with one_line_per_step():
        trained = compiler.compile(student=program, trainset=trainset, valset=None)
    return trained, job_of(lm)


class HiddenPageLog:
    """The training metric, also noting per claim whether a rollout found a gold page the claim does not name.

    That is the multi-hop skill: if no rollout ever finds such a page, GRPO has nothing to amplify.
    ``wrap(on_step)`` writes the share of claims with such a find into each step's log.
    """

    def __init__(self, metric):
        self.metric, self.found = metric, {}
        self.steps = None  # GRPO's num_train_steps, for the progress lines (set by backend_kwargs, fit_backend)
        self.__name__ = getattr(metric, "__name__", "metric")

    def __call__(self, example, pred, trace=None):
        hidden = metrics.hidden_recall(example, pred)
        if hidden is not None:
            self.found[example.claim] = self.found.get(example.claim, False) or hidden > 0
        return self.metric(example, pred, trace)

    def wrap(self, on_step, progress: bool = False):
        def after_step(record):
            record.hidden_found = sum(self.found.values()) / len(self.found) if self.found else None
            self.found = {}
            score = on_step(record) if on_step is not None else None
            if progress:
                record.held_back_recall = score
                print(step_line(record, self.steps), flush=True)
            return score

        return after_step


def step_line(record, steps: int) -> str:
    """One GRPO step in words: where the time went and what the rollouts showed (06's progress)."""
    scored = "" if record.held_back_recall is None else f" · held-back recall {record.held_back_recall:.1f}%"
    found = "-" if record.hidden_found is None else f"{100 * record.hidden_found:.0f}%"
    return (f"step {record.step}/{steps}: rollouts {record.rollout_seconds:.0f} s, update {record.seconds:.0f} s · "
            f"mean reward {record.mean_reward:.2f} · groups with a reward spread {record.trained_groups}/{record.fresh_groups} · "
            f"claims where a rollout found an unnamed gold page {found} · trained tokens sampled "
            f"{100 * record.sampled_share:.0f}%{scored}")


def _quiet_grpo_logs():
    """GRPO warns once per unparsed rollout and per low-diversity group; the step log counts those instead."""
    return loggers_quieted(logging.ERROR, "dspy.teleprompt.grpo", "dspy.teleprompt.bootstrap_trace",
                           "dspy.teleprompt.bootstrap_finetune", "dspy.utils.parallelizer", "dspy.evaluate.evaluate",
                           root_filter=_drop_parse_failure_warnings)  # bootstrap_trace logs on the root logger


def _drop_parse_failure_warnings(record: logging.LogRecord) -> bool:
    return "Failed to parse output for example" not in record.getMessage()


def curve(job, initial_score=None) -> pd.DataFrame:
    """The job's per-step log as a table, from step 0 (the untrained adapter's score) to the last step."""
    if not job.history:  # Arbor's own server does not report its steps: the columns, with step 0 only
        from helpers.backend.grpo_backend import StepLog

        columns = [f.name for f in dataclasses.fields(StepLog) if f.name != "step"]
        return pd.DataFrame([{"held_back_recall": initial_score}], index=pd.Index([0], name="step"), columns=columns)
    table = pd.DataFrame([vars(s) for s in job.history]).set_index("step")
    start = pd.DataFrame([{"held_back_recall": initial_score}], index=pd.Index([0], name="step"))
    return pd.concat([start, table]) if initial_score is not None else table


def data_check(job) -> pd.DataFrame:
    """Per step, what the on-policy data path found (``grpo_data.DataCheck``): 06 shows it must read 100 %.

    Through the CPU Arbor server two more columns say how many completions arrived over HTTP in the step's round and
    how many of them matched none of the server's sampled rows (the round's repeats, and any completion it never
    sampled): those are not trained. A round without repeats may have been too small for the step (a line says so)."""
    rows = [{"groups": c.groups, "fresh groups": c.fresh_groups, "stale groups": c.stale_groups,
             "items matched %": round(100 * c.matched_share, 1), "trained tokens": c.trained_tokens,
             "of them sampled %": round(100 * c.sampled_share, 1)} for c in job.checks]
    for row, received, check in zip(rows, getattr(job, "received_items", []), job.checks):
        row["completions received"] = received
        row["not matched"] = received - check.matched_items
    short = [i + 1 for i, c in enumerate(job.checks) if hasattr(job, "received_items") and c.stale_groups == 0]
    if short:
        print(f"steps {short}: every group of the round was fresh, so some of the step's groups may not have fit in it "
              "and wait in dspy's queue: ask for fewer claims per step")
    if getattr(job, "steps_reported", True) is False:
        print(f"Arbor's server does not report what it trained (only the CPU Arbor server has /v1/cpu/steps): "
              f"job {job.job_id}, checkpoints {sorted(job.checkpoints)}")
    return pd.DataFrame(rows, index=pd.Index(range(1, len(rows) + 1), name="step"))


DISTRIBUTION_FILE = Path(__file__).with_name("grpo_distribution.json")


def recorded_distribution(path: Path = DISTRIBUTION_FILE) -> dict | None:
    """The latest ``benchmarks/grpo_mini.py --record`` run: GRPO's gain at the last step over several sampling seeds from
    06's warm start (per seed, pooled with a CI over seeds and claims). Read as data; None (with a line saying why) if
    missing or damaged."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        seeds = [(int(s["seed"]), float(s["final step"])) for s in record["seeds"]]
        pooled = {q: float(record["pooled"]["final step"][q]) for q in ("mean", "low", "high")}
        return {**record, "seeds": seeds, "pooled": pooled, "claims": int(record["claims"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{display_path(path)} is damaged ({type(exc).__name__}): no recorded distribution to compare with")
        return None


def distribution_lines(record: dict, this_run: float | None = None) -> list[str]:
    """How often GRPO helps, by how much (the benchmark's seeds), and where this run's gain falls among them."""
    pooled, seeds = record["pooled"], [gain for _, gain in record["seeds"]]
    lines = [f"Over {len(seeds)} sampling seeds from the same warm start ({record['claims']} dev claims, "
             f"benchmarks/grpo_mini.py, {record.get('commit', '?')}): GRPO's last step gained "
             + ", ".join(f"{g:+.1f}" for g in seeds) + f" points; pooled {pooled['mean']:+.1f} (95% CI over seeds "
             f"and claims {pooled['low']:+.1f} to {pooled['high']:+.1f}); above 0 in {sum(g > 0 for g in seeds)} of "
             f"{len(seeds)} seeds."]
    if this_run is not None:
        where = ("within" if min(seeds) <= this_run <= max(seeds) else "above" if this_run > max(seeds) else "below")
        lines.append(f"This run's {this_run:+.1f} is {where} that range of seeds.")
    if pooled["low"] > 0:
        lines.append("Across seeds GRPO helps on average: a single run may still show nothing.")
    else:
        lines.append("Across seeds the interval includes zero: as set up here, GRPO's gain is not yet reliable; "
                     "the warm start is what reliably helps.")
    return lines


def verdict(before, after, job, warm=None, distribution: dict | None = None) -> str:
    """What one run says, in words: the gain with its CI, which weights the program has, what to try next (06 ends with it).

    ``warm``: the warm start's report, when GRPO started from one; then the supervised stage and what GRPO itself
    added are separate lines, so RL is not credited with what behaviour cloning did. ``distribution``: the
    benchmark's record over several seeds (``recorded_distribution``), so one sampled run is read beside many.
    """
    from helpers.program import evaluation

    def change_line(what, a, b):
        change, low, high = evaluation.gain(a, b)
        return (f"{what}: dev recall {a.score:.1f}% -> {b.score:.1f}%, {change:+.1f} points (95% CI {low:+.1f} to "
                f"{high:+.1f}, {len(b.per_claim)} claims); hidden-page recall {a.hidden_score:.1f}% -> {b.hidden_score:.1f}%."), change, low, high

    lines = []
    if warm is not None:
        lines.append(change_line("Warm start (behaviour cloning, not RL)", before, warm)[0])
    start = warm if warm is not None else before
    line, change, low, high = change_line("GRPO on top of the warm start" if warm is not None else "GRPO", start, after)
    lines.append(line)
    if job.best_checkpoint == "step-0000":
        model = "the warm-started model" if warm is not None else "the original model"
        lines.append(f"No GRPO checkpoint beat step 0 on the held-back claims, so the program evaluated after GRPO is "
                     f"{model}: this run's updates did not help.")
    elif low > 0:
        lines.append("The interval is above zero: GRPO improved the program in this run.")
    elif high < 0:
        lines.append("The interval is below zero: GRPO made the program worse in this run.")
    else:
        lines.append("The interval includes zero: this run cannot tell GRPO's change from noise.")
    if job.best_checkpoint is None:
        lines.append("The program has the last step's weights: no checkpoint was chosen on held-back claims.")
    found = [s.hidden_found for s in job.history if s.hidden_found is not None]
    if found and max(found) == 0:
        lines.append("No rollout ever found a gold page the claim does not name, so the multi-hop skill itself was "
                     "not reinforced" + ("." if warm is not None else
                                         ": a warm start (a model that can write a query naming one) comes first."))
    elif found:
        lines.append(f"Rollouts found a page the claim does not name for up to {100 * max(found):.0f}% of a step's "
                     "claims: that is what the reward can reinforce; more steps and claims per step give it more chances.")
    if warm is not None:
        lines.append(change_line("Both stages", before, after)[0])
    if distribution is not None:
        lines += distribution_lines(distribution, change)
    return "\n".join(lines)


def save_trained(profile: Profile, program, job, name: str = "researchhop_grpo", warm_start=None) -> Path:
    """Save ``program.save(...)`` JSON and the adapter the job ended with (the last step's, or the best-scoring
    checkpoint's when checkpoints were scored) side by side in ``<cache>/trained/<name>``.

    ``warm_start``: the folder ``warm_start.run(save_to=...)`` wrote, when GRPO started from a warm start; it is
    copied beside the adapter, because the GRPO adapter only means something on top of those weights.
    A job trained through an Arbor server (``arbor_job.ArborJob``) keeps its weights there: the record names the
    model that serves them, and the adapter is copied too when the server's checkpoint folder is on this machine.
    """
    target = profile.cache_dir / "trained" / name
    best = job.best_checkpoint or job.last_checkpoint
    if best is None:
        raise TutorialError("the GRPO job saved no checkpoint: nothing to save")
    served = getattr(job, "current_model", None)  # set for a job on an Arbor server
    if best not in job.checkpoints:
        raise TutorialError(f"the GRPO job names checkpoint {best}, but lists only {sorted(job.checkpoints)}: run GRPO again")
    raw = job.checkpoints[best].get("path")
    source = Path(raw) if raw else None  # None: the server did not say where (its disk, not this machine's)
    if served is None and (source is None or not source.is_dir()):
        raise TutorialError(f"checkpoint {best} has no folder at {source}: run GRPO again to save it")
    with atomic.turn(_lock_file(target), f"save or load of {name}"), atomic.atomic_dir(target) as tmp:
        program.save(str(tmp / "program.json"))
        if source is not None and source.is_dir():
            shutil.copytree(source, tmp / "adapter")
        if warm_start is not None:
            shutil.copytree(warm_start, tmp / "warm_start")
        record = {"checkpoint": best, "job": job.job_id, "warm_start": warm_start is not None}
        (tmp / "trained.json").write_text(json.dumps({**record, "served_as": served} if served else record))
    return target


PREDICTOR_STATE = {"traces", "train", "demos", "signature", "lm"}  # what dspy's program.save writes per predictor


def saved_program_state(path: Path, fresh_program) -> dict:
    """``program.json`` read as data: each predictor's instructions, fields and demos, and never its LM.

    The saved LM state says where prompts go (``api_base``) and which class to import; applying it would let a file
    send every prompt elsewhere or import any installed module, so it is dropped: the caller names the LM. A file
    whose predictors or keys are not the ones ``program.save`` writes for ``fresh_program`` is refused in one line.
    """
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TutorialError(f"{path} is unreadable ({type(exc).__name__}): run 06_grpo_training again to save it") from None
    names = {name for name, _ in fresh_program.named_predictors()}
    if not isinstance(state, dict) or set(state) - {"metadata"} != names:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise TutorialError(f"{path} holds {found}, not this program's predictors {sorted(names)}: save it from the same "
                            "program (06_grpo_training)")
    for name in names:
        predictor = state[name]
        extra = set(predictor) - PREDICTOR_STATE if isinstance(predictor, dict) else None
        if extra or not isinstance(predictor, dict) or not isinstance(predictor.get("signature"), dict):
            raise TutorialError(f"{path}: predictor {name} has {sorted(extra) if extra else 'no signature'}, which "
                                "program.save does not write: run 06_grpo_training again to save it")
        predictor["lm"] = None
    return state


def load_trained(profile: Profile, fresh_program, lm, name: str = "researchhop_grpo", adapter_name: str = "reloaded"):
    """Load the saved adapter into the live engine (as ``adapter_name``) and the saved program into ``fresh_program``,
    whose predictors then use ``lm`` (the file's own LM settings are never applied: ``saved_program_state``).

    A program trained through an Arbor server loads with an ``lm`` served by that server under the job's name (the
    weights stay there; no adapter is loaded here).

    Everything is checked before any weight changes: the program file, the folder's record of how it was trained, the
    live engine. If the run started from a warm start, its adapter is merged into the engine's weights first (once:
    an engine that already carries it, as in the notebook that trained it, is left as it is).
    """
    folder = profile.cache_dir / "trained" / name
    with atomic.turn(_lock_file(folder), f"save or load of {name}"):  # no save swaps the folder while it is read
        return _load_trained(folder, fresh_program, lm, adapter_name)


def _lock_file(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


def _load_trained(folder: Path, fresh_program, lm, adapter_name: str):
    from helpers.backend import lora_policy
    from helpers.rl import warm_start

    atomic.recover(folder)  # a save killed between its two renames left the good copy aside
    if not (folder / "program.json").exists():
        raise TutorialError(f"no trained program in {folder}: run 06_grpo_training first")
    state = saved_program_state(folder / "program.json", fresh_program)
    try:
        record = json.loads((folder / "trained.json").read_text())
        warm = record["warm_start"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TutorialError(f"{folder / 'trained.json'} is missing or damaged ({type(exc).__name__}): run "
                            "06_grpo_training again to save the trained program") from None
    if warm is not True and warm is not False:
        raise TutorialError(f"{folder / 'trained.json'}: warm_start is {warm!r}, not true or false: run 06 again to save it")
    served = record.get("served_as")
    if not isinstance(lm, local_lm.EmbeddedLM):
        from helpers.rl import arbor_job

        if not isinstance(served, str) or not served.startswith("grpo:"):
            raise TutorialError(f"{folder} holds an adapter for the embedded model, and {lm.model!r} is served elsewhere: "
                                "load it with the embedded LM (lm_setup.make_lm(profile))")
        if warm:
            raise TutorialError(f"{folder} says it was trained on a warm start, which an Arbor job never is: run "
                                "06_grpo_training again to save it")
        if arbor_job.job_name(lm) != served.split("@w")[0]:
            raise TutorialError(f"{folder} was trained as {served.split('@w')[0]} on an Arbor server, and {lm.model!r} "
                                "does not name that job: give load_trained an LM that does (its server must still run)")
        fresh_program.load_state(state)
        fresh_program.set_lm(lm)
        return fresh_program
    if warm and not (folder / "warm_start").is_dir():
        raise TutorialError(f"{folder} was trained on top of a warm start, but its warm_start/ folder is missing: "
                            "run 06_grpo_training again to save it whole")
    if not (folder / "adapter").is_dir() and isinstance(served, str):
        raise TutorialError(f"{folder} was trained as {served.split('@w')[0]} on an Arbor server, whose disk keeps its "
                            "weights: load it with an LM that names that job (lm_setup.make_lm with RLMH_LM=arbor)")
    if not (folder / "adapter").is_dir():
        raise TutorialError(f"{folder} has no adapter/ folder: run 06_grpo_training again to save it whole")
    engine = local_lm.live_engine(local_lm.MODEL_NAME)
    if engine is None:
        raise TutorialError("load_trained needs the embedded LM: build it with lm_setup.make_lm(profile) first")
    if not warm and getattr(engine, "merged", None):
        raise TutorialError(f"this GRPO result was trained without a warm start, but the live model carries one "
                            f"({engine.merged}): restart the kernel, then load it")
    lora_policy.check_adapter(engine, folder / "adapter")  # names, shapes, finite values: before any weight changes
    if warm:
        warm_start.saved_label(folder / "warm_start")
        lora_policy.check_adapter(engine, folder / "warm_start")
        warm_start.apply_saved(engine, folder / "warm_start")
    lora_policy.activate_adapter(engine, folder / "adapter", adapter_name)
    fresh_program.load_state(state)
    fresh_program.set_lm(lm)
    return fresh_program
