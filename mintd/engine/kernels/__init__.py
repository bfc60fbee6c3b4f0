"""mintd's C++ CPU kernels, compiled on this machine at first use (a few seconds, once: torch keeps the
build under ~/.cache/torch_extensions and rebuilds it when a source changes).

- `paged_decode`: decode attention over the paged KV cache, reading each sequence's blocks where they lie
  (the torch path gathers them into a padded copy for SDPA).
- `lora_rows`: the LoRA deltas of a group of several adapters' tokens (decodes, prompt chunks), each
  token's from its own adapter's rows of the weight bank, in the bank's dtype (the torch path: a
  float32 `bmm` pair or a masked GEMM pair per run).

Without a C++ compiler the engine runs the pure-torch paths, which give the same results, slower.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "paged_decode.cpp", HERE / "lora_rows.cpp"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-funsafe-math-optimizations"]


@dataclass(frozen=True)
class CpuKernels:
    # (q [S, heads, dim], keys, values [rows, kv_heads, dim], blocks [S, width], lengths [S], block_size,
    # scale) -> [S, heads, dim_v]
    paged_decode: Callable[..., torch.Tensor]
    # (x [T, in], a [S, r, in], b [S, r, out], segment [T], y [T, out]): y += its rows' deltas, in place
    lora_rows: Callable[..., None]


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The kernels, or None where they cannot be built (logged once)."""
    from torch.utils.cpp_extension import load

    try:
        # -march=native: built where it runs; -fopenmp: at::parallel_for over sequences and tokens;
        # reassociated float sums (unsafe-math, compile only: nothing changes the process's FPU modes)
        # vectorize the softmax: decode attention 0.91 -> 0.61 ms a layer (120 sequences, bf16)
        load(
            "mintd_cpu_kernels",
            [str(s) for s in SOURCES],
            extra_cflags=FLAGS,
            extra_include_paths=[str(HERE)],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no headers: the torch paths serve
        log.warning("mintd's CPU kernels are unavailable (%s); using the torch paths", e)
        return None
    return CpuKernels(torch.ops.mintd.paged_decode, torch.ops.mintd.lora_rows)
