"""Cold wave: does loading many cold adapters slow down the traffic that is already resident?

A steady hot workload (closed loop, `--hot-clients` clients each sampling one of 8 resident adapters
again and again) is measured twice, side by side in one process:
  (a) during a wave of `--wave` cold adapters (in the catalog, never loaded: each needs a read, a
      verification and a device copy), arriving open-loop at `--load` (0.7) of the engine's measured
      capacity for such a wave;
  (b) during an equally sized wave of adapters already resident (the same decode work, no loads).
The device budget holds everything, so (b) really loads nothing. SGLang's eviction cliff inflated
latency 158x; the claim here is that cold loads are scheduled work that stays off the hot path:
`hot_p99_inflation` = hot p99 during (a) / during (b). One pair of waves gives the hot clients only a
few dozen requests, whose p99 is their maximum, so `--repeats` pairs run alternately, (b) then (a)
with fresh cold adapters each time, and the hot latencies of each side are pooled.

Prints one JSON line; progress goes to stderr.
    python bench/cold_wave.py [--wave 1000] [--repeats 3] [--hot-clients 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import _fleet as fleet
import torch


def hot_latencies(client: fleet.Client, refs: list[str], stop: threading.Event, out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        out.append(fleet.wait(client.submit(refs[i % len(refs)])))
        i += 1


def measure(
    service: fleet.TinkerService, hot: list[str], wave: list[str], clients: int, rate: float, tokens: int
) -> list[float]:
    """Hot latencies (ms) while `wave` arrives at `rate` requests per second (open loop) and completes."""
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(
            target=hot_latencies, args=(fleet.Client(service, tokens), hot[i::clients], stop, latencies[i])
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    waver = fleet.Client(service, tokens)
    started = time.perf_counter()
    futures = []
    for i, ref in enumerate(wave):
        time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        futures.append(waver.submit(ref))
    for fut in futures:
        fleet.wait(fut)
    stop.set()
    for t in threads:
        t.join()
    return [x * 1000 for lat in latencies for x in lat]


def summary(latencies_ms: list[float]) -> dict[str, float]:
    return {
        "hot_requests": len(latencies_ms),
        "hot_p50_ms": statistics.median(latencies_ms),
        "hot_p99_ms": fleet.quantile(latencies_ms, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wave", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of waves, (b) then (a), pooled")
    parser.add_argument("--hot-clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens each request decodes")
    parser.add_argument("--load", type=float, default=0.7, help="wave arrival rate, as a share of capacity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="mintd-coldwave-"))
    service = fleet.start(work)
    hot = fleet.add_adapters(service, 8, "hot", (8,), seed=1)
    warm = fleet.add_adapters(service, args.wave, "warm", tuple(range(1, 9)), seed=2)
    cold = fleet.add_adapters(service, args.wave * args.repeats, "cold", tuple(range(1, 9)), seed=3)
    preload = fleet.Client(service, args.max_tokens)
    for fut in [preload.submit(ref) for ref in hot + warm]:  # (b)'s adapters and the hot set: resident
        fleet.wait(fut)
    residency = service.models["tiny"].worker.residency
    loads_before = residency.stats()["misses"]
    started = time.perf_counter()  # capacity: the resident wave all at once, no hot traffic
    for fut in [preload.submit(ref) for ref in warm]:
        fleet.wait(fut)
    rate = args.load * len(warm) / (time.perf_counter() - started)
    fleet.log(f"wave of resident adapters (b) at {rate:.0f}/s")
    resident: list[float] = []
    cold_run: list[float] = []
    for r in range(args.repeats):
        misses = residency.stats()["misses"]
        resident += measure(service, hot, warm, args.hot_clients, rate, args.max_tokens)
        assert residency.stats()["misses"] == misses, "wave (b) should load nothing"
        fleet.log(f"wave {r + 1}/{args.repeats} of cold adapters (a)")
        wave = cold[r * args.wave : (r + 1) * args.wave]
        cold_run += measure(service, hot, wave, args.hot_clients, rate, args.max_tokens)
    stats = residency.stats()
    service.close()
    during_cold, during_resident = summary(cold_run), summary(resident)
    print(
        json.dumps(
            {
                "bench": "cold_wave",
                "threads": args.threads,
                "wave": args.wave,
                "repeats": args.repeats,
                "wave_rate_per_s": round(rate, 1),
                "hot_adapters": len(hot),
                "hot_clients": args.hot_clients,
                "cold": during_cold,
                "resident": during_resident,
                "cold_loads": stats["misses"] - loads_before,
                "cold_load_ms_p50": stats["load_ms_p50"],
                "hot_p99_inflation": round(during_cold["hot_p99_ms"] / during_resident["hot_p99_ms"], 3),
                "hot_p50_inflation": round(during_cold["hot_p50_ms"] / during_resident["hot_p50_ms"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
