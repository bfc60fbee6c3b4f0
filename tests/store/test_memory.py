"""The δ-mem state blob: exact round trip (a restart continues bit for bit) and refusals of other bytes."""

import pytest
import torch

from mintd.store.memory import MemoryState, pack_memory, read_memory


def test_a_state_round_trips_bit_for_bit() -> None:
    state = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    memory = MemoryState(state, 41, (5, 0, 2**31 - 1, 7), "alice/dm.mem.ann")
    data = pack_memory(memory)
    back = read_memory(data)
    assert torch.equal(back.state, state) and back.state.dtype == torch.float32
    assert (back.tokens_written, back.session, back.layers, back.rank) == (41, (5, 0, 2**31 - 1, 7), 3, 8)
    assert back.instance == "alice/dm.mem.ann"
    assert pack_memory(back) == data
    empty = read_memory(pack_memory(MemoryState(torch.zeros(2, 4, 4), 0, (), "a/b")))
    assert empty.session == () and not empty.state.any()


def test_other_bytes_are_refused() -> None:
    data = pack_memory(MemoryState(torch.zeros(2, 4, 4), 3, (1, 2, 3), "a/b"))
    with pytest.raises(ValueError, match="bad magic"):
        read_memory(b"PACKED" + data)
    with pytest.raises(ValueError, match="the header describes"):
        read_memory(data[:-4])
    with pytest.raises(ValueError, match="format 2"):
        read_memory(data.replace(b'"format": 1', b'"format": 2'))
