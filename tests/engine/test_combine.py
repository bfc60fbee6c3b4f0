"""Exact linear combinations of LoRA adapters, and SVD compression, against dense deltas."""

import pytest
import torch

from mintd.engine.adapters import LoraSpec
from mintd.engine.combine import combine, compress
from mintd.engine.train import Datum, TrainGroup


def random_adapter(engine, spec: LoraSpec, seed: int) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """The engine's own layout for `spec`, with random A and B (a fresh adapter has B = 0)."""
    slot = engine.create_adapter(spec)
    spec, tensors = engine.export_adapter(slot)
    engine.drop(slot)
    gen = torch.Generator().manual_seed(seed)
    return spec, {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in tensors.items()}


def delta(spec: LoraSpec, tensors: dict, target: str) -> torch.Tensor:
    a, b = tensors.get(f"{target}.lora_A"), tensors.get(f"{target}.lora_B")
    return torch.zeros(()) if a is None else spec.scale * (b.double() @ a.double())


def targets(tensors: dict) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in tensors}


@pytest.fixture
def two(engine):
    a = random_adapter(engine, LoraSpec(rank=4), seed=1)
    b = random_adapter(engine, LoraSpec(rank=8, target_modules=["q_proj", "v_proj"], train_unembed=False), 2)
    return a, b


@pytest.mark.parametrize("coefficients", [[0.25, 0.75], [1.0, 0.0], [-1.5, 2.0]])
def test_combination_equals_the_weighted_deltas(engine, two, coefficients):
    spec, tensors = combine(two, coefficients)
    assert spec.rank == 12 and targets(tensors) == targets(two[0][1]) | targets(two[1][1])
    engine.check_adapter(spec, tensors)  # fits the base model as any adapter would
    for target in targets(tensors):
        expected = sum(c * delta(s, t, target) for c, (s, t) in zip(coefficients, two, strict=True))
        got = delta(spec, tensors, target)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))


def _score(engine, spec, tensors, tokens):
    slot = engine.load_adapter(spec, tensors, trainable=False)
    seq = torch.tensor(tokens)
    out = engine.forward_backward([TrainGroup(slot, [Datum(seq[:-1], {"target_tokens": seq[1:]})])], True)
    engine.drop(slot)
    return out[0].logprobs[0]


def test_one_and_zero_reproduce_the_first_source(engine, two):
    tokens = list(range(3, 30))
    mixed = _score(engine, *combine(two, [1.0, 0.0]), tokens)
    assert torch.allclose(mixed, _score(engine, *two[0], tokens), atol=1e-5)


def test_compression_is_the_best_low_rank_approximation(engine, two):
    spec, tensors = combine(two, [0.25, 0.75])
    same_spec, same, error = compress(spec, tensors, 12)
    assert error < 1e-6 and same_spec.rank == 12
    for target in targets(tensors):
        assert torch.allclose(delta(same_spec, same, target), delta(spec, tensors, target), atol=1e-6)
    small_spec, small, error = compress(spec, tensors, 3)
    engine.check_adapter(small_spec, small)
    cut = total = 0.0
    for target in targets(tensors):
        full = delta(spec, tensors, target)
        s = torch.linalg.svdvals(full)
        total += float((s**2).sum())
        cut += float((s[3:] ** 2).sum())
        residual = full - delta(small_spec, small, target)
        assert float(residual.norm()) == pytest.approx(float(s[3:].norm()), rel=1e-4, abs=1e-9)
    assert error == pytest.approx((cut / total) ** 0.5, rel=1e-6)
    assert 0 < error < 1


def test_coefficient_count_must_match(two):
    with pytest.raises(ValueError, match="coefficients: 1 given for 2 sources"):
        combine(two, [1.0])
