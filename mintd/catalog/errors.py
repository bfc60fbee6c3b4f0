"""The two ways a catalog call fails besides bad input (plain ValueError naming the field)."""

from __future__ import annotations


class CatalogNotFound(LookupError):
    """No such adapter, revision, alias or evaluation *for this owner* (HTTP 404).

    Another owner's objects raise exactly this too, with the same wording, so a caller can never learn
    whether a name exists under someone else.
    """


class CatalogConflict(ValueError):
    """Well-formed request refused by the catalog's state (HTTP 409): an evaluation gate not met, a
    revision still targeted by an alias, nothing left to roll back to, a tinker path already saved.

    A ValueError subclass so callers that only map ValueError to 4xx still answer correctly; the message
    starts with the field it concerns, like every other input error.
    """
