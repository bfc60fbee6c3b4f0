"""Reverse-KL distillation against full next-token distributions computed row by row."""

import pytest
import torch

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.distill import KLDatum, KLGroup
from mintd.engine.forward import padded_forward
from mintd.engine.optim import AdamParams


def logits_of(engine, slot: int, tokens: torch.Tensor) -> torch.Tensor:
    """One row's logits, run alone."""
    logits, _ = padded_forward(engine.model, engine.ctx, engine.slots, [slot], [tokens], engine.pad_id)
    return logits[0]


def randomized(engine, slot: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    for _, b in engine.slots[slot].weights.values():
        b.data.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return slot


def kl_data() -> list[KLDatum]:
    """Reference rows carry extra context in front; weights select positions."""
    return [
        KLDatum(torch.tensor([5, 6, 7, 8]), torch.tensor([40, 41, 5, 6, 7, 8]), torch.tensor([6, 7, 8]),
                torch.tensor([1.0, 0.5, 2.0])),
        KLDatum(torch.tensor([9, 10, 11]), torch.tensor([9, 10, 11]), torch.tensor([10, 11, 12]),
                torch.tensor([1.0, 1.0, 0.0])),
    ]  # fmt: skip


def reference_kl(engine, student: int, reference: int, data, temperature: float) -> tuple[list, float]:
    """Per datum, per position w·KL(p_s ‖ p_r) with each row run alone, in float64; and the sampled
    estimate Σ w·(log p_s(y) − log p_r(y))."""
    losses, sampled = [], 0.0
    with torch.no_grad():
        for d in data:
            n = len(d.targets)
            s = logits_of(engine, student, d.student)
            r = logits_of(engine, reference, d.reference)
            ls = torch.log_softmax(s[-n:].double() / temperature, -1)
            lr = torch.log_softmax(r[-n:].double() / temperature, -1)
            losses.append((d.weights.double() * (ls.exp() * (ls - lr)).sum(-1)).tolist())
            y = d.targets.unsqueeze(-1)
            sampled += float((d.weights.double() * (ls.gather(-1, y) - lr.gather(-1, y)).squeeze(-1)).sum())
    return losses, sampled


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_equals_kl_of_full_distributions(engine, temperature):
    student = randomized(engine, engine.create_adapter(LoraSpec(rank=4, seed=1)), 1)
    teacher = randomized(engine, engine.create_adapter(LoraSpec(rank=8, seed=2)), 2)
    for reference in (teacher, BASE_SLOT):
        data = kl_data()
        out = engine.reverse_kl(KLGroup(student, reference, data, temperature))
        expected, sampled = reference_kl(engine, student, reference, data, temperature)
        for got, want in zip(out.losses, expected, strict=True):
            assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert out.loss == pytest.approx(sum(map(sum, expected)), rel=1e-4)
        assert out.sampled_kl == pytest.approx(sampled, rel=1e-4, abs=1e-6)
        assert out.weight == pytest.approx(5.5)
    # gradients reach the student only, even though the teacher is a trainable adapter
    assert all(p.grad is not None for p in engine.slots[student].params)
    assert all(p.grad is None for p in engine.slots[teacher].params)


def test_micro_batches_equal_one_batch(engine):
    a = randomized(engine, engine.create_adapter(LoraSpec(rank=4, seed=1)), 1)
    b = randomized(engine, engine.create_adapter(LoraSpec(rank=4, seed=1)), 1)
    full = engine.reverse_kl(KLGroup(a, BASE_SLOT, kl_data()))
    engine.settings.micro_batch_tokens = 4  # one pair per forward
    split = engine.reverse_kl(KLGroup(b, BASE_SLOT, kl_data()))
    assert split.loss == pytest.approx(full.loss, rel=1e-5)
    for pa, pb in zip(engine.slots[a].params, engine.slots[b].params, strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-4 * float(pa.grad.abs().max()))


def test_training_drives_the_student_to_its_reference(engine):
    student = engine.create_adapter(LoraSpec(rank=4, seed=0))
    teacher = randomized(engine, engine.create_adapter(LoraSpec(rank=4, seed=3)), 3)
    losses = []
    for _ in range(60):
        losses.append(engine.reverse_kl(KLGroup(student, teacher, kl_data())).loss)
        engine.optim_step(student, AdamParams(learning_rate=5e-3))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"data": []}, "data: empty"),
        ({"data": [KLDatum(torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([1, 2]), torch.ones(2))]},
         r"data\[0\]\.target_tokens: 2 positions, but student_input has only 1"),
        ({"data": [KLDatum(torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([1, 2]), torch.ones(3))]},
         r"data\[0\]\.weights"),
        ({"data": [KLDatum(torch.tensor([1, 10**7]), torch.tensor([1]), torch.tensor([1]), torch.ones(1))]},
         r"data\[0\]\.student_input: token ids"),
    ],
)  # fmt: skip
def test_bad_groups_name_the_field(engine, change, message):
    slot = engine.create_adapter(LoraSpec(rank=4, seed=0))
    group = KLGroup(slot, BASE_SLOT, kl_data())
    for key, value in change.items():
        setattr(group, key, value)
    with pytest.raises(ValueError, match=message):
        engine.reverse_kl(group)
    assert all(p.grad is None for p in engine.slots[slot].params)
