"""The adapter catalog: identity, immutable revisions, aliases, provenance, evaluations, audit log.

Open it with `Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir))`; everything else goes
through `Catalog`'s methods (see `mintd.catalog.api`). Knows nothing about tensors or bytes: a revision
names its bytes by content hash, and the blob store keeps them.
"""

from mintd.catalog.api import Catalog
from mintd.catalog.db import CatalogDB
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.catalog.types import (
    Adapter,
    AdapterView,
    Alias,
    AuditEntry,
    Evaluation,
    Gate,
    NewRevision,
    Provenance,
    Revision,
    RevisionKind,
)

__all__ = [
    "Adapter",
    "AdapterView",
    "Alias",
    "AuditEntry",
    "Catalog",
    "CatalogConflict",
    "CatalogDB",
    "CatalogNotFound",
    "Evaluation",
    "Gate",
    "NewRevision",
    "Provenance",
    "Revision",
    "RevisionKind",
]
