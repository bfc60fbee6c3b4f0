"""Cold wave: does loading many cold adapters slow down the traffic that is already resident?

A steady hot workload (closed loop, `--hot-clients` clients each sampling one of 8 resident adapters
again and again) is measured twice, side by side in one process:
  (a) during a wave of `--wave` cold adapters (in the catalog, never loaded: each needs a read, a
      verification and a device copy), arriving open-loop at `--load` (0.7) of the room the engine has
      beside the hot traffic (measured first: its capacity for the resident wave sent all at once,
      less the hot clients' own rate when they run alone);
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
import contextlib
import gc
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import _fleet as fleet
import torch

HOT_ALONE_S = 5.0


def hot_latencies(client: fleet.Client, refs: list[str], stop: threading.Event, out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        out.append(client.sample(refs[i % len(refs)]))
        i += 1


@contextlib.contextmanager
def hot_traffic(
    service: fleet.TinkerService, hot: list[str], clients: int, tokens: int
) -> Iterator[list[float]]:
    """The hot clients run inside the block; afterwards the list holds their latencies (ms)."""
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
    pooled: list[float] = []
    try:
        yield pooled
    finally:
        stop.set()
        for t in threads:
            t.join()
        pooled += [x * 1000 for lat in latencies for x in lat]


def measure(
    service: fleet.TinkerService, hot: list[str], wave: list[str], clients: int, rate: float, tokens: int
) -> list[float]:
    """Hot latencies (ms) while `wave` arrives at `rate` requests per second (open loop) and completes."""
    with hot_traffic(service, hot, clients, tokens) as latencies:
        waver = fleet.Client(service, tokens)
        started = time.perf_counter()
        futures = []
        for i, ref in enumerate(wave):
            time.sleep(max(0.0, started + i / rate - time.perf_counter()))
            futures.append(waver.submit(ref))
        for fut in futures:
            waver.wait(fut)
    return latencies


class FullCollections:
    """Python's full (oldest-generation) collections and their pauses (ms): each holds the GIL, so it
    stalls every request, and a wave that sets one off pays for it in its hot p99."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append(round((time.perf_counter() - self._started) * 1000, 1))

    def since(self, count: int) -> list[float]:
        return self.pauses_ms[count:]


def hot_alone(service: fleet.TinkerService, hot: list[str], clients: int, tokens: int) -> list[float]:
    """Hot latencies (ms) over `HOT_ALONE_S` seconds with no wave."""
    with hot_traffic(service, hot, clients, tokens) as latencies:
        time.sleep(HOT_ALONE_S)
    return latencies


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
    parser.add_argument(
        "--load",
        type=float,
        default=0.7,
        help="wave arrival rate, as a share of the room beside the hot traffic",
    )
    parser.add_argument(
        "--size", choices=("test", "small"), default="test", help="tiny model preset (mintd.engine.tiny)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="mintd-coldwave-"))
    service = fleet.start(work, args.size)
    hot = fleet.add_adapters(service, 8, "hot", (8,), seed=1)
    warm = fleet.add_adapters(service, args.wave, "warm", tuple(range(1, 9)), seed=2)
    cold = fleet.add_adapters(service, args.wave * args.repeats, "cold", tuple(range(1, 9)), seed=3)
    preload = fleet.Client(service, args.max_tokens)
    for fut in [preload.submit(ref) for ref in hot + warm]:  # (b)'s adapters and the hot set: resident
        preload.wait(fut)
    residency = service.models["tiny"].worker.residency
    loads_before = residency.stats()["misses"]
    # the engine's room for a wave: its capacity (the resident wave all at once, alone; best of two, as
    # a fresh process's first run is slow) less what the hot clients take by themselves
    capacity = 0.0
    for _ in range(2):
        client = fleet.Client(service, args.max_tokens)  # new samplers, as each wave makes
        started = time.perf_counter()
        for fut in [client.submit(ref) for ref in warm]:
            client.wait(fut)
        capacity = max(capacity, len(warm) / (time.perf_counter() - started))
    alone = hot_alone(service, hot, args.hot_clients, args.max_tokens)
    hot_rate = len(alone) / HOT_ALONE_S
    rate = args.load * (capacity - hot_rate)
    if rate <= 0:
        raise SystemExit(f"the hot clients alone ({hot_rate:.0f}/s) fill the engine ({capacity:.0f}/s)")
    fleet.log(f"capacity {capacity:.0f}/s, hot traffic alone {hot_rate:.0f}/s; waves arrive at {rate:.0f}/s")
    resident: list[float] = []
    cold_run: list[float] = []
    collections = FullCollections()
    pauses: dict[str, list[float]] = {"cold": [], "resident": []}
    for r in range(args.repeats):
        misses = residency.stats()["misses"]
        seen = len(collections.pauses_ms)
        latencies = measure(service, hot, warm, args.hot_clients, rate, args.max_tokens)
        pauses["resident"] += collections.since(seen)
        assert residency.stats()["misses"] == misses, "wave (b) should load nothing"
        fleet.log(f"pair {r + 1}/{args.repeats}: resident wave (b) {summary(latencies)}")
        resident += latencies
        wave = cold[r * args.wave : (r + 1) * args.wave]
        seen = len(collections.pauses_ms)
        latencies = measure(service, hot, wave, args.hot_clients, rate, args.max_tokens)
        pauses["cold"] += collections.since(seen)
        fleet.log(f"pair {r + 1}/{args.repeats}: cold wave (a) {summary(latencies)}")
        cold_run += latencies
    stats = residency.stats()
    service.close()
    during_cold, during_resident = summary(cold_run), summary(resident)
    print(
        json.dumps(
            {
                "bench": "cold_wave",
                "threads": args.threads,
                "size": args.size,
                "wave": args.wave,
                "repeats": args.repeats,
                "load": args.load,
                "capacity_per_s": round(capacity, 1),
                "hot_alone_per_s": round(hot_rate, 1),
                "alone": summary(alone),
                "wave_rate_per_s": round(rate, 1),
                "hot_adapters": len(hot),
                "hot_clients": args.hot_clients,
                "cold": during_cold,
                "resident": during_resident,
                "cold_loads": stats["misses"] - loads_before,
                "cold_load_ms_p50": stats["load_ms_p50"],
                "full_gc_pauses_ms": pauses,
                "hot_p99_inflation": round(during_cold["hot_p99_ms"] / during_resident["hot_p99_ms"], 3),
                "hot_p50_inflation": round(during_cold["hot_p50_ms"] / during_resident["hot_p50_ms"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
