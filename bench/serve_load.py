"""Claim: mintd serves many adapters behind one OpenAI endpoint under open-loop load, with low time to
first token and zero errors; with --vllm-python, it beats `vllm serve` (LoRA on, the same adapters
registered) on goodput (requests/s with TTFT <= the SLO) by >= 1.5x on the same workload.

The workload (fixed by --seed, identical for both servers):
  arrivals    Poisson at --rate requests/s for --requests requests (open loop: a slow server does not
              slow the arrivals down); --rate 2,6,12 sweeps rates in turn, lowest first, on one server
              process per engine, and the headline goodput_vs_vllm is the ratio of the two engines'
              peak goodputs over the sweep (each rate's own ratio is in "sweep")
  adapters    --adapters saved revisions of distinct adapters (random LoRA weights, --rank), each
              request naming one as `model`, with Zipf(--zipf) popularity (rank i has weight 1/i^s)
  prompts     token ids, length uniform in [--prompt-min, --prompt-max]
  outputs     length uniform in [--output-min, --output-max], exact (`ignore_eos`), streamed
Each request is a streamed `POST /v1/completions` through the official `openai` client. TTFT is the
time from sending to the first streamed chunk, inter-token latency the time between later chunks.
mintd runs as `mintd serve` in its own process, with a device budget of --resident adapters' bytes
(so the Zipf tail is loaded and evicted as it would be in production); the residency hit rate comes
from its /metrics. Prints one JSON line.

The two servers, as configured here (same model folder, adapters, requests, --dtype and --threads):
  mintd  --adapter-device-budget = --resident adapters' bytes (the rest load from its host cache or
         the blob store on demand); its defaults otherwise: 128 rows decoding together
         (MINTD_MAX_SAMPLE_ROWS), 1,024 tokens a step, a 65,536-token KV cache; MINTD_MAX_PENDING_ROWS =
         --requests, so the open loop gets no 429
  vLLM   --max-loras --resident (adapters in one batch), --max-cpu-loras --adapters (all 1,000 kept
         in its CPU LoRA cache once loaded), --max-lora-rank --rank, a 2 GiB KV cache
         (VLLM_CPU_KVCACHE_SPACE), OpenMP bound to cores 0..threads-1; its CPU API-server defaults
         otherwise: 128 sequences and 2,048 tokens a step, prefix caching on (random prompts share none)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Request:
    at: float  # seconds after the start
    adapter: int
    prompt: list[int]
    output: int


@dataclass
class Outcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def workload(args: argparse.Namespace, rate: float, vocab: int) -> list[Request]:
    rng = random.Random(args.seed)
    weights = [1 / (i + 1) ** args.zipf for i in range(args.adapters)]
    at, out = 0.0, []
    for _ in range(args.requests):
        at += rng.expovariate(rate)
        prompt = [rng.randrange(16, vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        adapter = rng.choices(range(args.adapters), weights)[0]
        out.append(Request(at, adapter, prompt, rng.randint(args.output_min, args.output_max)))
    return out


def make_adapters(model_dir: Path, data_dir: Path, args: argparse.Namespace) -> int:
    """`--adapters` distinct saved revisions in the server's catalog; the bytes of one."""
    from mintd.catalog import Catalog, CatalogDB, Provenance
    from mintd.config import CatalogSettings, EngineSettings
    from mintd.engine.adapters import LoraSpec
    from mintd.engine.engine import Engine
    from mintd.service.checkpoints import Checkpoints
    from mintd.store.blobs import open_blobs
    from mintd.store.packed import pack

    engine = Engine(model_dir, EngineSettings(device="cpu"))
    spec = LoraSpec(rank=args.rank, seed=0)
    spec, template = engine.export_adapter(engine.create_adapter(spec))
    data_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(
        Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir)), open_blobs(None, data_dir, 0)
    )
    provenance = Provenance(engine.fingerprint, "base", engine.lora_provenance(spec))
    gen = torch.Generator().manual_seed(args.seed)
    size = 0
    for i in range(args.adapters):
        tensors = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in template.items()}
        rev = checkpoints.add(
            "local", f"a{i}", pack(spec, tensors, engine.fingerprint), "sampler", provenance
        )
        size = rev.size_bytes
    return size


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m[1]) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


async def one(client: openai.AsyncOpenAI, model: str, req: Request, start: float, out: Outcome) -> None:
    await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
    sent = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model,
            prompt=req.prompt,
            max_tokens=req.output,
            temperature=1.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if not chunk.choices:
                continue
            if out.ttft is None:
                out.ttft = now - sent
            else:
                out.gaps.append(now - last)
            last = now
            out.tokens += 1
    except Exception as exc:  # noqa: BLE001 - counted and reported
        out.error = f"{type(exc).__name__}: {exc}"[:200]


async def drive(url: str, models: list[str], requests: list[Request]) -> tuple[list[Outcome], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    outcomes = [Outcome() for _ in requests]
    start = time.perf_counter()
    await asyncio.gather(
        *(one(client, models[r.adapter], r, start, o) for r, o in zip(requests, outcomes, strict=True))
    )
    elapsed = time.perf_counter() - start
    await client.close()
    return outcomes, elapsed


def ratio(mintd: dict, vllm: dict | None) -> float | None:
    """Goodput, mintd ÷ vLLM (None without a vLLM figure, or when vLLM served nothing within the SLO)."""
    if not vllm or not vllm["goodput_rps"]:
        return None
    return round(mintd["goodput_rps"] / vllm["goodput_rps"], 3)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 4)


def summarize(outcomes: list[Outcome], elapsed: float, slo: float) -> dict:
    ok = [o for o in outcomes if o.error is None]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    gaps = [g for o in ok for g in o.gaps]
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "requests": len(outcomes),
        "elapsed_s": round(elapsed, 2),
        "request_rate": round(len(outcomes) / elapsed, 3),
        "output_tokens_per_s": round(sum(o.tokens for o in ok) / elapsed, 2),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "itl_p50_s": pct(gaps, 50),
        "itl_p99_s": pct(gaps, 99),
        "goodput_rps": round(sum(1 for t in ttfts if t <= slo) / elapsed, 3),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def wait_up(proc: subprocess.Popen, url: str, path: str, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not come up in {timeout}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mintd(
    model_dir: Path, data_dir: Path, budget: int, args: argparse.Namespace, loads: list[list[Request]]
) -> list[dict]:
    """One `mintd serve` process runs each load in turn (the sweep's rates, lowest first)."""
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MINTD_MAX_PENDING_ROWS": str(args.requests),
        "MINTD_DTYPE": args.dtype,
    }
    command = [
        sys.executable,
        "-m",
        "mintd.cli",
        "serve",
        "--model",
        f"base={model_dir}",
        "--data-dir",
        str(data_dir),
    ]
    command += ["--port", str(port), "--adapter-device-budget", str(budget)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        wait_up(proc, url, "/api/v1/healthz", "mintd serve")
        for requests in loads:
            hits = metric(url, "mintd_residency_hits_total")
            misses = metric(url, "mintd_residency_misses_total")
            outcomes, elapsed = asyncio.run(drive(url, [f"a{i}" for i in range(args.adapters)], requests))
            hits = metric(url, "mintd_residency_hits_total") - hits
            misses = metric(url, "mintd_residency_misses_total") - misses
            out = summarize(outcomes, elapsed, args.slo)
            out["residency_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
            results.append(out)
            log(f"mintd: {json.dumps(out)}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return results


def run_vllm(
    model_dir: Path, data_dir: Path, args: argparse.Namespace, loads: list[list[Request]]
) -> list[dict]:
    """The same loads against `vllm serve` with every adapter registered as a LoRA module."""
    from mintd.catalog import Catalog, CatalogDB
    from mintd.config import CatalogSettings
    from mintd.service.checkpoints import Checkpoints
    from mintd.store.blobs import open_blobs

    checkpoints = Checkpoints(
        Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir)), open_blobs(None, data_dir, 0)
    )
    peft_dir = data_dir / "peft"
    modules = []
    for i in range(args.adapters):
        folder = peft_dir / f"a{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in checkpoints.peft_files(checkpoints.catalog.resolve("local", f"a{i}")).items():
            (folder / name).write_bytes(data)
        modules.append(f"a{i}={folder}")
    port = free_port()
    # `vllm serve` itself fails in vllm-cpu (it asks for the metadata of a distribution named "vllm");
    # the deprecated api_server module still serves the same OpenAI app
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--port", str(port), "--dtype", args.dtype]
    command += ["--enable-lora", "--max-lora-rank", str(args.rank)]
    command += [
        "--max-loras",
        str(args.resident),
        "--max-cpu-loras",
        str(args.adapters),
        "--lora-modules",
        *modules,
    ]
    # vLLM's CPU worker pins one OpenMP thread per listed core ("all" is no longer accepted). A fixed KV
    # cache size: without one it reserves 92% of the machine's memory and refuses to start on a shared box.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
    }
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_up(proc, url, "/health", "vllm serve")
            results = []
            for requests in loads:
                outcomes, elapsed = asyncio.run(drive(url, [f"a{i}" for i in range(args.adapters)], requests))
                results.append(summarize(outcomes, elapsed, args.slo))
                log(f"vllm: {json.dumps(results[-1])}")
        except SystemExit:
            output.seek(0)
            log(output.read().decode(errors="replace")[-4000:])
            raise
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a local HF model folder (default: a tiny model, --size)"
    )
    parser.add_argument(
        "--size", default="test", help="tiny-model preset when no --model-dir: test, small, base"
    )
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--resident", type=int, default=64, help="adapters the device budget holds")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s")
    parser.add_argument(
        "--rates",
        "--rate",
        type=lambda text: [float(r) for r in text.split(",")],
        default=[2.0],
        help="mean arrivals per second; a comma list (2,6,12) sweeps them in turn on one server process",
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=128)
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=64)
    parser.add_argument("--slo", type=float, default=2.0, help="TTFT SLO in seconds, for goodput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="both servers' weights (vLLM would pick bfloat16 for a float32 checkpoint on its own)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the server under test")
    parser.add_argument("--vllm-python", help="VENV/bin/python of a vLLM (CPU) install: also run vllm serve")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mintd-serve-load-"))
    try:
        model_dir = args.model_dir
        if model_dir is None:
            from mintd.engine.tiny import make_tiny_model

            model_dir = make_tiny_model(work / "model", arch="qwen3", seed=0, size=args.size)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        vocab = config.vocab_size
        if args.vllm_python and config.head_dim < 32:
            parser.error(
                f"vLLM's CPU attention has no kernel for head_dim {config.head_dim}: use --size small"
            )
        log(f"saving {args.adapters} adapters (rank {args.rank}) ...")
        size = make_adapters(model_dir, work / "data", args)
        loads = [workload(args, rate, vocab) for rate in args.rates]
        log(f"mintd serve: {args.requests} requests at each rate of {args.rates}/s ...")
        mintd = run_mintd(model_dir, work / "data", size * args.resident, args, loads)
        vllm: list[dict | None] = [None] * len(loads)
        if args.vllm_python:
            log("vllm serve: the same loads ...")
            vllm = run_vllm(model_dir, work / "data", args, loads)
        else:
            log("vLLM comparison skipped: pass --vllm-python VENV/bin/python (a vLLM CPU install) to run it")
        sweep = [
            {"rate": rate, "mintd": m, "vllm": v, "goodput_vs_vllm": ratio(m, v)}
            for rate, m, v in zip(args.rates, mintd, vllm, strict=True)
        ]
        # the sweep's headline: the best goodput each server reached at any offered rate (its capacity
        # under the SLO), so a rate where both keep up, or both are swamped, does not hide a difference
        peak = {"mintd": max(m["goodput_rps"] for m in mintd)}
        if args.vllm_python:
            peak["vllm"] = max(v["goodput_rps"] for v in vllm)
        result = {
            "bench": "serve_load",
            "config": {k: v for k, v in vars(args).items() if k != "vllm_python"}
            | {"model_dir": str(model_dir)},
            "workload": "Poisson arrivals; Zipf adapters; uniform prompt, output lengths; streamed",
            "sweep": sweep,
            "peak_goodput_rps": peak,
            "goodput_vs_vllm": ratio({"goodput_rps": peak["mintd"]}, {"goodput_rps": peak.get("vllm")})
            if args.vllm_python
            else None,
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
