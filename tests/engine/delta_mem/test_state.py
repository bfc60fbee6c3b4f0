"""A state's bytes, digest and transcript chain: restart continues bit for bit, replay reproduces it."""

import pytest
import torch

from mintd.engine.delta_mem import DeltaMemRun
from mintd.engine.delta_mem.state import GENESIS, chain, state_bytes, state_digest, state_from_bytes
from tests.engine.delta_mem.conftest import hooked, tokens


def test_bytes_round_trip_exactly_and_refuse_another_shape():
    state = torch.randn(3, 8, 8)
    data = state_bytes(state)
    assert len(data) == 3 * 8 * 8 * 4
    assert torch.equal(state_from_bytes(data, 3, 8), state)
    with pytest.raises(ValueError, match="expected 1024"):
        state_from_bytes(data, 4, 8)
    with pytest.raises(ValueError, match="layers, r, r"):
        state_bytes(torch.zeros(2, 3, 8, 8))


def test_chain_depends_on_every_token_and_its_order():
    one = chain(GENESIS, [5, 6, 7])
    assert one == chain(GENESIS, [5, 6, 7]) != chain(GENESIS, [5, 7, 6])
    assert chain(one, [8]) != chain(GENESIS, [5, 6, 7, 8])  # segment boundaries are part of the transcript


def test_restart_from_the_bytes_continues_bit_for_bit_and_replay_reproduces_the_digest(qwen3_dir):
    model, ctx, adapter = hooked(qwen3_dir)
    turns = [tokens(1, n, seed=20 + i) for i, n in enumerate((9, 5, 7))]

    def session(state, segments):
        outputs = []
        for ids in segments:
            with ctx.use(DeltaMemRun.start(adapter, state)) as run:
                outputs.append(model(input_ids=ids).logits)
            state = run.state()
        return outputs, state

    outputs, final = session(adapter.empty_state(1), turns)
    _, after_two = session(adapter.empty_state(1), turns[:2])
    reloaded = state_from_bytes(state_bytes(after_two[0]), len(adapter.layer_ids), adapter.spec.rank)
    restarted, restarted_final = session(reloaded.unsqueeze(0), turns[2:])
    assert torch.equal(restarted[0], outputs[2]) and torch.equal(restarted_final, final)
    _, replayed = session(adapter.empty_state(1), turns)
    assert state_digest(replayed[0]) == state_digest(final[0])
