"""The engine's decode loop: prefill each prompt (reusing cached prefixes), then sample all rows together.

It replaces ``model.generate`` for three reasons (measured in benchmarks/lm_throughput.py):

* **Prefix reuse.** Each prompt is prefilled alone on top of the longest cached prefix
  (``helpers.prefix_cache``); only the new tokens are computed. Prefill was half of a call's time.
* **What the policy sampled.** Every row comes back as a ``Sampled`` record: the exact prompt token
  ids, the sampled token ids and their log-probabilities at the sampling temperature. GRPO (06)
  trains on these records, never on text re-tokenised afterwards.
* **A value cannot be blank.** With ``nonblank=True`` the first token must contain a visible
  character, so GuidedChatAdapter's fields always parse (a blank field used to end a rollout).

Greedy decoding takes the arg-max of the raw logits, as ``generate`` does; sampling applies
temperature, then top-k, then top-p, in ``generate``'s order.
"""

from dataclasses import dataclass, field


@dataclass
class Sampled:
    """One generated row exactly as produced: what GRPO's data path trains on."""

    prompt_ids: list[int]
    ids: list[int]  # generated token ids, up to and including the one that ended the row (EOS or a stop)
    logprobs: list[float]  # log-probability of each id at ``temperature`` (0 = greedy: under the raw logits)
    temperature: float
    text: str  # decoded, cut at EOS and at the first stop string
    finish: str  # "stop" or "length"
    nonblank: bool = False  # the first token was drawn with blank tokens masked out (its log-prob is under that mask)
    tags: dict = field(default_factory=dict)  # what the caller attached (e.g. the rollout it belongs to)


def blank_tokens(tokenizer):
    """A boolean mask over the vocabulary: tokens with no visible character, special tokens, and ``[`` openers."""
    import torch

    size = len(tokenizer)
    texts = tokenizer.convert_ids_to_tokens(list(range(size)))
    decoded = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in texts]
    mask = torch.tensor([not s.strip() or s.lstrip().startswith("[") for s in decoded])
    mask[list(tokenizer.all_special_ids)] = True
    return mask


def mask_blank_first(logits, first_positions, blank_mask):
    """``logits`` [B, T, V] with blank tokens at -inf at each row's first completion position (None: unmasked)."""
    import torch

    rows = [(r, p) for r, p in enumerate(first_positions) if p is not None]
    if not rows:
        return logits
    hit = torch.zeros(logits.shape[:2], dtype=torch.bool)
    for r, p in rows:
        hit[r, p] = True
    vocab = blank_mask[: logits.shape[-1]]
    return logits.masked_fill(hit[..., None] & vocab[None, None, :], float("-inf"))


def prefill(model, ids: list[int], cache):
    """Logits after ``ids`` and their KV states, computing only what ``cache`` does not hold."""
    import torch
    from transformers import DynamicCache

    reused, kv = cache.lookup(ids) if cache is not None else (0, None)
    if reused == len(ids):  # the whole prompt is cached: recompute the last token for its logits
        reused -= 1
        kv = [(k[:, :, :reused], v[:, :, :reused]) for k, v in kv]
    past = DynamicCache(ddp_cache_data=kv) if reused else None
    new = torch.tensor([ids[reused:]])
    positions = torch.arange(reused, len(ids))[None]
    out = model(input_ids=new, past_key_values=past, position_ids=positions, use_cache=True, logits_to_keep=1)
    states = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    if cache is not None:
        cache.store(ids, states)
        cache.stats.computed_tokens += len(ids) - reused
        cache.stats.reused_tokens += reused
    return out.logits[0, -1], states


def decode(model, tokenizer, prompts: list[list[int]], sampling, stops, cache=None, generator=None,
           nonblank=None, blank_mask=None) -> list[Sampled]:
    """Generate for every prompt (token ids) in one batch; ``stops[i]`` are row i's stop strings."""
    import torch
    from transformers import DynamicCache

    n = len(prompts)
    stops = stops or [()] * n
    nonblank = nonblank or [False] * n
    first, states = zip(*(prefill(model, ids, cache) for ids in prompts))
    width = max(len(p) for p in prompts)
    layers = []
    for layer in range(len(states[0])):
        k0, v0 = states[0][layer]
        keys = k0.new_zeros((n, k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((n, v0.shape[1], width, v0.shape[3]))
        for row, kv in enumerate(states):
            keys[row, :, width - kv[layer][0].shape[2]:] = kv[layer][0][0]
            values[row, :, width - kv[layer][1].shape[2]:] = kv[layer][1][0]
        layers.append((keys, values))
    past = DynamicCache(ddp_cache_data=layers)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        attention[row, width - len(p):] = 1
    lengths = torch.tensor([len(p) for p in prompts])
    logits = torch.stack(first)
    out_ids = [[] for _ in range(n)]
    out_lps = [[] for _ in range(n)]
    finish = ["length"] * n
    active = list(range(n))  # rows still generating, in the order of the batch tensors
    eos = tokenizer.eos_token_id
    for step in range(sampling.max_tokens):
        scores = logits.float()
        if step == 0 and any(nonblank[r] for r in active):  # the same mask the trainer applies (grpo_backend)
            scores = mask_blank_first(scores[:, None], [0 if nonblank[r] else None for r in active], blank_mask)[:, 0]
        chosen, logps = _choose(scores, sampling, generator)
        done = []
        for i, row in enumerate(active):
            token = int(chosen[i])
            out_ids[row].append(token)
            out_lps[row].append(float(logps[i]))
            if token == eos:
                finish[row] = "stop"
                done.append(i)
            elif stops[row] and any(s in tokenizer.decode(out_ids[row][-16:], skip_special_tokens=True)
                                    for s in stops[row] if s):
                finish[row] = "stop"
                done.append(i)
        keep = [i for i in range(len(active)) if i not in done]
        if not keep or step == sampling.max_tokens - 1:
            break
        if done:
            index = torch.tensor(keep)
            past.batch_select_indices(index)
            attention, lengths, chosen = attention[index], lengths[index], chosen[index]
            active = [active[i] for i in keep]
        attention = torch.cat([attention, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        positions = (lengths + step)[:, None]
        logits = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=positions,
                       past_key_values=past, use_cache=True).logits[:, -1]
    results = []
    for row in range(n):
        ids = out_ids[row]
        kept = ids[: ids.index(eos)] if eos in ids else ids
        text = tokenizer.decode(kept, skip_special_tokens=True)
        for s in stops[row]:
            if s and s in text:
                text = text[: text.index(s)]
        results.append(Sampled(list(prompts[row]), ids, out_lps[row], sampling.temperature, text, finish[row],
                               bool(nonblank[row])))
    return results


def _choose(scores, sampling, generator):
    """The next token of every row and its log-probability (at the temperature; raw logits when greedy)."""
    import torch

    if sampling.greedy:
        chosen = scores.argmax(-1)
        return chosen, torch.log_softmax(scores, -1).gather(-1, chosen[:, None]).squeeze(-1)
    scaled = scores / sampling.temperature
    logps = torch.log_softmax(scaled, -1)
    filtered = scaled
    if sampling.top_k:
        kth = torch.topk(filtered, min(sampling.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(filtered, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[:, -1] = False
        filtered = filtered.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    chosen = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
    return chosen, logps.gather(-1, chosen[:, None]).squeeze(-1)
