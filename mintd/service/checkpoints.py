"""Tinker checkpoints as catalog revisions: every save is a packed blob plus a revision with provenance.

A save puts the packed adapter into the content-addressed blob store (temporary file, fsync, rename),
then registers the revision in the catalog; that commit is the acknowledgment. A crash before it leaves
at most an unreferenced blob (collected by `mintd adapters gc`), a crash after it loses nothing.

`tinker://<training_run_id>/<kind>/<name>` is one way to name a revision; `name`, `name@N`,
`name:alias` and `owner/...` are the others, and every load accepts all of them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mintd.catalog import Catalog, Provenance, Revision
from mintd.residency.device import load_packed_into
from mintd.store.blobs import BlobNotFound, Blobs, BlobUnavailable
from mintd.store.packed import PackedAdapter, read_packed, refuse_peft

if TYPE_CHECKING:
    from mintd.engine.engine import Engine

# checkpoint kind in a tinker:// path -> the checkpoint_type the Tinker REST views report
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        """A path the catalog already accepted (it validates the grammar)."""
        return cls(*path[len("tinker://") :].split("/"))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"path: checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def run_adapter_name(run_id: str) -> str:
    """The catalog adapter a training run saves into unless its metadata names one: `s-…:train:0`
    becomes `s-….train.0` (adapter names cannot hold ':', which introduces an alias)."""
    return run_id.replace(":", ".")


class Checkpoints:
    """Revisions with their bytes: save (blob, then catalog), read, load into an engine, export.
    Metadata-only operations (resolve, list, delete, TTL) go to `catalog` directly."""

    def __init__(self, catalog: Catalog, blobs: Blobs) -> None:
        self.catalog = catalog
        self.blobs = blobs

    def add(
        self,
        owner: str,
        adapter: str,
        data: bytes,
        kind: str,
        provenance: Provenance,
        **revision: Any,
    ) -> Revision:
        """Store packed bytes durably, then register them (the acknowledgment) as the next revision;
        the blob is held against every replica's collector in between."""
        with self.catalog.hold_blob(hashlib.sha256(data).hexdigest()):
            sha = self.blobs.put(data)
            return self.catalog.register_revision(
                owner, adapter, sha, kind, provenance=provenance, size_bytes=len(data), **revision
            )

    def erase(self, owner: str, adapter: str) -> list[str]:
        """Delete an adapter's content (the privacy path, e.g. a δ-mem instance): tombstone its revisions,
        drop its aliases, and delete at once the blobs no live revision (of any owner) still uses; the
        hashes deleted."""
        erased = []
        for sha in self.catalog.delete_adapter(owner, adapter):
            with self.catalog.claim_blob(sha) as free:
                if free and self.blobs.exists(sha):
                    self.blobs.delete(sha)
                    erased.append(sha)
        return erased

    def read(self, rev: Revision, field: str = "path") -> PackedAdapter:
        """The revision's packed adapter, memory-mapped from its blob with every checksum verified."""
        try:
            return read_packed(self.blobs.path(rev.content_hash), verify=True)
        except (ValueError, BlobNotFound, BlobUnavailable) as exc:
            raise ValueError(f"{field}: the stored bytes of {rev.ref} are unreadable: {exc}") from None

    def load_into(
        self, engine: Engine, rev: Revision, *, trainable: bool, optimizer: bool, field: str = "path"
    ) -> int:
        """A new engine slot holding the revision, after checking it was trained on this engine's base."""
        packed = self.read_for(engine, rev, field)
        return load_packed_into(engine, packed, trainable=trainable, with_optimizer=optimizer)

    def read_for(self, engine: Engine, rev: Revision, field: str = "path") -> PackedAdapter:
        """`read`, after checking the revision was trained on `engine`'s base model (any thread)."""
        if rev.provenance.base_fingerprint != engine.fingerprint:
            raise ValueError(
                f"{field}: {rev.ref} was trained on base model {rev.provenance.base_model!r} "
                f"({rev.provenance.base_fingerprint[:12]}…), which is not this engine's base model"
            )
        return self.read(rev, field)

    def peft_files(self, rev: Revision) -> dict[str, bytes]:
        """The revision as a Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors)."""
        from mintd.store.peft import peft_files  # PEFT (and transformers) only when exporting

        packed = self.read(rev)
        refuse_peft(packed.header)
        model_type = rev.provenance.lora_config.get("base_model_type")
        return peft_files(packed.header.spec, packed.tensors, rev.provenance.base_model or "", model_type)
