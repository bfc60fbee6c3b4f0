"""The service's own failure type besides ValueError (bad input, HTTP 400)."""

from __future__ import annotations


class NotFound(LookupError):
    """An unknown object, or another owner's (HTTP 404, worded alike so existence does not leak)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"
