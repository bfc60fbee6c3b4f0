"""Packed-format benchmark: how many tensor objects, and how long, from an adapter file to a usable slot?

Two bases, built in a temp dir (random weights, the `test` preset's tokenizer): a dense qwen3 with >= 24
layers, and a qwen3-moe with >= 16 layers of 64 routed experts, every expert adapted (MinT's MoE
adapters hold ~116k tensors). For LoRA ranks 8 and 64 on every target module (attn, mlp, unembed), N
adapters with random non-zero weights are written twice, side by side:

  peft    dense: a Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors), loaded with
          `load_peft_folder` (safetensors read + key mapping); MoE: the per-expert layout serving engines
          load (one lora_A / lora_B per expert per projection), read and stacked into the fused expert
          tensors. Then `Engine.load_adapter` (a copy per tensor)
  packed  one packed file; loaded with `load_packed_into` (memory map, buffer sha256, one copy into a
          private buffer, views); `packed_trusted` is the same with `verify=False`, the fast path for
          a content-addressed blob already verified when it was stored

Tensor objects per adapter = distinct storages (allocations; views of one storage count once) among
the tensors the file reader returns plus those the loaded slot holds. Load times are medians over
adapters and `--repeats` interleaved rounds. The OS page cache cannot be dropped here, so every "cold"
load reads a file already in the page cache ("page_cache": "warm"): this measures building the slot
from file bytes, not disk I/O.

Prints exactly one JSON line to stdout; progress goes to stderr.
    python bench/packed_load.py [--adapters 16] [--layers 24] [--moe-layers 16] [--experts 64] [--repeats 3]
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
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config, Qwen3MoeConfig  # noqa: E402

from mintd.config import EngineSettings  # noqa: E402
from mintd.engine.adapters import LoraSpec  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.tiny import MAX_POSITIONS, PRESETS, count_parameters, make_tokenizer  # noqa: E402
from mintd.residency.device import load_packed_into  # noqa: E402
from mintd.store.packed import read_packed, storage_count, write_packed  # noqa: E402
from mintd.store.peft import load_peft_folder, save_peft_folder  # noqa: E402

RANKS = (8, 64)
PEFT_PREFIX = "base_model.model."
CASES = ("peft", "packed", "packed_trusted")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_model(out: Path, layers: int, hidden: int, experts: int = 0) -> Path:
    """A deep, narrow qwen3 (or qwen3-moe with `experts` routed experts per layer): many layers, hence
    many LoRA tensors, at a size 2 CPU cores handle."""
    tokenizer = make_tokenizer(PRESETS["test"].vocab)
    moe = {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": hidden // 2}
    config = (Qwen3MoeConfig if experts else Qwen3Config)(
        **(moe if experts else {}),
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
    """`count` random adapters at `rank`, each as (packed file, PEFT folder; for a MoE base the PEFT
    side is the per-expert layout serving engines load: see `write_per_expert`)."""
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
        if any(t.num_experts for t in engine.slots.targets.values()):
            write_per_expert(peft, spec, tensors)
        else:
            save_peft_folder(peft, spec, tensors, base_model_name="bench")
        out.append((packed, peft))
    return out


def timed(load: Callable[[], int], engine: Engine) -> float:
    """Milliseconds from file to usable slot with every matrix in hand (a frozen packed slot makes its
    views when read, so they are read once here, as its first use would); the slot is dropped
    afterwards (not timed)."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    slot = load()
    engine.slots[slot].state_dict()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    engine.drop(slot)
    return elapsed


def write_per_expert(folder: Path, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
    """One `lora_A` / `lora_B` per expert per projection (as MinT's 116k-tensor MoE adapters and the
    serving engines that load them keep experts): a fused `experts.gate_up_proj` pair becomes
    `experts.<e>.gate_proj` and `experts.<e>.up_proj` (A shared, B split), `experts.down_proj` becomes
    `experts.<e>.down_proj`; other targets stay one pair each."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        target, _, kind = key.rpartition(".")
        module, _, param = target.rpartition(".")
        if not module.endswith(".experts"):
            out[f"{PEFT_PREFIX}{target}.{kind}.weight"] = t.contiguous()
            continue
        for e in range(t.shape[0]):
            if param == "down_proj":
                out[f"{PEFT_PREFIX}{module}.{e}.down_proj.{kind}.weight"] = t[e].contiguous()
            elif kind == "lora_A":
                for proj in ("gate_proj", "up_proj"):
                    out[f"{PEFT_PREFIX}{module}.{e}.{proj}.lora_A.weight"] = t[e].clone()
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{PEFT_PREFIX}{module}.{e}.gate_proj.lora_B.weight"] = gate.contiguous()
                out[f"{PEFT_PREFIX}{module}.{e}.up_proj.lora_B.weight"] = up.contiguous()
    folder.mkdir()
    save_file(out, folder / "adapter_model.safetensors")
    (folder / "spec.json").write_text(spec.model_dump_json())


def load_per_expert(folder: Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """The per-expert file back to the engine's fused layout: the work a serving engine does."""
    spec = LoraSpec.model_validate_json((folder / "spec.json").read_text())
    flat = load_file(folder / "adapter_model.safetensors")
    experts: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in flat.items():
        name = key[len(PEFT_PREFIX) : -len(".weight")]
        target, _, kind = name.rpartition(".")
        module, _, proj = target.rpartition(".")
        head, _, expert = module.rpartition(".")
        if not head.endswith(".experts"):
            tensors[name] = t
        else:
            experts.setdefault((head, proj, kind), {})[int(expert)] = t
    for (head, proj, kind), by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in sorted(by_expert)])
        if proj == "down_proj":
            tensors[f"{head}.down_proj.{kind}"] = stacked
        elif kind == "lora_A" and proj == "gate_proj":
            tensors[f"{head}.gate_up_proj.lora_A"] = stacked
        elif kind == "lora_B":
            tensors.setdefault(f"{head}.gate_up_proj.lora_B.{proj}", stacked)
    for key in [k for k in tensors if k.endswith(".lora_B.gate_proj")]:
        base = key[: -len(".gate_proj")]
        tensors[base] = torch.cat([tensors.pop(key), tensors.pop(f"{base}.up_proj")], dim=1)
    return spec, tensors


def read_peft(folder: Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    if (folder / "spec.json").exists():
        return load_per_expert(folder)
    return load_peft_folder(folder)


def peft_load(engine: Engine, folder: Path) -> int:
    spec, tensors = read_peft(folder)
    return engine.load_adapter(spec, tensors, trainable=False)


def tensor_objects(engine: Engine, packed: Path, peft: Path) -> dict[str, int]:
    """Distinct storages the reader returns plus those the slot holds, per path (see module doc)."""
    spec, tensors = read_peft(peft)
    read = load_file(peft / "adapter_model.safetensors") if (peft / "spec.json").exists() else tensors
    slot = engine.load_adapter(spec, tensors, trainable=False)
    counts = {"peft": storage_count(read.values()) + storage_count(engine.slots[slot].state_dict().values())}
    engine.drop(slot)
    read = read_packed(packed).tensors.values()
    slot = load_packed_into(engine, packed)
    counts["packed"] = storage_count(read) + storage_count(engine.slots[slot].state_dict().values())
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
    parser.add_argument("--moe-layers", type=int, default=16)
    parser.add_argument("--moe-hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer, all adapted")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        bases = {
            "dense": (args.layers, args.hidden, 0),
            "moe": (args.moe_layers, args.moe_hidden, args.experts),
        }
        result: dict = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "adapters": args.adapters,
            "repeats": args.repeats,
            "targets": "attn+mlp+unembed (MoE: every routed expert)",
            "tensor_objects": "distinct storages returned by the file reader plus held by the slot",
            "peft_layout": {"dense": "PEFT folder", "moe": "one lora_A/lora_B per expert per projection"},
            "page_cache": "warm",
        }
        for base, (layers, hidden, experts) in bases.items():
            log(f"{base}: building a {layers}-layer model (hidden {hidden}, {experts} experts)")
            model_dir = build_model(Path(tmp) / base, layers, hidden, experts)
            engine = Engine(model_dir, EngineSettings(device=args.device))
            configs = {}
            for rank in RANKS:
                folder = Path(tmp) / f"{base}-adapters"
                folder.mkdir(exist_ok=True)
                adapters = write_adapters(engine, rank, args.adapters, folder)
                mib = adapters[0][0].stat().st_size / 2**20
                log(f"{base} rank {rank}: {args.adapters} adapters of {mib:.1f} MiB written; measuring")
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
            result[base] = {
                "model_layers": layers,
                "experts": experts,
                "model_params": count_parameters(engine.model.config),
                "configs": configs,
            }
            result[f"load_ratio_{base}_min"] = min(c["load_ratio"] for c in configs.values())
            result[f"load_ratio_trusted_{base}_min"] = min(c["load_ratio_trusted"] for c in configs.values())
            result[f"tensor_ratio_{base}_min"] = min(c["tensor_ratio"] for c in configs.values())
        result["tensor_ratio_min"] = min(result["tensor_ratio_dense_min"], result["tensor_ratio_moe_min"])
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
