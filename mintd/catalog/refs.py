"""The one grammar for naming a revision, shared by the Tinker API, serving, REST and the CLI.

    ref := [owner "/"] adapter                 newest live revision
         | [owner "/"] adapter "@" number       that revision
         | [owner "/"] adapter ":" alias        whatever the alias points at
         | "tinker://" run "/" kind "/" name    a Tinker save (kind: weights | sampler_weights |
                                                external_weights)
         | "tinker://adapters/" ref             any of the first three, spelled so that SDKs which
                                                insist on a tinker:// model_path accept it

A ref is always read on behalf of an owner; an owner prefix naming someone else is answered as
not-found, exactly like a name that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from mintd.catalog import validate
from mintd.catalog.errors import CatalogNotFound

CATALOG_PREFIX = validate.TINKER_SCHEME + "adapters/"


@dataclass(frozen=True, slots=True)
class Ref:
    adapter: str | None = None
    number: int | None = None
    alias: str | None = None
    tinker_path: str | None = None


def parse(text: object, owner: str, field: str = "ref") -> Ref:
    if not isinstance(text, str) or not text:
        raise ValueError(f"{field}: must be a non-empty string")
    rest = text
    if text.startswith(CATALOG_PREFIX):
        rest = text[len(CATALOG_PREFIX) :]
    elif text.startswith(validate.TINKER_SCHEME):
        validate.tinker_kind(text, field)
        return Ref(tinker_path=text)
    if not rest or rest.startswith(validate.TINKER_SCHEME):
        _bad(text, field)
    if "/" in rest:
        prefix, rest = rest.split("/", 1)
        if not validate.OWNER_RE.fullmatch(prefix):
            _bad(text, field)
        if prefix != owner:
            raise CatalogNotFound(f"{field}: {text!r} not found")
    if "@" in rest:
        adapter, number = rest.split("@", 1)
        if not number.isdigit() or number.startswith("0") or len(number) > 18:
            raise ValueError(f"{field}: {text!r}: a revision number after '@' must be a positive integer")
        return Ref(adapter=_adapter(adapter, text, field), number=int(number))
    if ":" in rest:
        adapter, alias = rest.split(":", 1)
        if not validate.NAME_RE.fullmatch(alias):
            _bad(text, field)
        return Ref(adapter=_adapter(adapter, text, field), alias=alias)
    return Ref(adapter=_adapter(rest, text, field))


def _adapter(name: str, text: str, field: str) -> str:
    if not validate.NAME_RE.fullmatch(name):
        _bad(text, field)
    return name


def _bad(text: str, field: str) -> NoReturn:
    raise ValueError(
        f"{field}: {text!r} is not a ref (expected [owner/]adapter, [owner/]adapter@N, "
        "[owner/]adapter:alias, tinker://<run>/<kind>/<name> or tinker://adapters/<ref>)"
    )
