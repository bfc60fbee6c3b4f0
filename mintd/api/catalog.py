"""The adapter catalog over HTTP (/api/v1/catalog): browse, resolve, evaluate, promote, audit, and
import / export PEFT archives.

Thin: validate the body, call `Catalog` as the authenticated owner, serialize its frozen results.
Another owner's objects answer 404 exactly like missing ones (the catalog guarantees the wording);
bad input and refused state changes (a gate not met, a revision an alias still points at) are 400.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from mintd.api.errors import ERROR_RESPONSES
from mintd.api.tinker import Body, Id, owner, service
from mintd.catalog import Alias, Catalog, Gate, Revision
from mintd.config import MAX_INT
from mintd.service.tinker import TinkerService
from mintd.store.peft import tar_gz

router = APIRouter(prefix="/api/v1/catalog", tags=["catalog"], responses=ERROR_RESPONSES)


def catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def revision_json(rev: Revision) -> dict[str, Any]:
    return {**dataclasses.asdict(rev), "ref": rev.ref}


def alias_json(alias: Alias) -> dict[str, Any]:
    return {**dataclasses.asdict(alias), "ref": alias.ref}


def _in_adapter(name: str, ref: str) -> str:
    """A ref given under /adapters/{name}: `3`, `@3`, `:alias` are relative to the adapter."""
    if ref.isdigit():
        return f"{name}@{ref}"
    if ref[:1] in ("@", ":"):
        return name + ref
    return ref


def _revision_of(cat: Catalog, who: str, name: str, ref: str) -> Revision:
    rev = cat.resolve(who, _in_adapter(name, ref))
    if rev.adapter != name:
        raise ValueError(f"ref: {rev.ref} is not a revision of adapter {name!r}")
    return rev


# adapters ------------------------------------------------------------------------------------------


@router.get("/adapters")
def list_adapters(
    prefix: Id | None = None,
    limit: int = Query(100, ge=1, le=10_000),
    offset: int = Query(0, ge=0, le=MAX_INT),
    after: Id | None = None,
    who: str = Depends(owner),
    cat: Catalog = Depends(catalog),
) -> dict[str, Any]:
    found = cat.list_adapters(who, prefix=prefix, limit=limit, offset=offset, after=after)
    return {"adapters": [dataclasses.asdict(a) for a in found]}


@router.get("/adapters/{name}")
def show_adapter(
    name: Id,
    limit: int = Query(100, ge=1, le=10_000),
    who: str = Depends(owner),
    cat: Catalog = Depends(catalog),
) -> dict[str, Any]:
    view = cat.show(who, name, limit=limit)
    return {
        "adapter": dataclasses.asdict(view.adapter),
        "revisions": [revision_json(r) for r in view.revisions],
        "aliases": [alias_json(a) for a in view.aliases],
    }


@router.get("/adapters/{name}/log")
def adapter_log(
    name: Id,
    limit: int = Query(100, ge=1, le=10_000),
    before: int | None = Query(None, ge=1, le=MAX_INT),
    who: str = Depends(owner),
    cat: Catalog = Depends(catalog),
) -> dict[str, Any]:
    return {"revisions": [revision_json(r) for r in cat.log(who, name, limit=limit, before=before)]}


# revisions -----------------------------------------------------------------------------------------


@router.get("/resolve")
def resolve(ref: Id, who: str = Depends(owner), cat: Catalog = Depends(catalog)) -> dict[str, Any]:
    return revision_json(cat.resolve(who, ref))


@router.get("/lineage")
def lineage(
    ref: Id,
    limit: int = Query(1000, ge=1, le=10_000),
    who: str = Depends(owner),
    cat: Catalog = Depends(catalog),
) -> dict[str, Any]:
    start = cat.resolve(who, ref)
    return {
        "revision": revision_json(start),
        "ancestors": [revision_json(r) for r in cat.lineage(who, ref, limit=limit)],
    }


@router.delete("/revisions")
def delete_revision(ref: Id, who: str = Depends(owner), cat: Catalog = Depends(catalog)) -> dict[str, Any]:
    return revision_json(cat.delete_revision(who, ref))


@router.delete("/adapters/{name}")
def erase_adapter(
    name: str, who: str = Depends(owner), svc: TinkerService = Depends(service)
) -> dict[str, Any]:
    """Erase an adapter: every revision tombstoned, its aliases gone, and the blobs no live revision
    still uses deleted now (the privacy path of a δ-mem instance; refused while a request writes it).
    The name and the audit log stay."""
    return {"adapter": name, "erased_blobs": svc.memories.erase(who, name)}


@router.post("/adapters/{name}/import")
async def import_archive(
    name: Id,
    request: Request,
    base_model: Id | None = None,
    who: str = Depends(owner),
    svc: TinkerService = Depends(service),
) -> dict[str, Any]:
    """Body: a PEFT folder as .tar or .tar.gz. Becomes the adapter's next `external` revision."""
    archive = await request.body()
    rev = await run_in_threadpool(svc.import_peft_archive, who, name, archive, base_model)
    return revision_json(rev)


@router.get("/export")
def export_archive(ref: Id, who: str = Depends(owner), svc: TinkerService = Depends(service)) -> Response:
    """A revision as a PEFT folder in a .tar.gz (optimizer state is never exported)."""
    rev = svc.revision(who, ref, "ref")
    filename = f"{rev.adapter}-{rev.number}.tar.gz"
    return Response(
        tar_gz(svc.peft_files(who, rev.ref)),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# evaluations ---------------------------------------------------------------------------------------


class AddEvaluation(Body):
    ref: Id
    suite: Id
    metric: Id
    value: float
    dataset_fingerprint: Id | None = None
    evaluator: Id | None = None
    metadata: dict[str, Any] | None = None


@router.post("/adapters/{name}/evaluations")
def add_evaluation(
    name: Id, body: AddEvaluation, who: str = Depends(owner), cat: Catalog = Depends(catalog)
) -> dict[str, Any]:
    rev = _revision_of(cat, who, name, body.ref)
    evaluation = cat.add_evaluation(
        who,
        rev.ref,
        body.suite,
        body.metric,
        body.value,
        dataset_fingerprint=body.dataset_fingerprint,
        evaluator=body.evaluator,
        metadata=body.metadata,
    )
    return dataclasses.asdict(evaluation)


@router.get("/adapters/{name}/evaluations")
def list_evaluations(
    name: Id,
    ref: Id | None = Query(None, description="a revision of this adapter; default: its newest"),
    suite: Id | None = None,
    metric: Id | None = None,
    who: str = Depends(owner),
    cat: Catalog = Depends(catalog),
) -> dict[str, Any]:
    rev = _revision_of(cat, who, name, name if ref is None else ref)
    found = cat.evaluations(who, rev.ref, suite=suite, metric=metric)
    return {"revision": rev.ref, "evaluations": [dataclasses.asdict(e) for e in found]}


# aliases -------------------------------------------------------------------------------------------


class GateBody(Body):
    suite: Id
    metric: Id
    threshold: float


class Promote(Body):
    ref: Id
    gate: GateBody | None = None


@router.post("/adapters/{name}/aliases/{alias}")
def promote(
    name: Id, alias: Id, body: Promote, who: str = Depends(owner), cat: Catalog = Depends(catalog)
) -> dict[str, Any]:
    gate = None if body.gate is None else Gate(body.gate.suite, body.gate.metric, body.gate.threshold)
    return alias_json(cat.promote(who, name, alias, body.ref, gate=gate))


@router.post("/adapters/{name}/aliases/{alias}/rollback")
def rollback(
    name: Id, alias: Id, who: str = Depends(owner), cat: Catalog = Depends(catalog)
) -> dict[str, Any]:
    return alias_json(cat.rollback(who, name, alias))


# audit ---------------------------------------------------------------------------------------------


@router.get("/audit")
def audit(
    adapter: Id | None = None,
    limit: int = Query(100, ge=1, le=10_000),
    before: int | None = Query(None, ge=1, le=MAX_INT),
    who: str = Depends(owner),
    cat: Catalog = Depends(catalog),
) -> dict[str, Any]:
    entries = cat.audit(who, adapter=adapter, limit=limit, before=before)
    return {"entries": [dataclasses.asdict(e) for e in entries]}
