"""mintd's C++ CPU kernels, compiled on this machine at first use (a few seconds, once: torch keeps the
build under ~/.cache/torch_extensions and rebuilds it when the source changes).

Without a C++ compiler the engine runs the pure-torch paths, which give the same results, slower.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.cpp")


@functools.cache
def paged_decode() -> Callable[..., torch.Tensor] | None:
    """`torch.ops.mintd.paged_decode(q [S, heads, dim], keys, values [rows, kv_heads, dim], blocks
    [S, width], lengths [S], block_size, scale) -> [S, heads, dim_v]`, or None where it cannot be built."""
    from torch.utils.cpp_extension import load

    try:
        # -march=native: built where it runs; -fopenmp: at::parallel_for over sequences and KV heads
        load(
            "mintd_paged_decode",
            [str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no headers: the torch path serves
        log.warning("CPU decode-attention kernel unavailable (%s); using the torch path", e)
        return None
    return torch.ops.mintd.paged_decode
