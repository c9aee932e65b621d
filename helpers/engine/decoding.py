"""The engine's decode loop: prefill each prompt (reusing cached prefixes), then decode all rows together.

It replaces ``model.generate`` for four reasons (measured in benchmarks/lm_throughput.py):

* **Prefix reuse.** Each prompt is prefilled alone on top of the longest cached prefix
  (``helpers.engine.prefix_cache``); only the new tokens are computed. A row that ends leaves its prompt + output
  in the cache, so the next field call, which continues it, computes only the few marker tokens.
* **Continuous batching.** ``RunningBatch``: a row leaves the batch when it ends and a new prompt joins at
  the next step, so no caller waits for the longest row of a batch it happened to start with.
* **What the policy sampled.** Every row comes back as a ``Sampled`` record: the exact prompt token
  ids, the sampled token ids and their log-probabilities at the sampling temperature. GRPO (06)
  trains on these records, never on text re-tokenised afterwards.
* **A value cannot be blank.** With ``nonblank=True`` the first token must contain a visible
  character, so GuidedChatAdapter's fields always parse (a blank field would end the rollout).

Greedy decoding takes the arg-max of the raw logits, as ``generate`` does; sampling applies
temperature, then top-k, then top-p, in ``generate``'s order.
"""

from dataclasses import dataclass, field

from helpers.engine.kv_buffer import KVBuffer


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


def decode(model, tokenizer, prompts: list[list[int]], sampling, stops=None, cache=None, generator=None,
           nonblank=None, blank_mask=None) -> list[Sampled]:
    """Generate for every prompt (token ids) together, until all are done; ``stops[i]`` are row i's stop strings."""
    batch = RunningBatch(model, tokenizer, sampling, cache, generator, blank_mask)
    stops, nonblank = stops or [()] * len(prompts), nonblank or [False] * len(prompts)
    rows = [batch.add(ids, sampling.max_tokens, stops[i], bool(nonblank[i])) for i, ids in enumerate(prompts)]
    while len(batch):
        batch.step()
    return [row.result for row in rows]


@dataclass
class Row:
    """One prompt being generated inside a ``RunningBatch``; ``result`` is set when it is done."""

    prompt_ids: list[int]
    max_tokens: int
    stops: tuple = ()
    nonblank: bool = False
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    result: Sampled | None = None
    owner: object = None  # what the caller attached (the engine: the waiting job)


class RunningBatch:
    """Continuous batching: rows join whenever they arrive and leave when done; every ``step`` decodes one token of each.

    A static batch runs until its longest row ends, so the rows that finished early wait idle, and so do the
    callers whose next call depends on them. Here a row leaves at once and a new prompt joins at the next step
    (prefilled on top of its longest cached prefix). The rows' attention states live in a ``KVBuffer`` (slot i holds
    ``rows[i]``). One sampling setting per batch (the engine keeps other settings waiting); ``max_tokens`` and the
    stop strings are per row.
    """

    def __init__(self, model, tokenizer, sampling, cache=None, generator=None, blank_mask=None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.cache, self.generator, self.blank_mask = cache, generator, blank_mask
        self.rows: list[Row] = []
        self.states = KVBuffer()
        self.logits = None  # [rows, vocab]: what each row's next token is drawn from
        self.steps = 0  # forward passes over the batch (benchmarks: rows per step)
        self.row_steps = 0

    def __len__(self):
        return len(self.rows)

    @property
    def width(self):
        """Columns of the attention buffer in use (tests: compaction)."""
        return self.states.width

    def add(self, prompt_ids, max_tokens, stops=(), nonblank=False, owner=None) -> Row:
        """Prefill ``prompt_ids`` (reusing cached prefixes) and enter the batch; it decodes from the next ``step``."""
        import torch

        logits, states = prefill(self.model, prompt_ids, self.cache)
        slot = self.states.append(states)
        assert slot == len(self.rows)  # slot i holds rows[i]
        row = Row(list(prompt_ids), max_tokens, tuple(stops or ()), nonblank, owner=owner)
        self.rows.append(row)
        self.logits = logits[None] if self.logits is None else torch.cat([self.logits, logits[None]])
        return row

    def step(self) -> list[Row]:
        """Choose every row's next token; return the rows that ended, and run the others one position on."""
        import torch

        if not self.rows:
            return []
        scores = self.logits.float()
        first = [0 if r.nonblank and not r.ids else None for r in self.rows]
        if any(f is not None for f in first):  # the same mask the trainer applies (lora_policy)
            scores = mask_blank_first(scores[:, None], first, self.blank_mask)[:, 0]
        chosen, logps = _choose(scores, self.sampling, self.generator)
        ended = []
        for slot, row in enumerate(self.rows):
            row.ids.append(int(chosen[slot]))
            row.logprobs.append(float(logps[slot]))
            if self._ended(row):
                ended.append(slot)
        done = [self._leave(slot) for slot in reversed(ended)][::-1]
        if not self.rows:
            self.logits = None
            return done
        attention, past = self.states.step_view()
        tokens = torch.tensor([[row.ids[-1]] for row in self.rows])
        positions = torch.tensor([[len(row.prompt_ids) + len(row.ids) - 1] for row in self.rows])
        self.logits = self.model(input_ids=tokens, attention_mask=attention, position_ids=positions,
                                 past_key_values=past, use_cache=True).logits[:, -1]
        self.states.advance()
        self.steps, self.row_steps = self.steps + 1, self.row_steps + len(self.rows)
        return done

    def _ended(self, row) -> bool:
        """Set ``row.result`` if its last token ended it (end-of-text, a stop string, or its token budget)."""
        eos, finish = self.tokenizer.eos_token_id, None
        if row.ids[-1] == eos:
            finish = "stop"
        elif row.stops and any(s in self.tokenizer.decode(row.ids[-16:], skip_special_tokens=True) for s in row.stops if s):
            finish = "stop"
        elif len(row.ids) >= row.max_tokens:
            finish = "length"
        if finish is None:
            return False
        kept = row.ids[: row.ids.index(eos)] if eos in row.ids else row.ids
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        for s in row.stops:
            if s and s in text:
                text = text[: text.index(s)]
        row.result = Sampled(row.prompt_ids, row.ids, row.logprobs, self.sampling.temperature, text, finish, row.nonblank)
        return True

    def _leave(self, slot) -> Row:
        """Take the row in ``slot`` out (during ``step``, before the next forward); the last row moves into its slot.
        Its prompt + output go to the prefix cache first, for a next call that continues it (GuidedChatAdapter's)."""
        row = self.rows[slot]
        if self.cache is not None:
            self.cache.store(row.prompt_ids + row.ids[:-1], self.states.row_states(slot))
        self.states.remove(slot)
        self.rows[slot] = self.rows[-1]
        self.rows.pop()
        return row


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
