"""Decode throughput of δ-mem rows in the step engine, beside base and LoRA rows, on a tiny model.

One flat batch of `--rows` sequences decoding `--tokens` greedy tokens each (prompts of 8 tokens,
prefilled in the step before the clock starts). Configurations: `base_plain` (an engine that never saw
a δ-mem adapter), `base` (the same batch on an engine holding δ-mem adapters, whose hooks are bound to
its model: what a batch without δ-mem rows pays for them), `lora`, `delta_mem`, `delta_mem_lora`
(δ-mem with a LoRA on the same slot) and `mixed` (a quarter of the rows each: base, LoRA, δ-mem,
δ-mem+LoRA). Figures: decode tokens per second (median of `--repeats` rounds, after a warm-up round, run
round robin over the configurations), and ratios against `base`.

Prints exactly one JSON line to stdout.
    python bench/delta_mem_decode.py [--size test] [--rows 8] [--tokens 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402

from mintd.engine.adapters import BASE_SLOT, LoraSpec  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.sampling import MemoryInput, SampleRequest, SamplingParams  # noqa: E402
from mintd.engine.tiny import frozen_random, make_tiny_model  # noqa: E402
from mintd.lora_config import DeltaMemSpec  # noqa: E402


def frozen(engine: Engine, delta_mem: bool, lora: bool, seed: int) -> int:
    """A frozen adapter with non-zero LoRA B (when it has a LoRA) and δ-mem weights that write."""
    spec = DeltaMemSpec(readout_init="base_slice", seed=seed, lora=lora) if delta_mem else None
    return frozen_random(engine, engine.create_adapter(LoraSpec(rank=8, seed=seed), spec), seed)


def decode_tokens_per_s(engine: Engine, slots: list[int], tokens: int) -> float:
    """Submit one request per slot, run the prefill step, then time the decode steps."""
    states = []
    for i, slot in enumerate(slots):
        adapter = engine.slots[slot].delta_mem if slot != BASE_SLOT else None
        memory = None if adapter is None else MemoryInput(adapter.empty_state(1)[0].cpu())
        prompt = [(7 * i + j) % 500 + 3 for j in range(8)]
        params = SamplingParams(max_tokens=tokens, temperature=0.0, stop=[])
        states.append(engine.submit(SampleRequest(slot, prompt, params, memory=memory)))
    engine.step()  # the prompts, and every row's first token
    t0 = time.perf_counter()
    while not all(s.done for s in states):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return len(slots) * (tokens - 1) / (time.perf_counter() - t0)


def medians(configs: dict[str, tuple[Engine, list[int]]], tokens: int, repeats: int) -> dict[str, float]:
    """Round robin over the configurations (one warm-up round first), so drift in a shared machine's
    load spreads over all of them alike."""
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats + 1):
        for name, (engine, slots) in configs.items():
            runs[name].append(decode_tokens_per_s(engine, slots, tokens))
    return {name: round(statistics.median(r[1:]), 1) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="test")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", "qwen3", size=args.size)
        plain = Engine(model_dir)
        engine = Engine(model_dir)
        lora = frozen(engine, False, True, 1)
        memory = frozen(engine, True, False, 2)
        both = frozen(engine, True, True, 3)
        quarter = args.rows // 4
        configs = {
            "base_plain": (plain, [BASE_SLOT] * args.rows),
            "base": (engine, [BASE_SLOT] * args.rows),
            "lora": (engine, [lora] * args.rows),
            "delta_mem": (engine, [memory] * args.rows),
            "delta_mem_lora": (engine, [both] * args.rows),
            "mixed": (
                engine,
                [BASE_SLOT] * quarter + [lora] * quarter + [memory] * quarter + [both] * quarter,
            ),
        }
        figures = medians(configs, args.tokens, args.repeats)
    print(
        json.dumps(
            {
                "config": {**vars(args), "model": "qwen3", "device": str(engine.device)},
                "decode_tokens_per_s": figures,
                "ratio_vs_base": {k: round(v / figures["base"], 3) for k, v in figures.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
