"""Warm start before GRPO: behaviour cloning of a scripted teacher -- supervised learning, NOT reinforcement learning (06).

Why. GRPO can only amplify what its rollouts already do now and then. Untrained, SmolLM2-135M writes
notes that are mostly "N/A" and queries that are prose, so no rollout of any claim finds a gold page the
claim does not name (measured: 0 % of claims over 2 steps): every reward ties on that skill and RL has
nothing to reinforce. The mmGRPO paper's recipe for such weak policies is a warm start: supervised
fine-tuning on good traces first, as dspy's ``BootstrapFinetune`` does with a teacher program.

The teacher here is a script written for the mini world (it is not a model and never sees gold labels):

* ``append_notes``: from the retrieved abstracts whose title the claim names, copy the names written
  after "by" (a work's maker and its company) that the claim does not name -- in the mini world, the page
  the claim hides is one of them. If no retrieved page is one the claim names, note the claim's name that
  no result is about.
* ``generate_query``: the names in the notes that the claim does not name (at most two), else the name the
  notes say is missing, else the claim.

``teacher_recall`` scores the teacher with BM25 alone (no LM). ``teacher_traces`` turns its outputs into
SFT rows with the exact prompt token ids the engine is fed for each field call of ``GuidedChatAdapter``,
and ``sft`` trains a LoRA adapter on them on the live engine (mean negative log-likelihood of the value
tokens plus the blank line the engine stops at).
"""

import json
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dspy

from helpers.engine import local_lm
from helpers.program import metrics
from helpers.util import atomic
from helpers.util.errors import TutorialError

ADAPTER_NAME = "warm-start"
STOP = "\n\n"  # GuidedChatAdapter's stop: a field value ends at a blank line

_NAME = r"(?:The )?[A-Z][\w'-]+(?:(?: of the| of| and)? [A-Z][\w'-]+)+"
NAME = re.compile(_NAME)  # a capitalised multi-word name ("Posbram Pictures", "The Forest of Velvet Shadows")
MADE_BY = re.compile(r" by (" + _NAME + ")")  # "directed by X", "It was produced by Y"


def names_in(text: str) -> list[str]:
    """Capitalised multi-word names in ``text``, a possessive 's dropped ("Valley and Island's" -> "Valley and Island")."""
    return [re.sub(r"'s$", "", n) for n in NAME.findall(text)]


# --- the scripted teacher --------------------------------------------------------------------
def _split(doc: str) -> tuple[str, str]:
    title, _, text = doc.partition(" | ")
    return title, text


def bridge_names(claim: str, docs: list[str]) -> list[str]:
    """Names after "by" in the abstracts of retrieved pages the claim names, minus names in the claim or retrieved."""
    low = claim.lower()
    titles = [_split(d)[0] for d in docs]
    names = []
    for doc in docs:
        title, text = _split(doc)
        if title.lower() not in low:
            continue
        for name in MADE_BY.findall(text):
            if name.lower() not in low and name not in titles and name not in names:
                names.append(name)
    return names


def missing_names(claim: str, docs: list[str]) -> list[str]:
    """Multi-word names in the claim that no retrieved title contains (the page the claim names was not found)."""
    titles = [_split(d)[0] for d in docs]
    out = []
    for name in names_in(claim):
        if not any(name in t for t in titles) and name not in out:
            out.append(name)
    return out


def teach_notes(claim: str, key_facts: list, new_search_results: list[str]) -> dict:
    """The teacher's ``append_notes`` outputs: ``{"reasoning": ..., "new_key_facts": ...}``."""
    bridges = bridge_names(claim, new_search_results)[:2]
    if bridges:
        source = next(_split(d)[0] for d in new_search_results if _split(d)[0].lower() in claim.lower()
                      and any(b in _split(d)[1] for b in bridges))
        return {"reasoning": f"The page on {source} names pages the claim does not name.",
                "new_key_facts": f"Names in {source}: {'; '.join(bridges)}."}
    missing = missing_names(claim, new_search_results)
    if missing:
        return {"reasoning": f"No result is about {missing[0]}, which the claim names.",
                "new_key_facts": f"The results do not include {missing[0]}."}
    return {"reasoning": "The results name no page that the claim does not name.",
            "new_key_facts": "No new names."}


def teach_query(claim: str, key_facts: list) -> dict:
    """The teacher's ``generate_query`` outputs, from the notes alone: ``{"reasoning": ..., "followup_search_query": ...}``."""
    low = claim.lower()
    named = [n for note in key_facts for n in names_in(str(note))]
    new = [n for n in named if n.lower() not in low]
    if new:
        return {"reasoning": "The notes name pages the claim does not name, so search for them.",
                "followup_search_query": " ".join(dict.fromkeys(new[:2]))}
    if named:
        return {"reasoning": f"The page about {named[0]} is still missing.", "followup_search_query": named[0]}
    return {"reasoning": "The notes name nothing new, so search the claim again.", "followup_search_query": claim}


TEACHERS = {"append_notes": teach_notes, "generate_query": teach_query}


def teacher_run(claim: str, search, num_docs: int = 4, num_hops: int = 2) -> list[tuple[str, dict, dict]]:
    """ResearchHop's control flow with the teacher in place of the LM: ``[(predictor, inputs, outputs)]`` in call order.

    Each call gets a copy of the notes, as ``ResearchHop.forward`` passes them. The last entry's inputs and the
    documents are also returned by ``teacher_retrieval``.
    """
    calls, key_facts = [], []
    for hop in range(num_hops):
        if hop:
            inputs = {"claim": claim, "key_facts": list(key_facts)}
            outputs = teach_query(**inputs)
            calls.append(("generate_query", inputs, outputs))
            query = outputs["followup_search_query"]
        else:
            query = claim
        results = search(query, k=num_docs)
        calls.append(("search", {"query": query}, {"docs": results}))
        if hop == num_hops - 1:
            break
        inputs = {"claim": claim, "key_facts": list(key_facts), "new_search_results": results}
        outputs = teach_notes(**inputs)
        calls.append(("append_notes", inputs, outputs))
        key_facts.append(outputs["new_key_facts"])
    return calls


def teacher_recall(examples, search, num_docs: int = 4, num_hops: int = 2) -> dict:
    """The teacher's recall and hidden-page recall with BM25 alone (no LM), like ResearchHop(num_docs, num_hops)."""
    scores, hidden, queries = [], [], []
    for ex in examples:
        calls = teacher_run(ex.claim, search, num_docs, num_hops)
        docs = [d for name, _, out in calls if name == "search" for d in out["docs"]]
        pred = dspy.Prediction(retrieved_docs=docs)
        scores.append(metrics.recall(ex, pred))
        h = metrics.hidden_recall(ex, pred)
        if h is not None:
            hidden.append(h)
        queries += [inp["query"] for name, inp, _ in calls if name == "search"][1:]
    return {"claims": len(scores), "recall %": 100 * sum(scores) / len(scores),
            "hidden-page recall %": 100 * sum(hidden) / max(1, len(hidden)),
            "query is the claim %": 100 * sum(q == ex.claim for q, ex in zip(queries, examples)) / max(1, len(queries))}


# --- SFT rows: exactly what the engine is fed for each field call ------------------------------
@dataclass
class SFTRow:
    predictor: str  # "append_notes" or "generate_query"
    field: str  # the output field this call writes
    prompt_ids: list[int]  # the engine's prompt: messages + the adapter's prefill, chat-templated
    completion_ids: list[int]  # the value's tokens + the blank line the engine stops at
    claim: str = ""


def field_conversations(adapter, signature, inputs: dict, outputs: dict) -> list[tuple[str, list, str]]:
    """``[(field, conversation, value)]``: the conversation GuidedChatAdapter sends for each output field, in order."""
    messages = adapter.format(signature, [], inputs)
    reply, out = "", []
    for name in signature.output_fields:
        reply += f"[[ ## {name} ## ]]\n"
        value = str(outputs[name]).strip()
        out.append((name, [*messages, {"role": "assistant", "content": reply}], value))
        reply += value + "\n\n"
    return out


def teacher_traces(program_like, examples, search, tokenizer=None, adapter=None) -> list[SFTRow]:
    """SFT rows for every field call the adapter makes when ``program_like`` (a ResearchHop) runs the teacher's outputs.

    Uses the program's own signatures (``program_like.append_notes.predict.signature`` etc.) and ``num_docs``,
    ``num_hops``; ``search`` is the BM25 search the program would call.
    """
    from helpers.program.guided_adapter import GuidedChatAdapter

    adapter = adapter or GuidedChatAdapter()
    if tokenizer is None:
        engine = local_lm.live_engine(local_lm.MODEL_NAME)
        if engine is None:
            raise RuntimeError("teacher_traces needs the embedded LM's tokenizer: build it with lm_setup.make_lm first")
        tokenizer = engine.tokenizer
    stop_ids = tokenizer(STOP, add_special_tokens=False)["input_ids"]
    signatures = {name: getattr(program_like, name).predict.signature for name in TEACHERS}
    rows = []
    for ex in examples:
        for name, inputs, outputs in teacher_run(ex.claim, search, program_like.num_docs, program_like.num_hops):
            if name == "search":
                continue
            for field_name, conversation, value in field_conversations(adapter, signatures[name], inputs, outputs):
                rows.append(SFTRow(name, field_name, local_lm.prompt_ids(tokenizer, conversation),
                                   tokenizer(value, add_special_tokens=False)["input_ids"] + stop_ids, ex.claim))
    return rows


# --- LoRA SFT on the live engine --------------------------------------------------------------
@dataclass
class SFTLog:
    adapter_name: str
    steps: int
    losses: list = field(default_factory=list)  # mean NLL per completion token, per optimizer step
    grad_norms: list = field(default_factory=list)
    seconds: float = 0.0
    rows: int = 0
    stopped_early: bool = False  # a ``max_seconds`` cap ended it before ``steps``


def calls(rows: list[SFTRow]) -> list[list[SFTRow]]:
    """Rows grouped by predictor call: the field rows of one call share their prompt up to the assistant's prefill."""
    out = []
    for r in rows:
        if out and out[-1][0].claim == r.claim and out[-1][0].predictor == r.predictor and \
                r.field not in {x.field for x in out[-1]}:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def shared_prefix_logprobs(model, tokenizer, groups, temperature: float = 1.0):
    """Per-token log-probs of every row's completion (``groups``: lists of ``(prompt_ids, completion_ids)``), rows in order.

    The field calls of one predictor call share their prompt up to the prefill, so the rows go to
    ``lora_policy.shared_prefix_logprobs``, which runs their common prompt prefix once.
    """
    from helpers.backend.lora_policy import shared_prefix_logprobs as shared

    return shared(model, tokenizer, [row for group in groups for row in group], temperature)


def nll(engine, rows: list[SFTRow], batch: int = 4) -> float:
    """Mean negative log-likelihood per completion token of ``rows`` under the engine's current weights."""
    import torch

    model = getattr(engine, "peft_model", None) or engine.model
    groups = calls(rows)
    total, count = 0.0, 0
    with engine.lock, torch.no_grad():
        for i in range(0, len(groups), batch):
            chunk = [[(r.prompt_ids, r.completion_ids) for r in g] for g in groups[i:i + batch]]
            logps, mask = shared_prefix_logprobs(model, engine.tokenizer, chunk, 1.0)
            total -= float((logps * mask).sum())
            count += int(mask.sum())
    return total / max(1, count)


def sft(engine, rows: list[SFTRow], steps: int, lr: float = 1e-3, batch: int = 4, seed: int = 0,
        adapter_name: str = ADAPTER_NAME, lora_config: dict | None = None, max_seconds: float | None = None,
        log_every: int = 0) -> SFTLog:
    """LoRA SFT of the live engine's model on ``rows``: up to ``steps`` AdamW steps of ``batch`` predictor calls each.

    Loss: mean NLL of the completion tokens (temperature 1) over the step's tokens; gradient norm clipped to
    1.0; the engine's lock held for each step and ``engine.weights_changed(base=False)`` called after it (the prefix KV
    cache holds states of the old weights). A step takes the field rows of ``batch`` calls (``calls``), of one
    predictor so their lengths match; calls are drawn in shuffled passes seeded by ``seed``. ``max_seconds``
    (default: none) stops early, and then says so: what is learnt would depend on the machine's speed. The adapter stays active on the engine afterwards
    (``merge_into_base`` bakes it in before GRPO).
    """
    import torch

    from helpers.backend import grpo_loss
    from helpers.backend.lora_policy import add_adapter

    if not rows:
        raise ValueError("no SFT rows")
    start = time.perf_counter()
    model, params = add_adapter(engine, adapter_name, seed, lora_config)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    by_predictor = {}
    for group in calls(rows):
        by_predictor.setdefault(group[0].predictor, []).append(group)
    plan: list[list] = []
    log = SFTLog(adapter_name, 0, rows=len(rows))
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            log.stopped_early = True
            print(f"  SFT stopped after {step} of {steps} steps: the time cap of {max_seconds / 60:.1f} min was hit, "
                  "so this warm start learnt less than the same settings do on a faster machine", flush=True)
            break
        if not plan:  # one pass: every call once, in batches of one predictor, batches shuffled
            for groups in by_predictor.values():
                groups = groups[:]
                rng.shuffle(groups)
                plan += [groups[i:i + batch] for i in range(0, len(groups), batch)]
            rng.shuffle(plan)
        chunk = plan.pop()
        with engine.lock:
            model.train()
            logps, mask = shared_prefix_logprobs(model, engine.tokenizer,
                                                 [[(r.prompt_ids, r.completion_ids) for r in g] for g in chunk], 1.0)
            loss = -(logps * mask).sum() / mask.sum().clamp(min=1)
            loss.backward()
            norm = grpo_loss.clipped_step(optimizer, params, 1.0)
            model.eval()
            engine.weights_changed(base=False)
        log.losses.append(loss.item())
        log.grad_norms.append(norm)
        log.steps = step + 1
        if log_every and (step + 1) % log_every == 0:
            recent = log.losses[-log_every:]
            elapsed = time.perf_counter() - start
            print(f"  SFT step {step + 1}/{steps}: loss {sum(recent) / len(recent):.3f} "
                  f"[{elapsed:.0f} s, about {elapsed / (step + 1) * (steps - step - 1):.0f} s to go]", flush=True)
    for p in params:
        p.requires_grad_(False)
    log.seconds = time.perf_counter() - start
    return log


def save_adapter(engine, path, adapter_name: str = ADAPTER_NAME, label: str = ADAPTER_NAME) -> Path:
    """Write the adapter to ``path`` atomically (reload with ``lora_policy.activate_adapter(engine, path, name)``)."""
    path = Path(path)
    with engine.lock, atomic.atomic_dir(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file")
        engine.peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        (tmp / "warm_start.json").write_text(json.dumps({"adapter": adapter_name, "label": label,
                                                            "kind": "behaviour cloning (SFT)"}))
    return path


def merge_into_base(engine, label: str = ADAPTER_NAME) -> None:
    """Bake the active LoRA adapter into the engine's base weights and drop the peft wrapper.

    GRPO's job then adds its own fresh adapter on top of the warm-started weights (peft activates one adapter
    at a time, so a second adapter would otherwise switch the warm start off). Not reversible in place:
    ``engine.merged`` records ``label`` so that ``grpo_training.load_trained`` does not merge it twice.
    """
    peft_model = getattr(engine, "peft_model", None)
    if peft_model is None:
        return
    with engine.lock:
        engine.model = peft_model.merge_and_unload()
        engine.model.eval()
        engine.peft_model = None
        engine.merged = label
        engine.weights_changed()  # in the same hold of the lock: no call may run on stale states or packed copies


def saved_label(folder) -> str:
    """The label ``save_adapter`` wrote for a saved warm start (what ``engine.merged`` records once it is merged)."""
    path = Path(folder) / "warm_start.json"
    try:
        label = json.loads(path.read_text())["label"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise TutorialError(f"{path} is missing or damaged ({type(exc).__name__}): run 06_grpo_training again to save "
                            "the warm start") from None
    if not isinstance(label, str):
        raise TutorialError(f"{path} names no warm start: run 06_grpo_training again to save it")
    return label


def apply_saved(engine, folder) -> None:
    """Merge a warm start saved by ``save_adapter`` into the engine's weights, once (``grpo_training.load_trained``).

    An engine that already carries it (the kernel that trained it) is left as it is; one that carries another
    warm start cannot take this one (merged weights cannot be unmerged) and says so.
    """
    from helpers.backend.lora_policy import activate_adapter, remove_lora

    label = saved_label(folder)
    merged = getattr(engine, "merged", None)
    if merged == label:
        return
    if merged is not None:
        raise TutorialError(f"this kernel's LM already carries another warm start ({merged}): restart the kernel "
                            f"to load {folder}")
    remove_lora(engine)  # LoRA layers of this kernel's earlier runs, if any
    activate_adapter(engine, folder, ADAPTER_NAME)
    merge_into_base(engine, label)


@dataclass(frozen=True)
class Settings:
    """The warm start 06 and ``grpo_mini.py --warm-start`` run (measured in benchmarks/RESULTS.md)."""
    train_claims: int = 120  # the first train claims; the teacher's traces of them are the SFT rows
    steps: int = 40  # AdamW steps of ``batch`` predictor calls
    batch: int = 2
    lr: float = 2e-3
    seed: int = 0
    max_minutes: float | None = None  # a time cap: SFT stops after this long, whatever ``steps`` says (and says so)

    @property
    def label(self) -> str:
        return f"warm-start {self.train_claims} claims, {self.steps} steps x {self.batch}, lr {self.lr:g}, seed {self.seed}"


def run(program, trainset, search, adapter, settings: Settings = Settings(), save_to=None, log_every: int = 0) -> SFTLog:
    """The whole warm-start stage on the live engine: teacher traces -> LoRA SFT -> (saved to ``save_to``) -> merged.

    ``program`` is a ResearchHop (its signatures, ``num_docs`` and ``num_hops`` shape the rows). Afterwards the
    engine generates with the warm-started weights, so every program on it starts from there.
    """
    engine = local_lm.live_engine(local_lm.MODEL_NAME)
    if engine is None:
        raise RuntimeError("the warm start trains the embedded LM: build it with lm_setup.make_lm(profile) first")
    rows = teacher_traces(program, trainset[: settings.train_claims], search, engine.tokenizer, adapter)
    log = sft(engine, rows, settings.steps, lr=settings.lr, batch=settings.batch, seed=settings.seed,
              max_seconds=None if settings.max_minutes is None else 60 * settings.max_minutes, log_every=log_every)
    if save_to is not None:
        save_adapter(engine, save_to, label=settings.label)
    merge_into_base(engine, settings.label)
    return log
