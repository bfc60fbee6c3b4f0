"""MinT's checkpoint interpolation (model soups): Σ cᵢ·Δᵢ of stored revisions as a new sampler revision.

Shared by `POST /api/v1/mint/checkpoints/interpolate` (the `mint` SDK's `interpolate_checkpoints`) and
`mintd adapters interpolate`. Works on stored bytes only, never on an engine: any replica or the CLI
can run it. The output's lineage names every source; its metadata records the coefficients.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from mintd.catalog import Provenance, Revision
from mintd.catalog import validate as catalog_validate
from mintd.engine.combine import combine, compress
from mintd.service.checkpoints import Checkpoints
from mintd.store.packed import pack

MAX_RANK = 1024  # LoraSpec's bound


@dataclass(frozen=True)
class Interpolation:
    revision: Revision
    rank: int
    truncation_error: float | None  # relative Frobenius error of the SVD compression, when asked

    @property
    def path(self) -> str:
        """A tinker:// path that pins the output revision (what the SDK's create_sampling_client takes)."""
        return f"tinker://adapters/{self.revision.owner}/{self.revision.adapter}@{self.revision.number}"


def output_adapter(output_path: str | None) -> str:
    """`output_path` names the catalog adapter to write (a name, or `tinker://adapters/<name>`); without
    one, a fresh adapter `interpolated-<hex>`."""
    if output_path is None:
        return f"interpolated-{uuid.uuid4().hex[:12]}"
    name = output_path.removeprefix("tinker://adapters/")
    return catalog_validate.name(name, "output_path")


def interpolate(
    checkpoints: Checkpoints,
    owner: str,
    source_paths: list[str],
    coefficients: list[float],
    adapter: str,
    rank: int | None = None,
) -> Interpolation:
    """Resolve, check, combine exactly (rank Σ rᵢ), optionally compress to `rank`, store."""
    if not source_paths:
        raise ValueError("source_paths: give at least one checkpoint")
    if len(coefficients) != len(source_paths):
        raise ValueError(f"coefficients: {len(coefficients)} given for {len(source_paths)} source_paths")
    for i, c in enumerate(coefficients):
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
            raise ValueError(f"coefficients[{i}]: must be a finite number")
    if rank is not None and not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank: must be in [1, {MAX_RANK}]")
    revs = [
        checkpoints.catalog.resolve(owner, p, field=f"source_paths[{i}]") for i, p in enumerate(source_paths)
    ]
    first = revs[0].provenance
    for i, rev in enumerate(revs[1:], start=1):
        if rev.provenance.base_fingerprint != first.base_fingerprint:
            raise ValueError(
                f"source_paths[{i}]: {rev.ref} was trained on base model {rev.provenance.base_model!r}, "
                f"but source_paths[0] ({revs[0].ref}) on {first.base_model!r}; only adapters of one base "
                "model combine"
            )
    sources = []
    for i, rev in enumerate(revs):
        packed = checkpoints.read(rev, f"source_paths[{i}]")
        if packed.header.delta_mem is not None:
            raise ValueError(
                f"source_paths[{i}]: {rev.ref} is a delta_mem adapter; only LoRA adapters combine"
            )
        sources.append((packed.header.spec, packed.tensors))
    total = sum(spec.rank for spec, _ in sources)
    if total > MAX_RANK:
        raise ValueError(f"source_paths: the exact combination would have rank {total} > {MAX_RANK}")
    spec, tensors = combine(sources, [float(c) for c in coefficients])
    error = None
    if rank is not None:
        spec, tensors, error = compress(spec, tensors, rank)
    provenance = Provenance(
        base_fingerprint=first.base_fingerprint, base_model=first.base_model, lora_config=spec.model_dump()
    )
    metadata: dict[str, Any] = {
        "interpolation": {
            "sources": [rev.ref for rev in revs],
            "coefficients": [float(c) for c in coefficients],
            "exact_rank": total,
            **({"rank": rank, "truncation_error": error} if rank is not None else {}),
        }
    }
    parents = tuple(dict.fromkeys(rev.ref for rev in revs))  # a source named twice is one parent
    data = pack(spec, tensors, first.base_fingerprint)
    rev = checkpoints.add(owner, adapter, data, "sampler", provenance, parents=parents, metadata=metadata)
    return Interpolation(rev, spec.rank, error)
