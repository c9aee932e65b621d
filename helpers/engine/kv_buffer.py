"""Where a ``decoding.RunningBatch`` keeps its rows' attention states: one preallocated buffer per layer.

Layout: per layer, keys and values of shape ``[slots, kv_heads, columns, head_dim]``. Rows are right-aligned, so
every row's latest token sits in column ``width - 1`` and a decode step writes one column for all rows in place
(``DynamicCache`` copied the whole cache with ``torch.cat`` at every step: a quarter of a 16-row step). Columns left
of a row's ``starts[slot]`` are not its own and are masked out. Slot ``i`` holds row ``i`` of the batch.

The model sees the buffer through ``cache``: a ``DynamicCache`` whose layers write into these tensors. Growing it
replaces one layer's tensors at a time and gives the freed pages back to the system (``_reserve``): at 16 rows the old
and new tensors together had been the engine's memory peak.
"""

import functools


class KVBuffer:
    """Right-aligned attention states of the rows of a running batch (see the module docstring)."""

    def __init__(self):
        self.layers = None  # per layer (keys, values), allocated from the first row's states
        self.width = 0  # columns in use
        self.starts = []  # starts[slot]: the row's first column
        self.cache = None  # what the model's forward is given (see ``step_view``)

    def __len__(self):
        return len(self.starts)

    def append(self, states) -> int:
        """Put one row's states (per layer ``(keys, values)`` of shape ``[1, heads, length, dim]``) in the next slot."""
        length = states[0][0].shape[2]
        if self.layers is not None and len(states) != len(self.layers):
            raise ValueError(f"a row with {len(states)} layers cannot join a batch of {len(self.layers)}")
        shift = max(0, length - self.width)  # a longer prompt: every row moves right by the difference
        if not self._reserve(len(self) + 1, self.width + shift + 1, states, shift) and shift:
            self._shift(0, shift)
        slot, start = len(self), self.width - length
        for (keys, values), (k, v) in zip(self.layers, states):
            keys[slot, :, start:self.width] = k[0]
            values[slot, :, start:self.width] = v[0]
        self.starts.append(start)
        return slot

    def row_states(self, slot):
        """A copy of one row's states, shaped as ``append`` takes them (for the prefix cache)."""
        start = self.starts[slot]
        return [(keys[slot:slot + 1, :, start:self.width].clone(), values[slot:slot + 1, :, start:self.width].clone())
                for keys, values in self.layers]

    def remove(self, slot):
        """Drop the row in ``slot``: the last row moves into it (one row copied, not the batch)."""
        last = len(self) - 1
        if slot != last:
            start = self.starts[last]
            for keys, values in self.layers:
                keys[slot, :, start:self.width] = keys[last, :, start:self.width]
                values[slot, :, start:self.width] = values[last, :, start:self.width]
            self.starts[slot] = start
        self.starts.pop()
        if not self.starts:
            self.width = 0

    def step_view(self):
        """Before a forward over all rows: ``(attention mask [rows, width + 1], cache)``; ``advance()`` after it."""
        import torch

        self._compact()
        rows = len(self)
        self._reserve(rows, self.width + 1)
        attention = torch.zeros((rows, self.width + 1), dtype=torch.long)
        for slot, start in enumerate(self.starts):
            attention[slot, start:] = 1
        for layer in self.cache.layers:
            layer.view(rows, self.width)
        return attention, self.cache

    def advance(self):
        """The forward wrote one column for every row."""
        self.width += 1

    def _reserve(self, slots, columns, states=None, shift=0) -> bool:
        """Make room for ``slots`` rows and ``columns`` columns; True if that took new tensors (the rows copied into
        them ``shift`` columns to the right). Grown with headroom, so this rarely copies. The first call takes the
        layer count, head count, head size, dtype and device from a row's ``states``.

        One layer at a time: its new tensors are made and filled, then its old ones dropped, so growing holds one
        layer twice, not the whole buffer (at 16 rows the two whole buffers were the engine's memory peak)."""
        import torch
        from transformers import DynamicCache

        have_slots, have_columns = self.layers[0][0].shape[::2] if self.layers else (0, 0)
        if slots <= have_slots and columns <= have_columns:
            return False
        slots = max(slots, 2 * have_slots) if slots > have_slots else have_slots
        columns = columns + max(64, columns // 4) if columns > have_columns else have_columns
        like = (self.layers or states)[0][0]
        shape, kind = (slots, like.shape[1], columns, like.shape[3]), dict(dtype=like.dtype, device=like.device)
        del like
        self.cache = None  # its layers are views of the old tensors: they would keep them alive
        self.layers = self.layers or [None] * len(states)
        for i in range(len(self.layers)):
            self.layers[i] = self._grown(self.layers[i], shape, kind, shift)
            _give_back_freed_memory()
        self.starts = [start + shift for start in self.starts]
        self.width += shift
        self.cache = DynamicCache()
        self.cache.layers = [_buffer_layer_class()(keys, values) for keys, values in self.layers]
        return True

    def _grown(self, old, shape, kind, shift):
        """One layer's new ``(keys, values)`` of ``shape``, holding the rows of ``old`` (None: empty) moved by ``shift``."""
        import torch

        keys, values = torch.zeros(shape, **kind), torch.zeros(shape, **kind)
        if old is not None:
            n = len(self)
            keys[:n, :, shift:shift + self.width] = old[0][:n, :, : self.width]
            values[:n, :, shift:shift + self.width] = old[1][:n, :, : self.width]
        return keys, values

    def _compact(self):
        """Drop the leading columns no row uses any more, once they are a quarter of the width (one copy)."""
        unused = min(self.starts)
        if unused >= max(64, self.width // 4):
            self._shift(unused, -unused)

    def _shift(self, first, offset):
        """Move columns ``first`` to ``width`` of every row by ``offset`` (right if positive; capacity is reserved)."""
        n, end = len(self), self.width + offset
        for keys, values in self.layers:
            keys[:n, :, first + offset:end] = keys[:n, :, first:self.width].clone()
            values[:n, :, first + offset:end] = values[:n, :, first:self.width].clone()
        self.starts = [start + offset for start in self.starts]
        self.width = end


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: macOS and musl lack it, Windows has no ``CDLL(None)``)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _give_back_freed_memory():
    """Return the pages of freed tensors to the system now (glibc keeps freed blocks of a few MB for reuse, and a
    layer's next, larger tensors do not fit in them: without this, growing the buffer added its old size to RSS)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer over a ``KVBuffer``'s tensors: ``update`` writes the new columns in place, no copy."""

        def __init__(self, keys, values):
            super().__init__()
            self.buffer, self.rows, self.width, self.is_initialized = (keys, values), 0, 0, True
            self.dtype, self.device = keys.dtype, keys.device

        def view(self, rows, width):
            """Show the model ``rows`` rows and ``width`` columns, the next update writing at column ``width``."""
            self.rows, self.width = rows, width
            self.keys, self.values = self.buffer[0][:rows, :, :width], self.buffer[1][:rows, :, :width]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.width + key_states.shape[2]
            self.buffer[0][: self.rows, :, self.width:end] = key_states
            self.buffer[1][: self.rows, :, self.width:end] = value_states
            self.view(self.rows, end)
            return self.keys, self.values

    return BufferLayer
