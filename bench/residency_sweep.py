"""Residency sweep: one engine serves a catalog far larger than its working set.

MinT's single-engine sweep samples 10^5 distinct adapters once each. Here: a test-size model, N
distinct saved adapters (ranks 1-8) in the catalog, each sampled once (greedy, one token) through the
service's Tinker sampling path in waves, with a device budget that holds at most `--fit` of them and a
host tier of the same size. Reported: the budget and the peak bytes resident on the device (which must
not pass it), the process's resident memory after 10,000 adapters and at the end (a bounded working
set means it stays flat), cold-load times (fetch + verify on the loader thread) and adapters per second.

Prints one JSON line; progress goes to stderr.
    python bench/residency_sweep.py [--adapters 100000] [--fit 512] [--wave 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _fleet as fleet
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--fit", type=int, default=512, help="rank-8 adapters the device budget holds")
    parser.add_argument("--wave", type=int, default=256, help="samples submitted together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder for the model and catalog")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="mintd-sweep-"))

    probe = fleet.start(work / "probe")
    spec, tensors = fleet.random_adapter(probe.models["tiny"].engine, 8, 0)
    rank8 = sum(t.numel() * t.element_size() for t in tensors.values())
    probe.close()
    budget = args.fit * rank8
    # Answers are read at once, so they are kept 5 s rather than the default 4 hours: what grows then
    # is residency's working set and nothing else. (At 60 s, a sweep running 800 adapters/s held ~48,000
    # answered futures at its end against ~10,000 at the 10k mark: +85 MB of RSS that was not residency.)
    service = fleet.start(
        work, adapter_device_budget=budget, adapter_host_budget=budget, future_retention_s=5
    )
    residency = service.models["tiny"].worker.residency
    fleet.log(f"making {args.adapters:,} adapters; device budget {budget:,} bytes ({args.fit} of rank 8)")
    refs = fleet.add_adapters(service, args.adapters, "sweep", tuple(range(1, 9)), seed=0)

    client = fleet.Client(service)
    rss_at_10k = None
    started = time.perf_counter()
    for start in range(0, len(refs), args.wave):
        wave = refs[start : start + args.wave]
        for fut in [client.submit(ref) for ref in wave]:
            client.wait(fut)
        for ref in wave:
            client.forget(ref)
        done = start + len(wave)
        if rss_at_10k is None and done >= 10_000:
            rss_at_10k = fleet.rss_mb()
        if done % 10_000 < args.wave:
            stats = residency.stats()
            fleet.log(
                f"{done:,} sampled; device peak {stats['device_peak_bytes']:,} B; rss {fleet.rss_mb():.0f} MB"
            )
    elapsed = time.perf_counter() - started
    stats = residency.stats()
    rss_end = fleet.rss_mb()
    service.close()
    print(
        json.dumps(
            {
                "bench": "residency_sweep",
                "threads": args.threads,
                "adapters": len(refs),
                "wave": args.wave,
                "device_budget_bytes": budget,
                "peak_resident_bytes": stats["device_peak_bytes"],
                "host_budget_bytes": stats["host_budget_bytes"],
                "host_peak_bytes": stats["host_peak_bytes"],
                "evictions": stats["evictions"],
                "rss_mb_at_10k": round(rss_at_10k or rss_end, 1),
                "rss_mb_at_end": round(rss_end, 1),
                "rss_growth_ratio": round(rss_end / (rss_at_10k or rss_end), 3),
                "cold_load_ms_p50": stats["load_ms_p50"],
                "cold_load_ms_p99": stats["load_ms_p99"],
                "device_copy_ms_p50": stats["copy_ms_p50"],
                "adapters_per_s": round(len(refs) / elapsed, 1),
                "within_budget": stats["device_peak_bytes"] <= budget,
            }
        )
    )


if __name__ == "__main__":
    main()
