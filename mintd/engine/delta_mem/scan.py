"""The δ-mem write scan ("standard" update, rank-wise gates), in three forms that agree.

Per sequence the state S is r×r (fp32); row i holds value coordinate i. Token t first reads the state
before its own write, m_t = S_{t-1} q_t, then writes

    S_t = (1 - β_t) ⊙ S_{t-1} + β_t ⊙ (v_t - S_{t-1} k_t) k_tᵀ        (⊙ row-wise, β_t ∈ (0,1)^r)

A token with β = 0 (padding, or writes off) leaves S unchanged. Shapes: q, k, v, β are [B, T, r], the
state [B, r, r], the reads [B, T, r].

- `step`: one token, for decode (and the reference loop's body);
- `reference_scan`: the token loop, the oracle;
- `chunked_scan`: the closed form per chunk of C tokens (T/C Python steps instead of T), pure torch, so
  it runs on CPU and CUDA and autograd gives the backward. Within a chunk starting from s_0, with the
  written pseudo-values u_t = β_t (v_t - s_{t-1}·k_t) and Λ_t = Π_{j≤t} (1 - β_j) (per row, in log space):

      (I + M) u = β ⊙ (v - Λ_{t-1} (s_0·k_t)),   M_tj = β_t (Λ_{t-1}/Λ_j) (k_j·k_t)   (j < t)
      m_t = Λ_{t-1} (s_0·q_t) + Σ_{j<t} (Λ_{t-1}/Λ_j) (q_t·k_j) u_j
      s_C = Λ_C s_0 + Σ_j (Λ_C/Λ_j) u_j k_j

  Every decay ratio has a non-positive exponent and |M_tj| ≤ 1, so nothing divides by a small λ.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 64
# log(1 - β) floor: β rounds to 1 in fp32 for large gate logits, and log(0) = -inf would give
# -inf - -inf = nan in the decay ratios; exp(-80) is already far below fp32's resolution of a state entry.
_MIN_LOG_KEEP = -80.0


def step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: q, k, v, β [B, r], state [B, r, r] -> (read [B, r], new state)."""
    read = torch.einsum("bik,bk->bi", state, q)
    predicted = torch.einsum("bik,bk->bi", state, k)
    written = beta * (v - predicted)
    new_state = (1 - beta).unsqueeze(-1) * state + written.unsqueeze(-1) * k.unsqueeze(-2)
    return read, new_state


def reference_scan(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token loop: (reads [B, T, r], end state [B, r, r])."""
    reads = []
    for t in range(q.shape[1]):
        read, state = step(state, q[:, t], k[:, t], v[:, t], beta[:, t])
        reads.append(read)
    return torch.stack(reads, dim=1), state


def _chunk(
    s0: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of C tokens from state s0 [B, r, r]: (reads [B, C, r], end state)."""
    c = q.shape[1]
    b_rows = beta.transpose(1, 2)  # [B, r, C]: one gate sequence per state row
    log_keep = torch.log1p(-b_rows).clamp_min(_MIN_LOG_KEEP)
    incl = log_keep.cumsum(-1)  # log Λ_t
    excl = incl - log_keep  # log Λ_{t-1}
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)  # j < t
    ratio = torch.where(strict, excl.unsqueeze(-1) - incl.unsqueeze(-2), float("-inf")).exp()  # [B,r,C,C]
    kk = k @ k.transpose(1, 2)  # [B, C, C] (k_t·k_j), shared by the rows
    qk = q @ k.transpose(1, 2)
    s0k = torch.einsum("bik,btk->bit", s0, k)  # [B, r, C]
    s0q = torch.einsum("bik,btk->bit", s0, q)
    decay_prev = excl.exp()
    # M, strictly lower (its diagonal is 0): `unitriangular` solves (I + M) u = rhs without forming I + M
    m = b_rows.unsqueeze(-1) * ratio * kk.unsqueeze(1)
    rhs = b_rows * (v.transpose(1, 2) - decay_prev * s0k)
    u = torch.linalg.solve_triangular(m, rhs.unsqueeze(-1), upper=False, unitriangular=True).squeeze(-1)
    reads = decay_prev * s0q + ((ratio * qk.unsqueeze(1)) @ u.unsqueeze(-1)).squeeze(-1)
    to_end = (incl[..., -1:] - incl).exp()  # Λ_C / Λ_j, [B, r, C]
    end = incl[..., -1:].exp() * s0 + (to_end * u) @ k
    return reads.transpose(1, 2), end


def chunked_scan(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `reference_scan`, a chunk of `chunk` tokens per step (the last may be shorter)."""
    reads = []
    for start in range(0, q.shape[1], chunk):
        end = start + chunk
        read, state = _chunk(state, q[:, start:end], k[:, start:end], v[:, start:end], beta[:, start:end])
        reads.append(read)
    if not reads:
        return q.new_zeros(q.shape), state
    return torch.cat(reads, dim=1), state
