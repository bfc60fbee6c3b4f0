"""δ-mem scan microbenchmark: the token-loop reference against the chunked closed form, on CPU (or CUDA).

For each sequence length T, B rows of rank-r states (one layer's scan for B sequences), fp32 inputs shaped
as the adapter makes them (unit q and k, gates spread over (0, 1)): milliseconds for the forward alone and
for forward + backward (reads and end state into a random projection), medians of `--repeats`, and the
largest error of each fp32 path against the fp64 token loop (relative to the largest fp64 value).

Prints exactly one JSON line to stdout; progress goes to stderr.
    python bench/delta_mem_scan.py [--lengths 256 1024 4096] [--chunks 16 32 64 128] [--rows 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mintd.engine.delta_mem.scan import chunked_scan, reference_scan  # noqa: E402


def inputs(rows: int, tokens: int, rank: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = F.normalize(torch.tanh(randn(rows, tokens, rank)), dim=-1)
    k = F.normalize(torch.tanh(randn(rows, tokens, rank)), dim=-1)
    beta = torch.sigmoid(3 * randn(rows, tokens, rank))
    return [t.to(device) for t in (randn(rows, rank, rank), q, k, randn(rows, tokens, rank), beta)]


def median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times[1:]), 3)


def measure(scan: Callable, args: list[torch.Tensor], repeats: int, device: str) -> dict[str, float]:
    leaves = [a.float().requires_grad_() for a in args]
    g = torch.Generator().manual_seed(0)
    w_reads = torch.randn(args[1].shape, generator=g).to(device)
    w_state = torch.randn(args[0].shape, generator=g).to(device)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return scan(*leaves)

    def forward_backward() -> None:
        reads, state = scan(*leaves)
        torch.autograd.grad((reads * w_reads).sum() + (state * w_state).sum(), leaves)

    return {
        "fwd_ms": median_ms(forward, repeats, device),
        "fwd_bwd_ms": median_ms(forward_backward, repeats, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict[str, dict] = {}
    for tokens in args.lengths:
        exact = inputs(args.rows, tokens, args.rank, args.device)
        reads64, state64 = reference_scan(*exact)
        scale = max(float(reads64.abs().max()), float(state64.abs().max()))
        paths: dict[str, Callable] = {"reference": reference_scan}
        for c in args.chunks:
            paths[f"chunked{c}"] = lambda *a, c=c: chunked_scan(*a, chunk=c)
        row: dict[str, dict] = {}
        for name, scan in paths.items():
            print(f"[bench] T={tokens} {name}", file=sys.stderr, flush=True)
            reads, state = scan(*(a.float() for a in exact))
            error = max(
                float((reads.double() - reads64).abs().max()), float((state.double() - state64).abs().max())
            )
            row[name] = {**measure(scan, exact, args.repeats, args.device), "max_rel_error": error / scale}
        best = min((n for n in row if n != "reference"), key=lambda n: row[n]["fwd_bwd_ms"])
        row["speedup_fwd_bwd"] = {best: round(row["reference"]["fwd_bwd_ms"] / row[best]["fwd_bwd_ms"], 2)}
        figures[f"T{tokens}"] = row
    config = {
        "rows": args.rows,
        "rank": args.rank,
        "repeats": args.repeats,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "dtype": "float32 (errors against the float64 token loop)",
    }
    print(json.dumps({"bench": "delta_mem_scan", "config": config, "figures": figures}))


if __name__ == "__main__":
    main()
