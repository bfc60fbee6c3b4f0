"""GC pause: what resident adapters cost Python's full garbage collection.

A full collection scans every tracked object under the GIL, so while it runs every request waits.
Resident adapters are most of a serving process's objects once its startup heap is frozen (as `mintd
serve` does). This measures, side by side in one process over the test model, the same `--adapters`
saved adapters held two ways:
  - adopted: the frozen slot a load makes (`residency.device`), whose weights are views of the packed
    buffer made when read;
  - owned: a tensor per matrix, as a sampling snapshot or a training run holds its weights.
Reported per way: tracked objects per adapter and the full collection's pause (median of `--repeats`),
and the ratio owned / adopted. Prints one JSON line; progress goes to stderr.
    python bench/gc_pause.py [--adapters 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import _fleet as fleet
import torch

from mintd.config import EngineSettings
from mintd.engine.engine import Engine
from mintd.engine.tiny import make_tiny_model, random_adapter
from mintd.residency.device import load_packed_into
from mintd.store.packed import pack, read_packed


def held(engine: Engine, blobs: list[bytes], way: str) -> list[int]:
    if way == "adopted":
        return [load_packed_into(engine, read_packed(b)) for b in blobs]
    return [engine.load_adapter(p.header.spec, p.tensors, trainable=False) for p in map(read_packed, blobs)]


def full_collection(repeats: int) -> tuple[int, float]:
    """Tracked objects, and the median pause (ms) of a full collection."""
    pauses = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - started) * 1000)
    return len(gc.get_objects()), statistics.median(pauses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(tempfile.mkdtemp(prefix="mintd-gcpause-")) / "model"
    make_tiny_model(model_dir, "qwen3", seed=0)
    engine = Engine(model_dir, EngineSettings(device="cpu"))
    fleet.log(f"packing {args.adapters:,} adapters (ranks 1-8)")
    blobs = [
        pack(*random_adapter(engine, 1 + i % 8, seed=i), engine.fingerprint) for i in range(args.adapters)
    ]
    gc.collect()
    gc.freeze()  # the startup heap, as `mintd serve` freezes it
    baseline, empty_ms = full_collection(args.repeats)
    out: dict[str, dict[str, float]] = {}
    for way in ("adopted", "owned"):
        slots = held(engine, blobs, way)
        objects, pause_ms = full_collection(args.repeats)
        out[way] = {
            "objects_per_adapter": round((objects - baseline) / len(slots), 1),
            "full_gc_ms": round(pause_ms, 2),
        }
        fleet.log(f"{way}: {out[way]}")
        for slot in slots:
            engine.drop(slot)
    print(
        json.dumps(
            {
                "bench": "gc_pause",
                "adapters": args.adapters,
                "threads": args.threads,
                "empty_full_gc_ms": round(empty_ms, 2),
                **out,
                "pause_ratio": round(out["owned"]["full_gc_ms"] / out["adopted"]["full_gc_ms"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
