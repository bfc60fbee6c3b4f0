"""A writer to SIGKILL: saves packed adapters through `Checkpoints.add` (what every Tinker save calls)
and promotes an alias, forever.

Run as `python -m tests.service.crash_child DATA_DIR ROUND`. After each call returns it prints what
was acknowledged (`saved N SHA`, `promoted N`), flushed, so the killer knows exactly what the process
had been told was durable at the moment it died.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from mintd.catalog import Catalog, CatalogDB, Provenance
from mintd.config import CatalogSettings
from mintd.engine.adapters import LoraSpec
from mintd.service.checkpoints import Checkpoints, TinkerPath
from mintd.store.blobs import BlobStore
from mintd.store.packed import pack

FINGERPRINT = "c" * 64
SPEC = LoraSpec(rank=8)


def adapter(gen: torch.Generator, width: int) -> bytes:
    """A packed adapter of a few hundred KiB to a few MiB, so saves spend real time writing."""
    tensors = {}
    for layer in range(4):
        name = f"model.layers.{layer}.self_attn.q_proj"
        tensors[f"{name}.lora_A"] = torch.randn(SPEC.rank, width, generator=gen)
        tensors[f"{name}.lora_B"] = torch.randn(width, SPEC.rank, generator=gen)
    return pack(SPEC, tensors, FINGERPRINT)


def main(data_dir: Path, round_no: int) -> None:
    catalog = Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir))
    checkpoints = Checkpoints(catalog, BlobStore(data_dir / "blobs"))
    rng, gen = random.Random(round_no), torch.Generator().manual_seed(round_no)
    print("ready", flush=True)
    for i in range(1_000_000):
        data = adapter(gen, rng.choice([1024, 4096, 16384]))
        path = TinkerPath(f"run-{round_no}", "sampler_weights", f"s{i}")
        provenance = Provenance(FINGERPRINT)
        rev = checkpoints.add("local", "policy", data, "sampler", provenance, tinker_path=str(path))
        print(f"saved {rev.number} {rev.content_hash}", flush=True)
        if rng.random() < 0.5:
            catalog.promote("local", "policy", "prod", rev.number)
            print(f"promoted {rev.number}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
