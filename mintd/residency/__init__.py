"""Residency: which adapters occupy an engine's slots, under byte budgets (see `manager`)."""

from mintd.residency.manager import AdapterKey, Loading, NoRoom, Residency, RunKey, SnapshotKey, Wait

__all__ = ["AdapterKey", "Loading", "NoRoom", "Residency", "RunKey", "SnapshotKey", "Wait"]
