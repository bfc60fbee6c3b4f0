"""Populations of distinct saved adapters, made cheaply: random LoRA weights packed for the served base
model and saved through the real checkpoint path (blob, then catalog revision), as a training run's
save would be."""

from __future__ import annotations

import torch

from mintd.catalog import Provenance, Revision
from mintd.engine.adapters import LoraSpec
from mintd.service.tinker import TinkerService
from mintd.store.packed import pack


def save_population(
    service: TinkerService, names: list[str], seed: int = 0, std: float = 0.3, rank: int = 2
) -> list[Revision]:
    """One `sampler` revision per name, each with its own random weights (so each answers differently)."""
    handle = service.models["tiny"]
    spec = LoraSpec(rank=rank, seed=0)

    def template(engine) -> dict[str, torch.Tensor]:
        slot = engine.create_adapter(spec)
        try:
            return engine.export_adapter(slot)[1]
        finally:
            engine.drop(slot)

    shapes = handle.worker.call(template)
    engine = handle.engine
    provenance = Provenance(engine.fingerprint, "tiny", engine.lora_provenance(spec))
    gen = torch.Generator().manual_seed(seed)
    saved = []
    for name in names:
        tensors = {k: torch.randn(v.shape, generator=gen) * std for k, v in shapes.items()}
        data = pack(spec, tensors, engine.fingerprint)
        saved.append(service.checkpoints.add("local", name, data, "sampler", provenance))
    return saved


def copy_revision(service: TinkerService, rev: Revision, name: str) -> Revision:
    """The same bytes as `rev`, saved as the next revision of adapter `name`."""
    data = service.checkpoints.blobs.read(rev.content_hash)
    return service.checkpoints.add("local", name, data, "sampler", rev.provenance)


def resident_bytes(service: TinkerService, rev: Revision) -> int:
    """What one copy of `rev` occupies in an engine slot (the unit of the device byte budget)."""

    def measure(engine) -> int:
        slot = service.checkpoints.load_into(engine, rev, trainable=False, optimizer=False)
        try:
            return engine.slots[slot].nbytes
        finally:
            engine.drop(slot)

    return service.models["tiny"].worker.call(measure)
