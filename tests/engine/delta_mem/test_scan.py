"""The chunked closed-form scan and the decode step against the token-loop reference."""

import pytest
import torch
import torch.nn.functional as F

from mintd.engine.delta_mem.scan import chunked_scan, reference_scan, step

RANK = 8


def inputs(rows: int, tokens: int, dtype: torch.dtype, seed: int, gate_spread: float = 3.0, pad: int = 0):
    """(s0, q, k, v, β) as the adapter makes them: unit q and k, gates spread over (0, 1); the last
    `pad` tokens of row 0 are padding (β = 0)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = F.normalize(torch.tanh(randn(rows, tokens, RANK)), dim=-1)
    k = F.normalize(torch.tanh(randn(rows, tokens, RANK)), dim=-1)
    beta = torch.sigmoid(gate_spread * randn(rows, tokens, RANK))
    if pad:
        beta[0, tokens - pad :] = 0
    return randn(rows, RANK, RANK), q, k, randn(rows, tokens, RANK), beta


@pytest.mark.parametrize(("tokens", "chunk"), [(37, 8), (200, 32), (64, 64), (5, 64), (1, 4), (70, 16)])
def test_chunked_equals_reference_in_fp64(tokens, chunk):
    args = inputs(3, tokens, torch.float64, seed=tokens, pad=3 if tokens > 3 else 0)
    reads, state = reference_scan(*args)
    c_reads, c_state = chunked_scan(*args, chunk=chunk)
    assert (c_reads - reads).abs().max() < 1e-12
    assert (c_state - state).abs().max() < 1e-12


def test_chunked_in_fp32_is_close_to_the_fp64_reference():
    args = inputs(2, 300, torch.float64, seed=1)
    reads, state = reference_scan(*args)
    c_reads, c_state = chunked_scan(*(a.float() for a in args), chunk=64)
    assert (c_reads.double() - reads).abs().max() < 1e-4 * reads.abs().max()
    assert (c_state.double() - state).abs().max() < 1e-4 * state.abs().max()


def test_saturated_gates_stay_finite():
    """β rounds to 1 for large gate logits (log(1 - β) = -inf): the state is replaced, not nan."""
    s0, q, k, v, _ = inputs(2, 40, torch.float32, seed=2)
    beta = torch.ones_like(v)
    beta[:, ::3] = 0.3
    reads, state = reference_scan(s0, q, k, v, beta)
    c_reads, c_state = chunked_scan(s0, q, k, v, beta, chunk=16)
    assert torch.isfinite(c_reads).all() and torch.isfinite(c_state).all()
    assert (c_reads - reads).abs().max() < 1e-4 and (c_state - state).abs().max() < 1e-4


def test_padding_leaves_the_state_exactly_unchanged():
    s0, q, k, v, beta = inputs(1, 6, torch.float32, seed=3)
    beta[:, 3:] = 0
    _, after_three = reference_scan(s0, q[:, :3], k[:, :3], v[:, :3], beta[:, :3])
    _, after_six = reference_scan(s0, q, k, v, beta)
    assert torch.equal(after_three, after_six)


@pytest.mark.parametrize(("tokens", "chunk"), [(29, 8), (16, 16)])
def test_chunked_gradients_equal_the_reference(tokens, chunk):
    args = [a.requires_grad_() for a in inputs(2, tokens, torch.float64, seed=4, pad=2)]
    g = torch.Generator().manual_seed(5)
    w_reads = torch.randn(2, tokens, RANK, generator=g, dtype=torch.float64)
    w_state = torch.randn(2, RANK, RANK, generator=g, dtype=torch.float64)

    def grads(scan):
        reads, state = scan(*args)
        return torch.autograd.grad((reads * w_reads).sum() + (state * w_state).sum(), args)

    expected = grads(reference_scan)
    got = grads(lambda *a: chunked_scan(*a, chunk=chunk))
    for e, c in zip(expected, got, strict=True):
        assert (c - e).abs().max() < 1e-10 * max(1.0, float(e.abs().max()))


def test_chunked_passes_gradcheck():
    args = tuple(a.requires_grad_() for a in inputs(1, 7, torch.float64, seed=6, gate_spread=1.0))
    assert torch.autograd.gradcheck(lambda *a: chunked_scan(*a, chunk=3), args)


def test_decode_steps_equal_one_prefill():
    s0, q, k, v, beta = inputs(2, 50, torch.float32, seed=7)
    reads, state = chunked_scan(s0, q, k, v, beta, chunk=16)
    prefix_reads, s = chunked_scan(s0, q[:, :20], k[:, :20], v[:, :20], beta[:, :20], chunk=16)
    step_reads = [prefix_reads]
    for t in range(20, 50):
        read, s = step(s, q[:, t], k[:, t], v[:, t], beta[:, t])
        step_reads.append(read.unsqueeze(1))
    assert (torch.cat(step_reads, 1) - reads).abs().max() < 1e-5
    assert (s - state).abs().max() < 1e-5
