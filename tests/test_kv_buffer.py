"""The running batch's attention buffer, on plain tensors: where each row's states sit as rows join and leave."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.engine.kv_buffer import KVBuffer

LAYERS, HEADS, DIM = 2, 3, 4


def states(row_id, length):
    """A row's states whose values say which row and which of its tokens they belong to."""
    token = torch.arange(length, dtype=torch.float32)[None, None, :, None].expand(1, HEADS, length, DIM)
    return [(row_id * 1000 + layer * 100 + token, -(row_id * 1000 + layer * 100 + token)) for layer in range(LAYERS)]


def held(buffer, slot):
    return buffer.row_states(slot)


def same(a, b):
    return all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_rows_stay_right_aligned_and_whole_through_joins_steps_and_leaves():
    buffer = KVBuffer()
    assert buffer.append(states(1, 5)) == 0
    assert buffer.append(states(2, 9)) == 1  # longer: row 1 moves right
    assert buffer.starts == [4, 0] and buffer.width == 9
    assert same(held(buffer, 0), states(1, 5)) and same(held(buffer, 1), states(2, 9))
    attention, cache = buffer.step_view()
    assert attention.tolist() == [[0] * 4 + [1] * 6, [1] * 10]
    assert cache.get_seq_length() == 9 and cache.get_mask_sizes(1, 0) == (10, 0)  # what the model asks the cache
    new = torch.full((2, HEADS, 1, DIM), 7.0)
    keys, _ = cache.layers[0].update(new, -new)  # what the model's attention does in a step
    assert keys.shape == (2, HEADS, 10, DIM) and torch.equal(keys[:, :, -1:], new)
    buffer.advance()
    assert buffer.append(states(3, 2)) == 2 and buffer.starts == [4, 0, 8]  # a third slot: new tensors
    assert torch.equal(held(buffer, 1)[0][0][:, :, 9:], new[1:])  # the column the step wrote came along
    attention, cache = buffer.step_view()  # the model is given the new tensors
    cache.layers[0].update(new[:1].expand(3, -1, -1, -1) * 2, new[:1].expand(3, -1, -1, -1))
    buffer.advance()
    assert torch.equal(buffer.layers[0][0][:3, :, 10], torch.full((3, HEADS, DIM), 14.0))
    buffer.remove(0)  # the last row takes slot 0
    assert buffer.starts == [8, 0] and torch.equal(held(buffer, 0)[1][0][:, :, :2], states(3, 2)[1][0])
    assert torch.equal(held(buffer, 1)[0][0][:, :, :9], states(2, 9)[0][0])
    buffer.remove(1)  # the last slot itself
    assert buffer.starts == [8] and torch.equal(held(buffer, 0)[0][0][:, :, :2], states(3, 2)[0][0])
    tensors = buffer.layers[0][0]
    buffer.remove(0)
    assert buffer.width == 0 and buffer.append(states(4, 20)) == 0  # empty again: the same tensors are reused
    assert buffer.layers[0][0] is tensors and buffer.starts == [0] and same(held(buffer, 0), states(4, 20))


def test_a_longer_prompt_shifts_in_place_when_there_is_room():
    buffer = KVBuffer()
    for row in (1, 2, 3):
        buffer.append(states(row, 40))
    tensors = buffer.layers[0][0]
    assert tensors.shape[:3] == (4, HEADS, 40 + 1 + 64)  # slots doubled, columns with headroom
    buffer.append(states(4, 60))  # fits: every row moves right inside the same tensors
    assert buffer.layers[0][0] is tensors and buffer.starts == [20, 20, 20, 0]
    assert all(same(held(buffer, slot), states(slot + 1, 40)) for slot in range(3)) and same(held(buffer, 3), states(4, 60))
    buffer.append(states(5, 61))  # a fifth slot: new tensors, rows copied
    assert buffer.layers[0][0] is not tensors and buffer.starts == [21, 21, 21, 1, 0]
    assert same(held(buffer, 0), states(1, 40)) and same(held(buffer, 4), states(5, 61))


def test_columns_no_row_uses_are_dropped():
    buffer = KVBuffer()
    buffer.append(states(1, 200))
    buffer.append(states(2, 10))
    buffer.remove(0)  # the long row leaves: 190 leading columns unused
    attention, _ = buffer.step_view()
    assert buffer.width == 10 and buffer.starts == [0] and same(held(buffer, 0), states(2, 10))
    assert attention.tolist() == [[1] * 11]


GROWTH_SCRIPT = r"""
import threading, torch
from helpers.engine.kv_buffer import KVBuffer
from helpers.util.timing import process_memory_mb

layers, heads, dim, length = 30, 3, 64, 300  # SmolLM2-135M's attention states, fp32
row = [(torch.ones(1, heads, length, dim), torch.ones(1, heads, length, dim)) for _ in range(layers)]
start = process_memory_mb("VmRSS")
buffer = KVBuffer()
kept = []  # copies of a row, kept as the prefix cache keeps rows that left: blocks allocated after the buffer's


def serve():  # on another thread, as the engine's worker does (glibc gives it its own arena)
    for _ in range(16):  # the engine's max_batch: slots 1, 2, 4, 8, 16
        buffer.append(row)
    for _ in range(2):
        tensors = buffer.layers[0][0]
        while buffer.layers[0][0] is tensors:  # decode steps until the columns run out and the buffer grows
            buffer.step_view()
            buffer.advance()
            kept[:] = (kept + [buffer.row_states(0)])[-2:]


worker = threading.Thread(target=serve)
worker.start()
worker.join()
final = sum(k.nbytes + v.nbytes for k, v in buffer.layers + [s for row in kept for s in row]) / 2**20
print(final, process_memory_mb("VmHWM") - start)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from /proc (Linux)")
@pytest.mark.slow  # a child process loads torch and a model-sized buffer
def test_growing_the_buffer_never_holds_the_old_and_the_new_tensors_whole():
    """Growing replaces one layer at a time: at the peak, the buffer's final size plus a layer's old tensors.

    Copying all layers before dropping the old ones held both buffers at once: at 16 rows, 341 MB + 427 MB in the
    24-claim evaluation, the peak of the engine's memory (benchmarks/RESULTS.md#memory). Measured here for a 456 MB
    buffer and its copies: 858 MB over the start that way, 512 MB one layer at a time.
    """
    out = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    final_mb, peak_mb = map(float, out.split())
    assert peak_mb <= final_mb * (1 + 2 / 30) + 64, (final_mb, peak_mb)
