"""Continuous batching benchmark: does iteration-level scheduling keep short requests short?

Side by side in one process, on one engine (a `small` tiny Qwen3 built locally, 32 adapters of ranks
4-32, frozen as sampling snapshots are), both policies driving the same step engine:

  step      iteration-level: a request joins the running batch at the next step (what `mintd serve` does)
  request   request-level (mintd before the step engine): a batch of waiting requests starts together
            and runs until its last row finishes; arrivals meanwhile wait for the next batch

(1) `short_latency_ratio`: a 4-token request on adapter B arriving while a 256-token generation on
    adapter A is under way: its latency ÷ its latency alone (step policy; the request-level figure is
    reported beside it).
(2) Open-loop Poisson arrivals of mixed prompt and output lengths over the 32 adapters, at the rate
    where the request-level path saturates (its closed-batch capacity in requests/s, `--load` times):
    `ttft_p99_ratio` (time to first token, p99, step ÷ request) and `throughput_ratio` (generated
    tokens/s, step ÷ request).

Prints exactly one JSON line to stdout; progress goes to stderr.
    python bench/continuous_batching.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402

from mintd.config import EngineSettings  # noqa: E402
from mintd.engine.adapters import LoraSpec  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.sampling import SampleRequest, SamplingParams  # noqa: E402
from mintd.engine.stream import TokenEvent, TokenStream  # noqa: E402
from mintd.engine.tiny import make_tiny_model  # noqa: E402

RANKS = (4, 8, 16, 32)
MAX_ROWS = 64  # rows a batch, both paths (fixed: ServeSettings.max_sample_rows' default was 64 then)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Timed(TokenStream):
    """Records when the first token of the request was pushed."""

    def __init__(self) -> None:
        super().__init__()
        self.first: float | None = None

    def push(self, event: TokenEvent) -> None:
        if self.first is None:
            self.first = time.perf_counter()


def adapters(engine: Engine, n: int) -> list[int]:
    slots = []
    for i in range(n):
        slot = engine.create_adapter(LoraSpec(rank=RANKS[i % len(RANKS)], seed=i))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, b in engine.slots[slot].weights.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        slots.append(engine.snapshot(slot))
        engine.drop(slot)
    return slots


def request(slot: int, prompt: list[int], tokens: int) -> SampleRequest:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop=[])
    return SampleRequest(slot, prompt, params, stream=Timed())


class Driver:
    """Feeds timed arrivals to the engine under one policy; records arrival, first token and end."""

    def __init__(self, engine: Engine, policy: str) -> None:
        self.engine, self.policy = engine, policy

    def run(self, arrivals: list[tuple[float, SampleRequest]]) -> list[dict]:
        engine, t0 = self.engine, time.perf_counter()
        pending = list(arrivals)
        records: list[dict] = []
        live: list[tuple[float, SampleRequest, object]] = []
        while pending or live:
            now = time.perf_counter() - t0
            arrived = [a for a in pending if a[0] <= now]
            if self.policy == "step" or not live:
                batch = arrived if self.policy == "step" else arrived[:MAX_ROWS]
                for at, req in batch:
                    pending.remove((at, req))
                    live.append((at, req, engine.submit(req)))
            if not live:
                time.sleep(max(0.0, min(0.002, pending[0][0] - now)))
                continue
            engine.step()
            for item in [x for x in live if x[2].done]:
                live.remove(item)
                at, req, state = item
                end = time.perf_counter() - t0
                tokens = sum(len(s.tokens) for s in state.result.sequences)
                records.append(
                    {"arrival": at, "ttft": req.stream.first - t0 - at, "end": end, "tokens": tokens}
                )
        return records


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def short_latency(engine: Engine, slots: list[int], policy: str, long_tokens: int) -> dict:
    short = lambda: request(slots[1], [9, 10, 11, 12], 4)  # noqa: E731
    alone = Driver(engine, policy).run([(0.0, short())])[0]
    mixed = Driver(engine, policy).run([(0.0, request(slots[0], [5, 6, 7], long_tokens)), (0.2, short())])
    during = next(r for r in mixed if r["tokens"] == 4)
    long = next(r for r in mixed if r["tokens"] == long_tokens)
    return {
        "short_alone_s": round(alone["end"] - alone["arrival"], 4),
        "short_during_long_s": round(during["end"] - during["arrival"], 4),
        "long_s": round(long["end"], 3),
        "ratio": round((during["end"] - during["arrival"]) / (alone["end"] - alone["arrival"]), 3),
    }


def workload(engine: Engine, slots: list[int], n: int, seed: int) -> list[tuple[list[int], int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(rng.randint(4, 64))]
        out.append((prompt, rng.randint(8, 128), rng.choice(slots)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--size", default="small", help="tiny-model preset (default: small)")
    parser.add_argument("--requests", type=int, default=96, help="requests in the Poisson run")
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--load", type=float, default=1.0, help="arrival rate ÷ request-level capacity")
    parser.add_argument("--quick", action="store_true", help="smoke run: test-size model, few requests")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.requests, args.long_tokens = "test", 16, 32
    warnings.filterwarnings("ignore")
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        model_dir = make_tiny_model(Path(tmp) / "model", arch="qwen3", seed=0, size=args.size)
        engine = Engine(model_dir, EngineSettings(max_running_rows=MAX_ROWS))
        slots = adapters(engine, 32)
        n_params = sum(p.numel() for p in engine.model.parameters())
        log(f"{n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
        Driver(engine, "step").run([(0.0, request(s, [1, 2, 3], 4)) for s in slots])  # warm-up
        latency = {p: short_latency(engine, slots, p, args.long_tokens) for p in ("step", "request")}
        log(f"short request latency: {latency}")

        # capacity of the request-level path: the whole workload as closed batches of MAX_ROWS
        work = workload(engine, slots, args.requests, seed=1)
        closed = Driver(engine, "request").run([(0.0, request(s, p, t)) for p, t, s in work])
        capacity = len(work) / max(r["end"] for r in closed)
        rate = capacity * args.load
        log(f"request-level capacity {capacity:.2f} req/s; Poisson arrivals at {rate:.2f} req/s")
        rng = random.Random(2)
        at, arrivals = 0.0, []
        for p, t, s in work:
            arrivals.append((at, (p, t, s)))
            at += rng.expovariate(rate)
        open_loop = {}
        for policy in ("request", "step", "request", "step"):  # interleaved: noise hits both alike
            records = Driver(engine, policy).run([(a, request(s, p, t)) for a, (p, t, s) in arrivals])
            tokens = sum(r["tokens"] for r in records)
            figures = {
                "ttft_p50_s": pct([r["ttft"] for r in records], 0.5),
                "ttft_p99_s": pct([r["ttft"] for r in records], 0.99),
                "tokens_per_s": tokens / max(r["end"] for r in records),
            }
            log(f"{policy}: {figures}")
            open_loop.setdefault(policy, []).append(figures)
        med = {
            p: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for p, runs in open_loop.items()
        }
        result = {
            "model_params": n_params,
            "threads": torch.get_num_threads(),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "adapters": len(slots),
            "short_latency_ratio": latency["step"]["ratio"],
            "short_latency": latency,
            "requests": len(work),
            "arrival_rate_per_s": round(rate, 3),
            "ttft_p99_ratio": round(med["step"]["ttft_p99_s"] / med["request"]["ttft_p99_s"], 3),
            "throughput_ratio": round(med["step"]["tokens_per_s"] / med["request"]["tokens_per_s"], 3),
            "open_loop": {p: {k: round(v, 4) for k, v in f.items()} for p, f in med.items()},
        }
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
