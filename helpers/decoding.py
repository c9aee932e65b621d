"""The engine's decode loop: prefill each prompt (reusing cached prefixes), then decode all rows together.

It replaces ``model.generate`` for four reasons (measured in benchmarks/lm_throughput.py):

* **Prefix reuse.** Each prompt is prefilled alone on top of the longest cached prefix
  (``helpers.prefix_cache``); only the new tokens are computed. A row that ends leaves its prompt + output
  in the cache, so the next field call, which continues it, computes only the few marker tokens.
* **Continuous batching.** ``RunningBatch``: a row leaves the batch when it ends and a new prompt joins at
  the next step, so no caller waits for the longest row of a batch it happened to start with.
* **What the policy sampled.** Every row comes back as a ``Sampled`` record: the exact prompt token
  ids, the sampled token ids and their log-probabilities at the sampling temperature. GRPO (06)
  trains on these records, never on text re-tokenised afterwards.
* **A value cannot be blank.** With ``nonblank=True`` the first token must contain a visible
  character, so GuidedChatAdapter's fields always parse (a blank field used to end a rollout).

Greedy decoding takes the arg-max of the raw logits, as ``generate`` does; sampling applies
temperature, then top-k, then top-p, in ``generate``'s order.
"""

import functools
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
    """Generate for every prompt (token ids) together, until all are done; ``stops[i]`` are row i's stop strings."""
    batch = RunningBatch(model, tokenizer, sampling, cache, generator, blank_mask)
    rows = [batch.add(ids, sampling.max_tokens, (stops or [()] * len(prompts))[i], bool((nonblank or [False] * len(prompts))[i]))
            for i, ids in enumerate(prompts)]
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
    start: int = 0  # the first column of its states in the batch's buffers
    result: Sampled | None = None
    owner: object = None  # what the caller attached (the engine: the waiting job)


class RunningBatch:
    """Continuous batching: rows join whenever they arrive and leave when done; every ``step`` decodes one token of each.

    A static batch runs until its longest row ends, so the rows that finished early wait idle, and so do the
    callers whose next call depends on them. Here a row leaves at once and a new prompt joins at the next step
    (prefilled on top of its longest cached prefix). All rows' attention states live in one preallocated buffer
    per layer, right-aligned so that every row's latest token sits in the same column: a step writes one column,
    where ``DynamicCache`` copied the whole cache (``torch.cat``) at every step. Columns left of a row's ``start``
    are masked out. One sampling setting per batch (the engine keeps other settings waiting); ``max_tokens`` and the
    stop strings are per row.
    """

    def __init__(self, model, tokenizer, sampling, cache=None, generator=None, blank_mask=None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.cache, self.generator, self.blank_mask = cache, generator, blank_mask
        self.rows: list[Row] = []  # row i's states are in slot i of the buffers
        self.width = 0  # columns in use; every row's latest token is in column width - 1
        self.buffers = None  # per layer (keys, values): [slots, heads, columns, head_dim]
        self.logits = None  # [rows, vocab]: what each row's next token is drawn from
        self.steps = 0  # forward passes over the batch (benchmarks: rows per step)
        self.row_steps = 0

    def __len__(self):
        return len(self.rows)

    def add(self, prompt_ids, max_tokens, stops=(), nonblank=False, owner=None) -> Row:
        """Prefill ``prompt_ids`` (reusing cached prefixes) and enter the batch; it decodes from the next ``step``."""
        import torch

        logits, states = prefill(self.model, prompt_ids, self.cache)
        row = Row(list(prompt_ids), max_tokens, tuple(stops or ()), nonblank, owner=owner)
        length = len(prompt_ids)
        if self.width < length:  # room on the left for the longer prompt: shift every row right
            self._reserve(len(self.rows) + 1, length + 1, shift=length - self.width)
            self.width = length
        else:
            self._reserve(len(self.rows) + 1, self.width + 1)
        slot, row.start = len(self.rows), self.width - length
        for (keys, values), (k, v) in zip(self.buffers, states):
            keys[slot, :, row.start:self.width] = k[0]
            values[slot, :, row.start:self.width] = v[0]
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
        if any(f is not None for f in first):  # the same mask the trainer applies (grpo_backend)
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
            self.width, self.logits = 0, None
            return done
        self._compact()
        n = len(self.rows)
        self._reserve(n, self.width + 1)
        attention = torch.zeros((n, self.width + 1), dtype=torch.long)
        for slot, row in enumerate(self.rows):
            attention[slot, row.start:] = 1
        tokens = torch.tensor([[row.ids[-1]] for row in self.rows])
        positions = torch.tensor([[len(row.prompt_ids) + len(row.ids) - 1] for row in self.rows])
        past = _BufferCache(self.buffers, n, self.width)
        self.logits = self.model(input_ids=tokens, attention_mask=attention, position_ids=positions,
                                 past_key_values=past, use_cache=True).logits[:, -1]
        self.width += 1
        self.steps, self.row_steps = self.steps + 1, self.row_steps + n
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
        """Take the row in ``slot`` out (during ``step``, before the next forward): the last row moves into its slot,
        one row's states copied, not the batch's. The ended row's states go to the prefix cache first."""
        row, last = self.rows[slot], len(self.rows) - 1
        if self.cache is not None:  # its prompt + output, for a next call that continues it (GuidedChatAdapter's)
            self.cache.store(row.prompt_ids + row.ids[:-1], [(keys[slot:slot + 1, :, row.start:self.width].clone(),
                                                              values[slot:slot + 1, :, row.start:self.width].clone())
                                                             for keys, values in self.buffers])
        if slot != last:
            moved = self.rows[last]
            for keys, values in self.buffers:
                keys[slot, :, moved.start:self.width] = keys[last, :, moved.start:self.width]
                values[slot, :, moved.start:self.width] = values[last, :, moved.start:self.width]
            self.rows[slot] = moved
        self.rows.pop()
        return row

    def _reserve(self, slots, columns, shift=0):
        """Make the buffers hold ``slots`` rows and ``columns`` columns; ``shift`` moves the used columns right."""
        import torch

        have_slots, have_columns = (self.buffers[0][0].shape[0], self.buffers[0][0].shape[2]) if self.buffers else (0, 0)
        if self.buffers and not shift and slots <= have_slots and columns <= have_columns:
            return
        grown_slots = max(slots, have_slots)
        if slots > have_slots:
            grown_slots = max(slots, 2 * have_slots)
        grown_columns = max(columns, have_columns) if columns <= have_columns else columns + max(64, columns // 4)
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        fresh = []
        for layer in range(config.num_hidden_layers):
            keys = torch.zeros((grown_slots, heads, grown_columns, head_dim), dtype=dtype)
            values = torch.zeros_like(keys)
            if self.buffers:
                n = len(self.rows)
                keys[:n, :, shift:shift + self.width] = self.buffers[layer][0][:n, :, :self.width]
                values[:n, :, shift:shift + self.width] = self.buffers[layer][1][:n, :, :self.width]
            fresh.append((keys, values))
        self.buffers = fresh
        for row in self.rows:
            row.start += shift

    def _compact(self):
        """Drop the leading columns no row uses any more, once they are a quarter of the width (one copy)."""
        unused = min(row.start for row in self.rows)
        if unused < max(64, self.width // 4):
            return
        n, kept = len(self.rows), self.width - unused
        for keys, values in self.buffers:
            keys[:n, :, :kept] = keys[:n, :, unused:self.width].clone()
            values[:n, :, :kept] = values[:n, :, unused:self.width].clone()
        for row in self.rows:
            row.start -= unused
        self.width = kept


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer over a ``RunningBatch`` buffer: ``update`` writes the new column in place, no copy."""

        def __init__(self, keys, values, rows, width):
            super().__init__()
            self.buffer, self.rows, self.width, self.is_initialized = (keys, values), rows, width, True
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys[:rows, :, :width], values[:rows, :, :width]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.width + key_states.shape[2]
            self.buffer[0][: self.rows, :, self.width:end] = key_states
            self.buffer[1][: self.rows, :, self.width:end] = value_states
            self.width = end
            self.keys, self.values = self.buffer[0][: self.rows, :, :end], self.buffer[1][: self.rows, :, :end]
            return self.keys, self.values

    return BufferLayer


def _BufferCache(buffers, rows, width):
    """A ``DynamicCache`` whose layers write into the batch's buffers (the model's cache interface, no copies)."""
    from transformers import DynamicCache

    layer = _buffer_layer_class()
    past = DynamicCache()
    past.layers = [layer(keys, values, rows, width) for keys, values in buffers]
    return past


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
