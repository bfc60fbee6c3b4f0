"""What the catalog hands out and takes in: frozen value objects, never live ORM rows.

Callers (service, REST, CLI) get copies they cannot write back through; the only way to change the
catalog is a `Catalog` method, which validates, writes and audits in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RevisionKind(StrEnum):
    SAMPLER = "sampler"  # Tinker save_weights_for_sampler: adapter weights only
    STATE = "state"  # Tinker save_state / save_weights: weights plus optimizer state, resumable
    EXTERNAL = "external"  # imported from outside (e.g. a Hugging Face PEFT folder)
    MEMORY = "memory"  # a δ-mem instance's state, committed by serving (service/memory)


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a revision came from. The service fills this from the training run on every save."""

    base_fingerprint: str  # identifies the exact base weights the adapter was trained against
    base_model: str | None = None  # human-readable base model name, for display
    lora_config: dict[str, Any] = field(default_factory=dict)
    training_run_id: str | None = None
    step: int | None = None
    loss_fn: str | None = None
    optimizer: dict[str, Any] | None = None  # hyperparameters of the last optimizer step
    data_fingerprint: str | None = None
    created_by: str | None = None  # the principal that saved it; defaults to the owner


@dataclass(frozen=True, slots=True)
class NewRevision:
    """One revision to register; `register_revisions_bulk` takes an iterable of these."""

    adapter: str
    content_hash: str  # sha256 hex of the packed adapter bytes in the blob store
    kind: RevisionKind | str
    provenance: Provenance
    parents: tuple[str, ...] = ()  # refs, resolved under the same owner
    tinker_path: str | None = None
    ttl_seconds: int | None = None
    size_bytes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Revision:
    id: int  # catalog-internal key, stable for the life of this database
    owner: str
    adapter: str
    adapter_id: str  # the adapter's public id
    number: int  # 1, 2, 3 ... per adapter, never reused
    kind: str
    content_hash: str
    size_bytes: int | None
    provenance: Provenance
    tinker_path: str | None
    created_at: float  # unix seconds
    expires_at: float | None
    deleted_at: float | None
    metadata: dict[str, Any]

    @property
    def ref(self) -> str:
        """The revision's permanent name, accepted by every method that takes a ref."""
        return f"{self.owner}/{self.adapter}@{self.number}"


@dataclass(frozen=True, slots=True)
class Adapter:
    id: str  # public id: stable even if names are ever made changeable
    owner: str
    name: str
    created_at: float
    last_number: int  # the highest revision number handed out so far (0: none yet)
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    owner: str
    adapter: str
    number: int  # the revision it points at
    revision_id: int
    updated_at: float

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.adapter}:{self.name}"


@dataclass(frozen=True, slots=True)
class AdapterView:
    """`show`: one adapter with its live revisions (newest first) and its aliases."""

    adapter: Adapter
    revisions: tuple[Revision, ...]
    aliases: tuple[Alias, ...]


@dataclass(frozen=True, slots=True)
class Gate:
    """Promotion precondition: some evaluation of the target has suite/metric value >= threshold."""

    suite: str
    metric: str
    threshold: float


@dataclass(frozen=True, slots=True)
class Evaluation:
    id: int
    revision: str  # the evaluated revision's ref (owner/adapter@N)
    suite: str
    metric: str
    value: float
    dataset_fingerprint: str | None
    evaluator: str | None
    created_at: float
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str  # e.g. revision.register, alias.promote, alias.rollback, revision.delete
    subject: str  # a ref: owner/adapter, owner/adapter@N or owner/adapter:alias
    details: dict[str, Any]
