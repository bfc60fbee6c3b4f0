"""δ-mem adapters in engine slots: created, trained by forward_backward with `segment_ids` and by
optim_step, snapshotted, exported and loaded, next to LoRA adapters in the same batches."""

import pytest
import torch
import torch.nn.functional as F

from mintd.engine.adapters import LoraSpec
from mintd.engine.delta_mem import DeltaMemRun, DeltaMemSpec, segment_attention
from mintd.engine.optim import AdamParams
from mintd.engine.train import Datum, TrainGroup
from tests.engine.delta_mem.conftest import hooked

SPEC = DeltaMemSpec(readout_init="base_slice", seed=1)
LORA = LoraSpec(rank=4, seed=0)


def episode(sessions: list[int], seed: int) -> Datum:
    """One datum: sessions of the given lengths back to back, `segment_ids` numbering them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (sum(sessions) + 1,), generator=g)
    segments = torch.cat([torch.full((n,), float(i)) for i, n in enumerate(sessions)])
    return Datum(ids[:-1], {"target_tokens": ids[1:], "segment_ids": segments})


EPISODES = [episode([5, 4, 3], 0), episode([7, 6], 1), episode([4], 2)]


def direct_loss(model, ctx, adapter, data: list[Datum]) -> torch.Tensor:
    """The token-sum cross-entropy, one episode at a time, straight through the hooks of a plain model."""
    total = torch.zeros(())
    for d in data:
        ids, segments = d.tokens[None], d.inputs["segment_ids"].long()[None]
        mask, positions = segment_attention(segments, torch.ones_like(ids, dtype=torch.bool), torch.float32)
        with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(1))):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0]
        total = total + F.cross_entropy(logits.float(), d.inputs["target_tokens"], reduction="sum")
    return total


def delta_grads(engine, slot) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in engine.slots[slot].delta_mem.named_parameters()}


def test_forward_backward_equals_the_direct_computation(engine, qwen3_dir):
    slot = engine.create_adapter(LORA, SPEC)
    assert engine.slots[slot].weights == {}  # δ-mem alone: no LoRA matrices
    out = engine.forward_backward([TrainGroup(slot, EPISODES)])[0]

    model, ctx, adapter = hooked(qwen3_dir)
    adapter.load_state_dict(engine.slots[slot].delta_mem.state_dict())
    loss = direct_loss(model, ctx, adapter, EPISODES)
    loss.backward()

    assert out.loss == pytest.approx(loss.item(), rel=1e-5)
    for name, grad in delta_grads(engine, slot).items():
        reference = dict(adapter.named_parameters())[name].grad
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in delta_grads(engine, slot).values())


def test_the_state_carries_across_sessions_that_cannot_attend(engine):
    """Two episodes equal in their last session: its logprobs differ only through the state."""
    slot = engine.create_adapter(LORA, SPEC)
    first, second = episode([6, 5], 3), episode([6, 5], 4)
    second.tokens[6:], second.inputs["target_tokens"][6:] = (
        first.tokens[6:],
        first.inputs["target_tokens"][6:],
    )
    a, b = engine.forward_backward([TrainGroup(slot, [first, second])], forward_only=True)[0].logprobs
    assert not torch.allclose(a[6:], b[6:])
    base = engine.create_adapter(LORA)  # a LoRA at B = 0 is the base: segments alone make them equal
    a, b = engine.forward_backward([TrainGroup(base, [first, second])], forward_only=True)[0].logprobs
    torch.testing.assert_close(a[6:], b[6:])


def test_micro_batches_keep_episodes_whole(engine):
    slot = engine.create_adapter(LORA, SPEC)
    whole = engine.forward_backward([TrainGroup(slot, EPISODES)])[0]
    grads = delta_grads(engine, slot)
    engine.optim_step(slot, AdamParams(learning_rate=0.0))  # clears the gradients, moves nothing
    engine.settings.micro_batch_tokens = 12  # one episode per micro-batch
    split = engine.forward_backward([TrainGroup(slot, EPISODES)])[0]
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    for name, grad in delta_grads(engine, slot).items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mixed_batch_with_lora_and_optim_step(engine):
    both = engine.create_adapter(LORA, SPEC.model_copy(update={"lora": True}))
    lora = engine.create_adapter(LoraSpec(rank=4, seed=5))
    assert engine.slots[both].weights and engine.slots[both].delta_mem is not None
    alone = [engine.forward_backward([TrainGroup(s, EPISODES)], forward_only=True)[0] for s in (both, lora)]
    mixed = engine.forward_backward(
        [TrainGroup(both, EPISODES), TrainGroup(lora, EPISODES)], forward_only=True
    )
    for one, together in zip(alone, mixed, strict=True):
        assert together.loss == pytest.approx(one.loss, rel=1e-5)

    engine.forward_backward([TrainGroup(both, EPISODES)])
    before = {s: {k: v.clone() for k, v in engine.slots[s].state_dict().items()} for s in (both, lora)}
    engine.optim_step(both, AdamParams(learning_rate=1e-2))
    after = engine.slots[both].state_dict()
    assert not torch.equal(after["delta_mem.layers.0.memory_k"], before[both]["delta_mem.layers.0.memory_k"])
    lora_b = next(k for k in after if k.endswith(".lora_B"))
    assert not torch.equal(after[lora_b], before[both][lora_b])  # B = 0 moved: the LoRA trains too
    for k, v in engine.slots[lora].state_dict().items():
        assert torch.equal(v, before[lora][k])


def test_snapshot_export_and_load_keep_the_delta_mem_weights(engine):
    slot = engine.create_adapter(LORA, SPEC)
    engine.forward_backward([TrainGroup(slot, EPISODES)])
    engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    snap = engine.snapshot(slot)
    spec, tensors = engine.export_adapter(slot, with_optimizer=True)
    loaded = engine.load_adapter(spec, tensors, delta_mem=engine.delta_mem_spec(slot))
    assert any(k.startswith("delta_mem.") and k.endswith(".exp_avg") for k in tensors)
    expected = engine.forward_backward([TrainGroup(slot, EPISODES)], forward_only=True)[0]
    for other in (snap, loaded):
        assert (
            engine.forward_backward([TrainGroup(other, EPISODES)], forward_only=True)[0].loss == expected.loss
        )
    for p in engine.slots[snap].delta_mem.parameters():
        assert not p.requires_grad
    # the optimizer state came back: one more identical step on each gives the same weights
    for trained in (slot, loaded):
        engine.forward_backward([TrainGroup(trained, EPISODES)])
        engine.optim_step(trained, AdamParams(learning_rate=1e-2))
    for k, v in engine.slots[loaded].state_dict().items():
        torch.testing.assert_close(v, engine.slots[slot].state_dict()[k], msg=k)
    # and training the source did not reach the snapshot
    assert engine.forward_backward([TrainGroup(snap, EPISODES)], forward_only=True)[0].loss == expected.loss


def test_refusals_name_the_field(engine):
    slot = engine.create_adapter(LORA, SPEC)
    bad = episode([3, 3], 0)
    bad.inputs["segment_ids"] = torch.tensor([0.0, 0, 1, 1, 0, 1])
    with pytest.raises(ValueError, match=r"data\[0\].loss_fn_inputs.segment_ids: must not decrease"):
        engine.forward_backward([TrainGroup(slot, [bad])])
    bad.inputs["segment_ids"] = torch.tensor([0.0, 0.5, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="segment_ids: must be whole numbers"):
        engine.forward_backward([TrainGroup(slot, [bad])])
    with pytest.raises(ValueError, match="adapter tensors: missing delta_mem.layers.0.memory_q"):
        engine.check_adapter(LORA, {}, SPEC)


def test_write_sparsity_adds_weight_times_each_episodes_term(engine, qwen3_dir):
    slot = engine.create_adapter(LORA, SPEC)
    config = {"delta_mem_write_sparsity": 2.0, "delta_mem_write_sparsity_target": 0.1}
    plain = engine.forward_backward([TrainGroup(slot, EPISODES)], forward_only=True)[0].loss
    group = TrainGroup(slot, EPISODES, loss_config=config)
    regular = engine.forward_backward([group], forward_only=True)[0].loss
    model, ctx, _ = hooked(qwen3_dir)
    adapter = engine.slots[slot].delta_mem
    expected = 0.0
    for d in EPISODES:  # each episode alone: its term does not depend on its batch
        ids, segments = d.tokens[None], d.inputs["segment_ids"].long()[None]
        mask, positions = segment_attention(segments, torch.ones_like(ids, dtype=torch.bool), torch.float32)
        with torch.no_grad(), ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(1))) as run:
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
            expected += 2.0 * float(run.write_sparsity(0.1)[0])
    assert expected > 0 and regular - plain == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="loss_fn_config.delta_mem_write_sparsity_target"):
        bad = {"delta_mem_write_sparsity_target": 1.5}
        engine.forward_backward([TrainGroup(slot, EPISODES, loss_config=bad)])
