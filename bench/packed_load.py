"""Packed-format benchmark: how many tensor objects, and how long, from an adapter file to a usable slot?

On a qwen3-architecture model with >= 24 layers (built in a temp dir: random weights, the `test` preset's
tokenizer), for LoRA ranks 8 and 64 on every target module (attn, mlp, unembed), N adapters with random
non-zero weights are written twice, side by side:

  peft    a Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors); loaded with
          `load_peft_folder` (safetensors read + key mapping) then `Engine.load_adapter` (a copy per tensor)
  packed  one packed file; loaded with `load_packed_into` (memory map, buffer sha256, one copy into a
          private buffer, views); `packed_trusted` is the same with `verify=False`, the fast path for
          a content-addressed blob already verified when it was stored

Tensor objects per adapter = distinct storages (allocations; views of one storage count once) among
the tensors the file reader returns plus those the loaded slot holds. Load times are medians over
adapters and `--repeats` interleaved rounds. The OS page cache cannot be dropped here, so every "cold"
load reads a file already in the page cache ("page_cache": "warm"): this measures building the slot
from file bytes, not disk I/O.

Prints exactly one JSON line to stdout; progress goes to stderr.
    python bench/packed_load.py [--adapters 16] [--layers 24] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config  # noqa: E402

from mintd.config import EngineSettings  # noqa: E402
from mintd.engine.adapters import LoraSpec  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.tiny import MAX_POSITIONS, PRESETS, count_parameters, make_tokenizer  # noqa: E402
from mintd.store.packed import load_packed_into, read_packed, storage_count, write_packed  # noqa: E402
from mintd.store.peft import load_peft_folder, save_peft_folder  # noqa: E402

RANKS = (8, 64)
CASES = ("peft", "packed", "packed_trusted")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_model(out: Path, layers: int, hidden: int) -> Path:
    """A deep, narrow qwen3: many layers (hence many LoRA tensors) at a size 2 CPU cores handle."""
    tokenizer = make_tokenizer(PRESETS["test"].vocab)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=2 * hidden,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_adapters(engine: Engine, rank: int, count: int, folder: Path) -> list[tuple[Path, Path]]:
    """`count` random adapters at `rank`, each as (packed file, PEFT folder)."""
    spec = LoraSpec(rank=rank, alpha=2 * rank)
    out = []
    for i in range(count):
        slot = engine.create_adapter(spec.model_copy(update={"seed": i}))
        gen = torch.Generator().manual_seed(i)
        for a, b in engine.slots[slot].weights.values():
            a.data.copy_(torch.randn(a.shape, generator=gen) * 0.01)
            b.data.copy_(torch.randn(b.shape, generator=gen) * 0.01)
        _, tensors = engine.export_adapter(slot)
        engine.drop(slot)
        packed, peft = folder / f"r{rank}-{i}.mint", folder / f"r{rank}-{i}-peft"
        write_packed(packed, spec, tensors, engine.fingerprint)
        save_peft_folder(peft, spec, tensors, base_model_name="bench")
        out.append((packed, peft))
    return out


def timed(load: Callable[[], int], engine: Engine) -> float:
    """Milliseconds from file to usable slot; the slot is dropped afterwards (not timed)."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    slot = load()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    engine.drop(slot)
    return elapsed


def peft_load(engine: Engine, folder: Path) -> int:
    spec, tensors = load_peft_folder(folder)
    return engine.load_adapter(spec, tensors, trainable=False)


def tensor_objects(engine: Engine, packed: Path, peft: Path) -> dict[str, int]:
    """Distinct storages the reader returns plus those the slot holds, per path (see module doc)."""
    spec, tensors = load_peft_folder(peft)
    slot = engine.load_adapter(spec, tensors, trainable=False)
    counts = {"peft": storage_count(tensors.values()) + storage_count(engine.slots[slot].params)}
    engine.drop(slot)
    read = read_packed(packed).tensors.values()
    slot = load_packed_into(engine, packed)
    counts["packed"] = storage_count(read) + storage_count(engine.slots[slot].params)
    engine.drop(slot)
    return counts


def measure(engine: Engine, adapters: list[tuple[Path, Path]], repeats: int) -> dict[str, float]:
    loads: dict[str, Callable[[Path, Path], Callable[[], int]]] = {
        "peft": lambda packed, peft: lambda: peft_load(engine, peft),
        "packed": lambda packed, peft: lambda: load_packed_into(engine, packed),
        "packed_trusted": lambda packed, peft: lambda: load_packed_into(engine, packed, verify=False),
    }
    for make in loads.values():  # warm-up: page cache, allocator, lazy imports
        timed(make(*adapters[0]), engine)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for round_ in range(repeats):
        for i, pair in enumerate(adapters):
            order = CASES if (i + round_) % 2 == 0 else CASES[::-1]  # interleave: noise hits all alike
            for name in order:
                samples[name].append(timed(loads[name](*pair), engine))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16, help="adapters per rank")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        log(f"building a {args.layers}-layer qwen3 (hidden {args.hidden})")
        model_dir = build_model(Path(tmp) / "model", args.layers, args.hidden)
        engine = Engine(model_dir, EngineSettings(device=args.device))
        configs = {}
        for rank in RANKS:
            adapters = write_adapters(engine, rank, args.adapters, Path(tmp))
            mib = adapters[0][0].stat().st_size / 2**20
            log(f"rank {rank}: {args.adapters} adapters of {mib:.1f} MiB written; measuring")
            counts = tensor_objects(engine, *adapters[0])
            ms = measure(engine, adapters, args.repeats)
            configs[f"rank{rank}"] = {
                "adapter_mib": round(mib, 2),
                "peft_tensors": counts["peft"],
                "packed_tensors": counts["packed"],
                "peft_load_ms": round(ms["peft"], 3),
                "packed_load_ms": round(ms["packed"], 3),
                "packed_trusted_load_ms": round(ms["packed_trusted"], 3),
                "tensor_ratio": round(counts["peft"] / counts["packed"], 1),
                "load_ratio": round(ms["peft"] / ms["packed"], 2),
                "load_ratio_trusted": round(ms["peft"] / ms["packed_trusted"], 2),
            }
            log(json.dumps(configs[f"rank{rank}"]))
    result = {
        "model_layers": args.layers,
        "model_params": count_parameters(engine.model.config),
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "adapters": args.adapters,
        "repeats": args.repeats,
        "targets": "attn+mlp+unembed",
        "tensor_objects": "distinct storages returned by the file reader plus held by the slot",
        "page_cache": "warm",
        "configs": configs,
        "tensor_ratio_min": min(c["tensor_ratio"] for c in configs.values()),
        "load_ratio_min": min(c["load_ratio"] for c in configs.values()),
        "load_ratio_trusted_min": min(c["load_ratio_trusted"] for c in configs.values()),
    }
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
