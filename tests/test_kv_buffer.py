"""The running batch's attention buffer, on plain tensors: where each row's states sit as rows join and leave."""

import torch

from helpers.kv_buffer import KVBuffer

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
