"""Residency: which adapters occupy an engine's slots, under byte budgets (see `manager`)."""

from mintd.residency.manager import NoRoom, Residency

__all__ = ["NoRoom", "Residency"]
