"""The policy GRPO trains on CPU: LoRA adapters on the engine's live model, their optimizer, and the update.

``LoraPolicy`` is the weights side of ``grpo_backend.LocalReinforceJob``: it adds a LoRA adapter to the very model
the engine generates with (so the next rollout already samples from the updated weights), saves and loads it, and
runs GRPO's update on the training rows ``grpo_data.OnPolicyData`` builds from the engine's records of what was
sampled: log-probabilities at the rollout temperature (``shared_prefix_logprobs``; ``_completion_logprobs`` with
gradient checkpointing) → PPO's ratio to the rollout's log-probabilities in ``grpo_loss.policy_loss`` →
``grpo_loss.clipped_step``. The engine's lock keeps generation and training apart, and every weight change clears
the engine's cached attention states. Also here: ``add_adapter`` (the warm start's too), ``activate_adapter`` (a
saved adapter into the engine) and ``remove_lora``.
"""

import json
import logging
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from helpers.backend import grpo_loss
from helpers.engine import decoding
from helpers.util.errors import TutorialError

log = logging.getLogger(__name__)

DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,  # dropout would make the PPO ratio != 1 at equal weights
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]}


@contextmanager
def quiet_peft():
    """peft 0.21 reads a transformers property deprecated in v5 when it wraps a model; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_adapter(engine, name: str, seed: int = 0, lora_config: dict | None = None, reuse: bool = True):
    """Add LoRA adapter ``name`` to the engine's model, make it the one the engine generates with, and return
    ``(peft model, its LoRA parameters)``, trainable. One already there is kept (the warm start continues its own)
    or, with ``reuse=False``, refused (a GRPO job must not train on another's adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", **{**DEFAULT_LORA, **(lora_config or {})})
    with engine.lock:
        model = getattr(engine, "peft_model", None)
        if model is not None and name in model.peft_config and not reuse:
            raise TutorialError(f"a LoRA adapter named {name!r} is already on the model: give the GRPO job another "
                                "job_id, or none for a new one")
        new = model is None or name not in model.peft_config
        if new:
            torch.manual_seed(seed)  # LoRA's A matrices start random
            if model is None:
                with quiet_peft():
                    model = get_peft_model(engine.model, config, adapter_name=name)
                engine.peft_model = model
            else:
                model.add_adapter(name, config)
        model.set_adapter(name)
        params = [p for n, p in model.named_parameters() if "lora_" in n and (f".{name}." in n or n.endswith(f".{name}"))]
        for p in params:
            p.requires_grad_(True)
        # in the same hold of the lock as the change; PiSSA, OLoRA, CorDA, LoftQ... initialisations rewrite the base weights
        engine.weights_changed(base=new and config.init_lora_weights not in (True, False, "gaussian"))
    return model, params


class LoraPolicy:
    """A LoRA adapter named ``name`` on ``engine``'s model, made the active one, with an AdamW optimizer over it."""

    def __init__(self, engine, name: str, lora_config=None, seed: int = 0, learning_rate: float = 1e-5,
                 weight_decay: float = 0.0):
        import torch

        self.engine, self.name = engine, name
        with engine.lock:
            self.model, self.params = add_adapter(engine, name, seed, lora_config, reuse=False)
            engine.seed_sampling(seed)  # the rollouts differ from seed to seed
            self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay)

    def save(self, folder: Path) -> None:
        """Write this adapter's files into ``folder`` (the caller makes it atomic)."""
        with self.engine.lock, warnings.catch_warnings():
            # peft looks for the base model's config.json where the GGUF was read from; the vocabulary is unchanged
            warnings.filterwarnings("ignore", message="Could not find a config file")
            self.model.save_pretrained(folder, selected_adapters=[self.name])

    def load(self, path) -> None:
        """Copy a saved adapter's LoRA weights into this adapter."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = _adapter_folder(path, self.name)
        with self.engine.lock:
            set_peft_model_state_dict(self.model, load_file(folder / "adapter_model.safetensors"), adapter_name=self.name)
            self.engine.weights_changed(base=False)

    def update(self, rows, train_kwargs, step: int):
        """Optimizer steps on ``rows`` (``grpo_data.TrainRow``: sampled ids, rollout log-probs, advantage).

        ``train_kwargs`` are GRPO's, with TRL's names; ``step`` only labels warnings. Each optimizer step takes
        ``per_device_train_batch_size * gradient_accumulation_steps`` rows (all of them when
        ``gradient_accumulation_steps`` is unset), and the rows are passed ``num_iterations`` times, as in TRL. The
        loss is PPO's clipped ratio to the log-probabilities the rollout sampled with (``epsilon``, 0.2 by default):
        1 at the first pass, so that step is plain policy gradient.
        """
        import torch

        kw = train_kwargs
        tok, model = self.engine.tokenizer, self.model
        micro = int(kw.get("per_device_train_batch_size", 4))
        accumulation = kw.get("gradient_accumulation_steps")
        per_step = micro * int(accumulation) if accumulation else len(rows)
        iterations = int(kw.get("num_iterations", 1))
        epsilon = float(kw.get("epsilon", 0.2))
        loss_type, beta = kw.get("loss_type", "dapo"), float(kw.get("beta", 0.0))
        max_len = kw.get("max_completion_length") or 256
        temperatures = {r.temperature for r in rows}
        if len(temperatures) != 1 or not next(iter(temperatures)) > 0:
            raise TutorialError(f"GRPO rows must share one sampling temperature > 0, got {sorted(temperatures)}")
        temperature = temperatures.pop()
        rows = sorted(rows, key=lambda r: r.prompt_ids)  # rows sharing a prompt prefix side by side
        encoded = [(r.prompt_ids, r.completion_ids[:max_len]) for r in rows]
        masked = [r.nonblank for r in rows]
        blank = self.engine.blank_tokens() if any(masked) else None
        old = [torch.tensor(r.old_logprobs[:max_len]) for r in rows]
        advantages = torch.tensor([r.advantage for r in rows], dtype=torch.float32)
        steps = _optimizer_steps(len(rows), micro, per_step)
        losses, norm = [], 0.0
        self.consumed = []  # (prompt ids, completion ids, old log-probs) of every row, as the loss gets them
        self.first_max_logratio = 0.0  # max |new - old log-prob| before the first optimizer step: ~0 when on policy
        # Checkpointing recomputes activations (less memory) but drops the shared-prefix states; sharing is faster.
        checkpointing = bool(kw.get("gradient_checkpointing", False))
        logprobs = _completion_logprobs if checkpointing else shared_prefix_logprobs
        with self.engine.lock, _checkpointing(model, checkpointing):
            model.train()
            for iteration in range(iterations):
                for n_step, step_chunks in enumerate(steps):
                    tokens = sum(len(encoded[i][1]) for c in step_chunks for i in c)
                    completions = sum(len(c) for c in step_chunks)
                    for chunk in step_chunks:
                        batch = [encoded[i] for i in chunk]
                        first = [masked[i] for i in chunk]
                        # fp32 like the rollouts (see local_lm.load_model): the ratio is 1 at the sampling weights
                        logps, masks = logprobs(model, tok, batch, temperature, first, blank)
                        ref = None
                        if beta > 0:
                            with torch.no_grad(), model.disable_adapter():
                                ref, _ = logprobs(model, tok, batch, temperature, first, blank)
                        old_logps = torch.zeros_like(logps)
                        for row, i in enumerate(chunk):
                            old_logps[row, : len(old[i])] = old[i]
                            if iteration == 0:
                                self.consumed.append((batch[row][0], batch[row][1], old_logps[row, : len(batch[row][1])].tolist()))
                        if iteration == 0 and n_step == 0:  # still the rollout's weights: the ratio must be 1
                            gap = ((logps.detach().float() - old_logps).abs() * masks).max()
                            self.first_max_logratio = max(self.first_max_logratio, float(gap))
                        loss = grpo_loss.policy_loss(logps.float(), old_logps, advantages[chunk.start:chunk.stop], masks,
                                                     epsilon, loss_type, beta, ref,
                                                     denominator=max(1, tokens if loss_type == "dapo" else completions))
                        if not torch.isfinite(loss):
                            log.warning("GRPO step %d: non-finite loss skipped", step)
                            self.optimizer.zero_grad(set_to_none=True)
                            model.eval()
                            return float("nan"), 0.0
                        loss.backward()
                        losses.append(loss.item())
                    norm = grpo_loss.clipped_step(self.optimizer, self.params, float(kw.get("max_grad_norm", 1.0)))
                    if not math.isfinite(norm):
                        log.warning("GRPO step %d: non-finite gradient skipped", step)
                    self.engine.weights_changed(base=False)
            model.eval()
        return sum(losses) / max(1, iterations * len(steps)), norm


def _optimizer_steps(n: int, micro: int, per_step: int) -> list[list[range]]:
    """Split ``n`` items into optimizer steps of ``per_step`` items, each a list of micro-batches (index ranges)."""
    return [[range(i, min(i + micro, j + per_step, n)) for i in range(j, min(j + per_step, n), micro)]
            for j in range(0, n, per_step)]


@contextmanager
def _checkpointing(model, enabled: bool):
    """Recompute activations in the backward pass instead of keeping them (train_kwargs gradient_checkpointing)."""
    if not enabled:
        yield
        return
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        base.activation_checkpointing_disable()


def _completion_logprobs(model, tokenizer, encoded, temperature: float = 1.0, nonblank=None, blank_mask=None):
    """Per-token log-probabilities of each completion under ``model`` at ``temperature``, and their mask.

    Rows flagged in ``nonblank`` were sampled with blank first tokens masked out (``decoding``); their first
    token's log-probability is taken under the same mask, as it was sampled.

    Rows are left-padded so every completion ends at the right edge; the LM head then runs only on the
    last ``longest completion + 1`` positions (``logits_to_keep``), not on the long prompts, which cuts
    the step's peak memory and time several-fold. Positions follow the attention mask, as in generation.
    """
    import torch

    width = max(len(p) + len(c) for p, c in encoded)
    keep = max(len(c) for _, c in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, c) in enumerate(encoded):
        ids[row, width - len(p) - len(c):] = torch.tensor(p + c)
        attention[row, width - len(p) - len(c):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep + 1,
                   use_cache=False).logits[:, :-1]
    if nonblank is not None and any(nonblank):
        logits = decoding.mask_blank_first(logits, [keep - len(c) if flag else None
                                                    for (_, c), flag in zip(encoded, nonblank)], blank_mask)
    logps = grpo_loss.token_logprobs(logits, ids[:, width - keep:], temperature)
    out = torch.zeros(len(encoded), keep)
    mask = torch.zeros(len(encoded), keep)
    for row, (_, c) in enumerate(encoded):
        out[row, : len(c)] = logps[row, keep - len(c):]
        mask[row, : len(c)] = 1
    return out, mask


def shared_prefix_logprobs(model, tokenizer, encoded, temperature: float = 1.0, nonblank=None, blank_mask=None):
    """``_completion_logprobs`` with each shared prompt prefix computed once (the default, without checkpointing).

    The rollouts of one claim start with the same long prompt (the claim, the search results); a field's
    second call repeats the first call's prompt. So the rows are cut into runs of neighbours that share a
    prefix (``prefix_runs``; callers put such rows side by side), each run's common prefix runs once, batch 1,
    and its rows continue from those states (gradients flow back into them); only each row's own prompt
    tail and completion are computed per row. Same values as the padded computation; rows keep their order.
    """
    import torch

    nonblank = list(nonblank) if nonblank is not None else [False] * len(encoded)
    parts = [_one_prefix_logprobs(model, tokenizer, encoded[run.start:run.stop], temperature, nonblank[run.start:run.stop],
                                  blank_mask) for run in prefix_runs([p for p, _ in encoded], [len(c) for _, c in encoded])]
    if len(parts) == 1:
        return parts[0]
    keep = max(logps.shape[1] for logps, _ in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, keep - t.shape[1]))  # noqa: E731 (masked: zeros past the end)
    return torch.cat([pad(logps) for logps, _ in parts]), torch.cat([pad(mask) for _, mask in parts])


def _common_length(a: list, b: list) -> int:
    n, most = 0, min(len(a), len(b))
    while n < most and a[n] == b[n]:
        n += 1
    return n


def prefix_runs(prompts: list[list[int]], completion_lengths: list[int]) -> list[range]:
    """Cut rows (in order) into runs whose common prompt prefix is worth computing once.

    A run costs its common prefix once plus, per row, the longest tail after it (rows are padded to it). A
    row joins the run before it when that costs fewer token positions than starting its own run: the field
    rows of one predictor call, or the rollouts of one claim, end up together; calls of different claims,
    whose prompts share only the system message, do not. (One run for all rows made the warm start compute
    every prompt of a step in full, once per field.)
    """
    def cost(start, stop, shared):
        return shared + (stop - start) * max(len(prompts[i]) - shared + completion_lengths[i] for i in range(start, stop))

    runs, start, shared = [], 0, len(prompts[0]) if prompts else 0
    for i in range(1, len(prompts)):
        joined = min(shared, _common_length(prompts[start], prompts[i]))
        alone = len(prompts[i]) + completion_lengths[i]
        if cost(start, i + 1, max(1, joined)) <= cost(start, i, max(1, shared)) + alone:
            shared = joined
        else:
            runs.append(range(start, i))
            start, shared = i, len(prompts[i])
    if prompts:
        runs.append(range(start, len(prompts)))
    return runs


def _one_prefix_logprobs(model, tokenizer, encoded, temperature, nonblank, blank_mask):
    """``shared_prefix_logprobs`` for one run: the rows' longest common prompt prefix runs once."""
    import torch
    from transformers import DynamicCache

    prompts = [p for p, _ in encoded]
    shared = min(len(p) for p in prompts)
    for p in prompts[1:]:
        shared = min(shared, _common_length(p, prompts[0]))
    shared = max(1, shared)
    body = (model.get_base_model() if hasattr(model, "get_base_model") else model)  # LoRA layers sit inside it
    head = body.model(input_ids=torch.tensor([prompts[0][:shared]]), use_cache=True)
    rows = len(encoded)
    tails = [p[shared:] + c for p, c in encoded]
    width = max(len(t) for t in tails)
    ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, shared + width), dtype=torch.long)
    attention[:, :shared] = 1
    for row, tail in enumerate(tails):
        ids[row, : len(tail)] = torch.tensor(tail)
        attention[row, shared: shared + len(tail)] = 1
    past = DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                                        for layer in head.past_key_values.layers])
    positions = torch.arange(shared, shared + width)[None].expand(rows, -1)
    hidden = body.model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=past,
                        use_cache=True).last_hidden_state
    # the state that predicts tail token j sits at j - 1; the head's last state predicts tail token 0
    states = torch.cat([head.last_hidden_state[:, -1:].expand(rows, -1, -1), hidden[:, :-1]], dim=1)
    keep = max(len(c) for _, c in encoded)
    index = torch.zeros((rows, keep), dtype=torch.long)
    targets = torch.zeros((rows, keep), dtype=torch.long)
    mask = torch.zeros(rows, keep)
    for row, (p, c) in enumerate(encoded):
        start = len(p) - shared
        index[row, : len(c)] = torch.arange(start, start + len(c))
        targets[row, : len(c)] = torch.tensor(c)
        mask[row, : len(c)] = 1
    # the LM head (49k words) runs only where a completion token is predicted: most of the memory otherwise
    picked = body.lm_head(states.gather(1, index[..., None].expand(-1, -1, states.shape[-1])))
    if nonblank is not None and any(nonblank):
        picked = decoding.mask_blank_first(picked, [0 if flag else None for flag in nonblank], blank_mask)
    return grpo_loss.token_logprobs(picked, targets, temperature) * mask, mask


def _adapter_folder(path, adapter_name=None):
    """The folder holding ``adapter_config.json``: ``path`` itself, or the sub-folder peft writes for a named adapter."""
    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        return folder
    nested = sorted(p.parent for p in folder.glob("*/adapter_config.json"))
    if adapter_name and (folder / adapter_name / "adapter_config.json").exists():
        return folder / adapter_name
    if len(nested) == 1:
        return nested[0]
    raise TutorialError(f"no single LoRA adapter in {folder}: expected one adapter_config.json")


_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def check_adapter(engine, path) -> Path:
    """The saved LoRA adapter at ``path``, checked against the live model before any weight changes; its folder.

    Refused in one line: a file that does not parse, weights named for modules this model does not have (peft would
    load them with no effect), a rank other than the config's or shapes other than the model's, NaN or infinite values.
    """
    import torch
    from safetensors import safe_open

    folder = _adapter_folder(path)
    try:
        rank = int(json.loads((folder / "adapter_config.json").read_text())["r"])
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - whatever a damaged config or safetensors file raises
        raise TutorialError(f"the LoRA adapter in {folder} is damaged ({type(exc).__name__}): save it again "
                            "(06_grpo_training)") from None
    modules = dict(engine.model.named_modules())
    if not tensors:
        raise TutorialError(f"the LoRA adapter in {folder} holds no weights: save it again (06_grpo_training)")
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        layer = modules.get(match.group(1)) if match else None
        if layer is None:
            raise TutorialError(f"the LoRA adapter in {folder} holds {key}, which {engine.name} does not have: it was "
                                "saved for another model")
        out_features, in_features = getattr(layer, "base_layer", layer).weight.shape
        expected = (rank, in_features) if match.group(2) == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise TutorialError(f"the LoRA adapter in {folder}: {key} has shape {tuple(tensor.shape)}, not {expected} "
                                f"(rank {rank}): it was saved for another model or setting")
        if not torch.isfinite(tensor).all():
            raise TutorialError(f"the LoRA adapter in {folder}: {key} holds NaN or infinite values: it cannot be used; "
                                "train it again")
    return folder


def activate_adapter(engine, path: Path, adapter_name: str) -> None:
    """Load a saved LoRA adapter from disk and make it the one the engine generates with."""
    from peft import PeftModel

    folder = str(_adapter_folder(path))
    with engine.lock, quiet_peft():
        peft_model = getattr(engine, "peft_model", None)
        if peft_model is None:  # a fresh kernel: wrap the original weights with the saved adapter
            engine.peft_model = PeftModel.from_pretrained(engine.model, folder, adapter_name=adapter_name)
        else:
            if adapter_name in peft_model.peft_config:
                peft_model.delete_adapter(adapter_name)
            peft_model.load_adapter(folder, adapter_name=adapter_name)
            peft_model.set_adapter(adapter_name)
        engine.peft_model.eval()
        engine.weights_changed(base=False)  # in the same hold of the lock: no call may run on stale cached states


def remove_lora(engine) -> None:
    """Take every LoRA layer out of the engine's model: it generates with the original weights again."""
    peft_model = getattr(engine, "peft_model", None)
    if peft_model is not None:
        with engine.lock:
            engine.model = peft_model.unload()
            engine.peft_model = None
            engine.weights_changed(base=False)
