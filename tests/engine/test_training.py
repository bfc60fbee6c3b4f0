"""Training invariants: isolation between adapters, accumulation, snapshots, state round trips."""

import pytest
import torch

from mintd.engine.adapters import LoraSpec
from mintd.engine.optim import AdamParams
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.train import Datum, TrainGroup
from tests.engine.conftest import next_token_datum

TEXTS = ["The cat sat on the mat.", "3 + 4 = 7", "Red, green and blue.", "User: hi", "A dog ran far away."]


def data(engine, texts=TEXTS) -> list[Datum]:
    return [next_token_datum(engine.tokenizer.encode(t)) for t in texts]


def rl_data(engine) -> list[Datum]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for d in data(engine):
        n = len(d.tokens)
        out.append(
            Datum(
                d.tokens,
                {
                    "target_tokens": d.inputs["target_tokens"],
                    "logprobs": -torch.rand(n, generator=gen) * 3,
                    "advantages": torch.randn(n, generator=gen),
                    "sequence_ratio_mask": (torch.arange(n) >= n // 2).float(),
                    "sampled_mask": torch.ones(n),
                },
            )
        )
    return out


def snapshot_tensors(engine, slot) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.slots[slot].state_dict().items()}


def grads(engine, slot) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in engine.slots[slot].params]


def test_step_touches_only_the_stepped_adapter(engine):
    a, b, c = (engine.create_adapter(LoraSpec(rank=r, seed=r)) for r in (4, 8, 4))
    engine.forward_backward([TrainGroup(a, data(engine)), TrainGroup(b, data(engine))])
    before_b, before_c, grads_b = snapshot_tensors(engine, b), snapshot_tensors(engine, c), grads(engine, b)
    before_a = snapshot_tensors(engine, a)

    metrics = engine.optim_step(a, AdamParams(learning_rate=1e-2, weight_decay=0.5, grad_clip_norm=1e-3))

    assert metrics["grad_norm"] > 1e-3  # clipping was active
    assert any(not torch.equal(before_a[k], v) for k, v in engine.slots[a].state_dict().items())
    for slot, before in ((b, before_b), (c, before_c)):
        for k, v in engine.slots[slot].state_dict().items():
            assert torch.equal(before[k], v), f"slot {slot} {k} changed"
    # b's accumulated gradients were neither clipped nor cleared by a's step; c never had any
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_b, engine.slots[b].params, strict=True))
    assert all(p.grad is None for p in engine.slots[c].params)
    assert all(p.grad is None for p in engine.slots[a].params)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "gspo", "stable_reinforce"])
def test_micro_batches_equal_one_full_batch(engine, loss_fn):
    batch = data(engine) if loss_fn == "cross_entropy" else rl_data(engine)
    full = engine.create_adapter(LoraSpec(rank=8, seed=3))
    micro = engine.create_adapter(LoraSpec(rank=8, seed=3))
    tiny = engine.create_adapter(LoraSpec(rank=8, seed=3))

    out_full = engine.forward_backward([TrainGroup(full, batch, loss_fn)])[0]
    losses = [
        engine.forward_backward([TrainGroup(micro, batch[i : i + 2], loss_fn)])[0].loss for i in (0, 2, 4)
    ]
    engine.settings.micro_batch_tokens = 8  # the engine's own split: about one row per forward
    out_tiny = engine.forward_backward([TrainGroup(tiny, batch, loss_fn)])[0]

    assert sum(losses) == pytest.approx(out_full.loss, rel=1e-5)
    assert out_tiny.loss == pytest.approx(out_full.loss, rel=1e-5)
    for p_full, p_micro, p_tiny in zip(*(engine.slots[s].params for s in (full, micro, tiny)), strict=True):
        torch.testing.assert_close(p_micro.grad, p_full.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p_tiny.grad, p_full.grad, rtol=1e-4, atol=1e-6)
    for s in (full, micro, tiny):
        engine.optim_step(s, AdamParams(learning_rate=1e-3))
    for p_full, p_micro in zip(engine.slots[full].params, engine.slots[micro].params, strict=True):
        torch.testing.assert_close(p_micro, p_full, rtol=1e-5, atol=1e-6)


def forward_shapes(engine, groups) -> tuple[list, list[float]]:
    """The input shape of each forward pass one merged call makes, and its groups' losses."""
    shapes = []
    hook = engine.model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        merged = engine.forward_backward(groups, forward_only=True)
    finally:
        hook.remove()
    return shapes, [o.loss for o in merged]


def test_merged_runs_use_micro_batches_no_larger_than_alone(engine, monkeypatch):
    """Several runs' groups in one call (the scheduler merges them) run in micro-batches no larger than
    the largest group alone, above `merge_min_tokens`: merging never raises peak memory there. Each
    group's loss equals its solo loss."""
    monkeypatch.setattr(engine.settings, "merge_min_tokens", 1)
    batch = data(engine)
    slots = [engine.create_adapter(LoraSpec(rank=4, seed=s)) for s in (0, 1, 2)]
    groups = [TrainGroup(slots[0], batch[:2]), TrainGroup(slots[1], batch), TrainGroup(slots[2], batch[3:])]
    alone = len(batch) * max(len(d.tokens) for d in batch)  # the largest group, padded
    solo = [engine.forward_backward([g], forward_only=True)[0].loss for g in groups]
    shapes, merged = forward_shapes(engine, groups)
    assert engine.settings.micro_batch_tokens > 3 * alone  # the budget alone would allow one forward
    assert len(shapes) > 1 and all(rows * width <= alone for rows, width in shapes)
    assert merged == pytest.approx(solo, rel=1e-5)


def test_many_small_runs_train_in_one_micro_batch(engine):
    """One row per run (a multi-LoRA batch): the rows share a forward up to `merge_min_tokens`,
    not one forward per run."""
    batch = data(engine)
    slots = [engine.create_adapter(LoraSpec(rank=4, seed=s)) for s in range(len(batch))]
    groups = [TrainGroup(slot, [d]) for slot, d in zip(slots, batch, strict=True)]
    assert len(batch) * max(len(d.tokens) for d in batch) <= engine.settings.merge_min_tokens
    solo = [engine.forward_backward([g], forward_only=True)[0].loss for g in groups]
    shapes, merged = forward_shapes(engine, groups)
    assert len(shapes) == 1 and shapes[0][0] == len(batch)
    assert merged == pytest.approx(solo, rel=1e-5)


def test_forward_only_leaves_no_gradient(engine):
    slot = engine.create_adapter(LoraSpec(rank=4, seed=0))
    out = engine.forward_backward([TrainGroup(slot, data(engine))], forward_only=True)[0]
    assert all(p.grad is None for p in engine.slots[slot].params)
    assert [len(lp) for lp in out.logprobs] == [len(d.tokens) for d in data(engine)]
    assert out.loss == pytest.approx(-sum(float(lp.sum()) for lp in out.logprobs), rel=1e-6)


def test_gradients_accumulate_across_calls_until_the_step(engine):
    slot = engine.create_adapter(LoraSpec(rank=4, seed=0))
    engine.forward_backward([TrainGroup(slot, data(engine)[:2])])
    first = grads(engine, slot)
    engine.forward_backward([TrainGroup(slot, data(engine)[:2])])
    for g, p in zip(first, engine.slots[slot].params, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def greedy(engine, slot, prompt, n=8) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, stop=[])
    return engine.sample([SampleRequest(slot, prompt, params)])[0].sequences[0].tokens


def test_snapshot_is_unaffected_by_later_training(engine):
    live = engine.create_adapter(LoraSpec(rank=8, seed=1))
    engine.forward_backward([TrainGroup(live, data(engine))])
    engine.optim_step(live, AdamParams(learning_rate=5e-2))
    snap = engine.snapshot(live)
    prompt = engine.tokenizer.encode("The cat")
    frozen_weights, frozen_text = snapshot_tensors(engine, snap), greedy(engine, snap, prompt)
    assert greedy(engine, live, prompt) == frozen_text
    for _ in range(3):
        engine.forward_backward([TrainGroup(live, data(engine)[1:2])])
        engine.optim_step(live, AdamParams(learning_rate=5e-2))
    assert greedy(engine, snap, prompt) == frozen_text
    assert all(torch.equal(frozen_weights[k], v) for k, v in engine.slots[snap].state_dict().items())
    with pytest.raises(ValueError, match="frozen snapshot"):
        engine.forward_backward([TrainGroup(snap, data(engine))])


def test_export_and_load_with_optimizer_resume_identically(engine):
    src = engine.create_adapter(LoraSpec(rank=4, seed=2, train_unembed=False))
    step = AdamParams(learning_rate=1e-2, weight_decay=0.01)
    engine.forward_backward([TrainGroup(src, data(engine))])
    engine.optim_step(src, step)
    spec, tensors = engine.export_adapter(src, with_optimizer=True)
    assert "lm_head.lora_A" not in tensors and any(k.endswith(".exp_avg") for k in tensors)
    copy = engine.load_adapter(spec, tensors)
    weights_only = engine.load_adapter(spec, {k: v for k, v in tensors.items() if k.endswith(("_A", "_B"))})
    for s in (src, copy, weights_only):
        engine.forward_backward([TrainGroup(s, data(engine))])
        engine.optim_step(s, step)
    for p_src, p_copy in zip(*(engine.slots[s].params for s in (src, copy)), strict=True):
        assert torch.equal(p_src, p_copy)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(engine.slots[src].params, engine.slots[weights_only].params, strict=True)
    )


def test_load_rejects_tensors_of_the_wrong_shape(engine):
    spec, tensors = engine.export_adapter(engine.create_adapter(LoraSpec(rank=4, seed=0)))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    before = len(engine.slots)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        engine.load_adapter(spec, tensors)
    assert len(engine.slots) == before


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: Datum(torch.tensor([1, 10**6]), d.inputs), r"data\[0\]\.model_input: token ids"),
        (lambda d: Datum(d.tokens, {"target_tokens": d.inputs["target_tokens"][:-1]}), "does not match"),
        (
            lambda d: Datum(d.tokens, {"target_tokens": d.inputs["target_tokens"] * 0 - 1}),
            "target_tokens: token",
        ),
        (lambda d: Datum(d.tokens, {**d.inputs, "weights": torch.ones(2)}), "weights"),
    ],
)
def test_bad_datums_are_rejected_before_any_compute(engine, mutate, message):
    slot = engine.create_adapter(LoraSpec(rank=4, seed=0))
    good = data(engine)[0]
    with pytest.raises(ValueError, match=message):
        engine.forward_backward([TrainGroup(slot, [good]), TrainGroup(slot, [mutate(good)])])
    assert all(p.grad is None for p in engine.slots[slot].params)


def test_rl_loss_without_its_inputs_names_them(engine):
    slot = engine.create_adapter(LoraSpec(rank=4, seed=0))
    with pytest.raises(ValueError, match="importance_sampling needs logprobs"):
        engine.forward_backward([TrainGroup(slot, data(engine), "importance_sampling")])
    empty = rl_data(engine)
    empty[1].inputs["sequence_ratio_mask"] = torch.zeros(len(empty[1].tokens))
    with pytest.raises(ValueError, match=r"data\[1\]\.sequence_ratio_mask: selects no rows"):
        engine.forward_backward([TrainGroup(slot, empty, "gspo")])
    with pytest.raises(ValueError, match="loss_fn_config.kl_coeff"):
        engine.forward_backward([TrainGroup(slot, rl_data(engine), "stable_reinforce", {"kl_coeff": -1.0})])
