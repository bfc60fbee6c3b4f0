"""Input checks. Each raises ValueError whose message starts with the field name, so every API layer
(REST 4xx, CLI, Tinker errors) can pass it through unchanged."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from mintd.catalog.types import NewRevision, Provenance, RevisionKind
from mintd.config import MAX_METADATA_BYTES

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Owners come from the API-key map and may be e-mail-like; '/' ':' and whitespace stay out so refs parse.
OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
TTL_MIN_S = 3600
TTL_MAX_S = 10 * 365 * 24 * 3600  # the Tinker API's bound: one hour to ten years, or null (never)
JSON_MAX_BYTES = MAX_METADATA_BYTES
TEXT_MAX = 512
TINKER_SCHEME = "tinker://"
# Tinker checkpoint kinds and the revision kind each save produces.
TINKER_KINDS = {
    "weights": RevisionKind.STATE.value,
    "sampler_weights": RevisionKind.SAMPLER.value,
    "external_weights": RevisionKind.EXTERNAL.value,
}
_TINKER_MAX = 1024


def name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{field}: {value!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def owner(value: Any) -> str:
    if not isinstance(value, str) or not OWNER_RE.fullmatch(value):
        raise ValueError(f"owner: {value!r} must be 1-128 letters, digits or '.', '_', '-', '@', '+'")
    return value


def content_hash(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValueError(f"content_hash: {value!r} must be 64 lowercase hex digits (a sha256)")
    return value


_KINDS = frozenset(k.value for k in RevisionKind)


def kind(value: Any) -> str:
    if isinstance(value, str) and value in _KINDS:
        return str(value)
    raise ValueError(f"kind: {value!r} must be one of {', '.join(sorted(_KINDS))}")


def ttl(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not TTL_MIN_S <= value <= TTL_MAX_S:
        raise ValueError(
            f"ttl_seconds: {value!r} must be between {TTL_MIN_S} and {TTL_MAX_S} (10 years), or null"
        )
    return value


def text(value: Any, field: str, *, optional: bool = True, max_len: int = TEXT_MAX) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len or not value.isprintable():
        raise ValueError(f"{field}: must be a non-empty printable string of at most {max_len} characters")
    return value


def count(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{field}: {value!r} must be a non-negative integer")
    return value


def finite(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field}: {value!r} must be a finite number")
    return float(value)


class JsonText(str):
    """A JSON document already encoded (and size-checked) by validation. The engine's JSON serializer
    (`dump_json`) writes it as is, so a document is encoded once, not once to check and once to bind."""


_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_EMPTY = JsonText("{}")


def dump_json(value: Any) -> str:
    return value if isinstance(value, JsonText) else _encode(value)


def json_object(value: Any, field: str, *, optional: bool = False) -> JsonText | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: must be a JSON object")
    if not value:
        return _EMPTY
    try:
        encoded = JsonText(_encode(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: not JSON-serializable ({exc})") from None
    if len(encoded) > JSON_MAX_BYTES:
        raise ValueError(f"{field}: {len(encoded)} bytes of JSON, more than the {JSON_MAX_BYTES} allowed")
    return encoded


class JsonMemo:
    """`json_object` for one batch, remembering flat objects it has seen: a sweep's revisions repeat
    the same LoRA config and optimizer settings, so each distinct object is checked and encoded once.
    The key holds every value's type, so `True`, `1` and `1.0` (different JSON) never share an entry;
    objects holding lists or objects are not remembered, only checked."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, tuple[Any, ...], tuple[type, ...]], JsonText | None] = {}

    def __call__(self, value: Any, field: str, *, optional: bool = False) -> JsonText | None:
        if not isinstance(value, dict) or not value:
            return json_object(value, field, optional=optional)
        try:
            key = (field, tuple(value.items()), tuple(map(type, value.values())))
            return self._seen[key]
        except TypeError:  # an unhashable (nested) value
            return json_object(value, field, optional=optional)
        except KeyError:
            encoded = self._seen[key] = json_object(value, field, optional=optional)
            return encoded


def limit(value: Any, field: str = "limit", maximum: int = 10_000) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ValueError(f"{field}: {value!r} must be an integer from 1 to {maximum}")
    return value


def tinker_kind(path: str, field: str = "tinker_path") -> str:
    """Validate a tinker:// path and return the revision kind its checkpoint kind implies."""
    if len(path) > _TINKER_MAX or not path.startswith(TINKER_SCHEME) or not path.isprintable():
        raise ValueError(f"{field}: {path!r} must look like tinker://<training_run_id>/<kind>/<name>")
    parts = path[len(TINKER_SCHEME) :].split("/")
    if len(parts) != 3 or not all(parts) or any(" " in p for p in parts):
        raise ValueError(f"{field}: {path!r} must look like tinker://<training_run_id>/<kind>/<name>")
    if parts[1] not in TINKER_KINDS:
        raise ValueError(
            f"{field}: unknown checkpoint kind {parts[1]!r} "
            "(expected weights, sampler_weights or external_weights)"
        )
    return TINKER_KINDS[parts[1]]


def prefix(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value):
        raise ValueError(f"prefix: {value!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return value


def revision_values(new: NewRevision, encode: JsonMemo | None = None) -> dict[str, Any]:
    """Checked column values for one new revision (everything but adapter, number and times); a bulk
    registration passes one `JsonMemo` per batch as `encode`."""
    encode = encode or json_object
    p = new.provenance
    if not isinstance(p, Provenance):
        raise ValueError("provenance: must be a Provenance")
    values = {
        "kind": kind(new.kind),
        "content_hash": content_hash(new.content_hash),
        "size_bytes": count(new.size_bytes, "size_bytes"),
        "base_fingerprint": text(p.base_fingerprint, "provenance.base_fingerprint", optional=False),
        "base_model": text(p.base_model, "provenance.base_model"),
        "lora_config": encode(p.lora_config, "provenance.lora_config"),
        "training_run_id": text(p.training_run_id, "provenance.training_run_id"),
        "step": count(p.step, "provenance.step"),
        "loss_fn": text(p.loss_fn, "provenance.loss_fn"),
        "optimizer": encode(p.optimizer, "provenance.optimizer", optional=True),
        "data_fingerprint": text(p.data_fingerprint, "provenance.data_fingerprint"),
        "created_by": text(p.created_by, "provenance.created_by"),
        "tinker_path": new.tinker_path,
        "metadata": encode(new.metadata, "metadata"),
    }
    if new.tinker_path is not None:
        path_kind = tinker_kind(new.tinker_path)
        if path_kind != values["kind"]:
            raise ValueError(
                f"tinker_path: {new.tinker_path!r} holds a {path_kind} checkpoint, not {values['kind']}"
            )
    if not isinstance(new.parents, tuple | list) or not all(isinstance(x, str) for x in new.parents):
        raise ValueError("parents: must be a list of refs")
    ttl(new.ttl_seconds)
    name(new.adapter, "adapter")
    return values
