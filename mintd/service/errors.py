"""The service's own failure types besides ValueError (bad input, HTTP 400)."""

from __future__ import annotations


class NotFound(LookupError):
    """An unknown object, or another owner's (HTTP 404, worded alike so existence does not leak)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class Gone(LookupError):
    """An object that existed but was closed (its session ended): HTTP 410, said plainly."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "gone"


class TooMany(Exception):
    """HTTP 429: retry after `retry_after_s` (the SDKs do)."""

    retry_after_s = 30


class QuotaExceeded(TooMany):
    """The owner already holds as many of these as allowed (HTTP 429)."""


class Busy(TooMany):
    """The server has more waiting work of this kind than it queues; soon it will have room."""

    retry_after_s = 1
