"""Multi-policy GRPO benchmark: do several policies' RL loops on one base share it well?

Four policies (LoRA adapters on one `small` tiny Qwen3 built locally) each run GRPO iterations through
the service's engine worker (the scheduler `mintd serve` uses): snapshot the weights for sampling,
sample 8 prompts × 8 samples, score them (a toy reward: the share of even token ids), one
`importance_sampling` forward_backward over the 64 samples with group-normalised advantages, one
optim_step. Side by side:

  concurrent   the four policies' loops run at the same time (one client thread each): their samples
               decode in the same steps and their forward_backward work merges, turn by turn
  sequential   the same four loops one after another

`speedup` = sequential wall time ÷ concurrent wall time (MinT reports 1.77× on a 4B model);
`peak_rss_ratio` = the concurrent phase's peak resident memory ÷ the sequential phase's. Each phase runs
in its own process (so neither inherits the other's memory high-water mark), on the same model folder.

Prints exactly one JSON line to stdout; progress goes to stderr.
    python bench/multipolicy_grpo.py [--threads 2] [--iterations 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402
from _fleet import wait_for  # noqa: E402

from mintd.catalog import Revision  # noqa: E402
from mintd.config import ServeSettings  # noqa: E402
from mintd.engine.adapters import LoraSpec  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.optim import AdamParams  # noqa: E402
from mintd.engine.sampling import SampleRequest, SamplingParams  # noqa: E402
from mintd.engine.tiny import make_tiny_model  # noqa: E402
from mintd.engine.train import Datum, TrainGroup  # noqa: E402
from mintd.residency import Residency, RunKey  # noqa: E402
from mintd.service.futures import FutureStore  # noqa: E402
from mintd.service.scheduler import CallOp, EngineWorker, SampleOp, SchedulerLimits, TrainOp  # noqa: E402
from mintd.service.threads import on_passing_thread  # noqa: E402
from mintd.store.packed import PackedAdapter  # noqa: E402

POLICIES, PROMPTS, SAMPLES = 4, 8, 8


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Polls resident memory every 10 ms on a thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class Policy:
    def __init__(self, worker: EngineWorker, futures: FutureStore, index: int, args: argparse.Namespace):
        self.worker, self.futures, self.index, self.args = worker, futures, index, args
        self.name = f"policy{index}"
        self.key = RunKey(self.name)

        def create(engine: Engine) -> int:
            slot = engine.create_adapter(LoraSpec(rank=16, seed=index))
            worker.residency.add_run(self.key, slot)  # never parked here: budget and idle time allow
            return slot

        self.slot = worker.call(create)
        worker.add_run(self.name)
        self.seq = 0
        gen = torch.Generator().manual_seed(100 + index)
        vocab = worker.engine.vocab_size
        self.prompts = [
            torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(PROMPTS)
        ]

    def _run_op(self, op: TrainOp | CallOp) -> object:
        self.seq += 1
        fut, _ = self.futures.create(type(op).__name__, "bench", (self.name, self.seq))
        self.worker.submit_run_op(self.name, self.seq, fut, op)
        return wait_for(self.futures, fut)

    def iteration(self, it: int) -> float:
        snap = self._run_op(CallOp(lambda e: e.snapshot(self.slot)))
        params = SamplingParams(max_tokens=self.args.sample_tokens, temperature=1.0, seed=it, stop=[])
        futs = []
        for i, prompt in enumerate(self.prompts):
            fut, _ = self.futures.create("Sample", "bench")
            request = SampleRequest(snap, prompt, params, num_samples=SAMPLES)
            self.worker.submit_sample(fut, SampleOp(request, lambda r: r, f"{self.name}-{i}"))
            futs.append(fut)
        results = [wait_for(self.futures, f) for f in futs]
        self.worker.post(lambda e: e.drop(snap))
        data = []
        for prompt, result in zip(self.prompts, results, strict=True):
            rewards = [sum(t % 2 == 0 for t in s.tokens) / len(s.tokens) for s in result.sequences]
            mean = sum(rewards) / len(rewards)
            for seq, reward in zip(result.sequences, rewards, strict=True):
                full = torch.tensor(prompt + seq.tokens)
                n_prompt = len(prompt) - 1
                zeros = [0.0] * n_prompt
                inputs = {
                    "target_tokens": full[1:],
                    "logprobs": torch.tensor(zeros + seq.logprobs),
                    "advantages": torch.tensor(zeros + [reward - mean] * len(seq.tokens)),
                }
                data.append(Datum(full[:-1], inputs))
        out = self._run_op(
            TrainOp(self.key, TrainGroup(self.slot, data, "importance_sampling"), False, lambda o: o.loss)
        )
        self._run_op(CallOp(lambda e: e.optim_step(self.slot, AdamParams(learning_rate=1e-3))))
        return out

    def run(self) -> None:
        for it in range(self.args.iterations):
            self.iteration(it)


def _no_saved_adapters(rev: Revision) -> PackedAdapter:
    raise ValueError(f"{rev.ref}: this benchmark samples no saved adapters")


def phase(args: argparse.Namespace) -> dict:
    """One phase in this process: the four policies' loops, concurrently or one after another."""
    engine = on_passing_thread(lambda: Engine(args.model_dir))  # as `mintd serve` builds it
    futures = FutureStore(retention_s=3600)
    residency = Residency(engine, _no_saved_adapters, 2**32, 2**32, "bench")
    worker = EngineWorker(
        engine, futures, SchedulerLimits(max_sample_rows=args.max_sample_rows), "bench", residency
    )
    try:
        policies = [Policy(worker, futures, i, args) for i in range(POLICIES)]
        policies[0].iteration(-1)  # warm-up (not timed)
        monitor = PeakRss()
        started = time.perf_counter()
        if args.phase == "concurrent":
            threads = [threading.Thread(target=p.run) for p in policies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for p in policies:
                p.run()
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "peak_rss_bytes": monitor.stop()}
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--size", default="small", help="tiny-model preset (default: small)")
    parser.add_argument("--iterations", type=int, default=2, help="GRPO iterations per policy")
    parser.add_argument("--sample-tokens", type=int, default=32, help="new tokens per sample")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument(
        "--max-sample-rows",
        type=int,
        default=ServeSettings().max_sample_rows,
        help="samples decoding together (default: the server's, MINTD_MAX_SAMPLE_ROWS)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: test-size model, short samples")
    parser.add_argument("--phase", choices=("concurrent", "sequential"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.iterations, args.sample_tokens = "test", 1, 8
    warnings.filterwarnings("ignore")
    if args.phase:
        with contextlib.redirect_stdout(sys.stderr):
            out = phase(args)
        print(json.dumps(out), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            model_dir = make_tiny_model(Path(tmp) / "model", arch="qwen3", seed=0, size=args.size)
        phases = {}
        for name in ("sequential", "concurrent"):
            cmd = [sys.executable, __file__, "--phase", name, "--model-dir", str(model_dir)]
            cmd += ["--iterations", str(args.iterations), "--sample-tokens", str(args.sample_tokens)]
            cmd += [
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--max-sample-rows",
                str(args.max_sample_rows),
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            log(f"{name} phase")
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            phases[name] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"{name}: {phases[name]}")
    seq, con = phases["sequential"], phases["concurrent"]
    result = {
        "policies": POLICIES,
        "prompts_x_samples": f"{PROMPTS}x{SAMPLES}",
        "iterations": args.iterations,
        "sample_tokens": args.sample_tokens,
        "max_sample_rows": args.max_sample_rows,
        "size": args.size,
        "threads": args.threads or torch.get_num_threads(),
        "speedup": round(seq["seconds"] / con["seconds"], 3),
        "peak_rss_ratio": round(con["peak_rss_bytes"] / seq["peak_rss_bytes"], 3),
        "seconds": {"sequential": round(seq["seconds"], 2), "concurrent": round(con["seconds"], 2)},
        "peak_rss_mib": {k: round(v["peak_rss_bytes"] / 2**20, 1) for k, v in phases.items()},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
