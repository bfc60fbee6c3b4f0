"""Checkpoint downloads: the Tinker export endpoints and the signed links they hand out.

`external_weights_urls` (tinker 0.38) answers one link per file of a PEFT folder; `archive` (tinker 0.22)
answers a 302 to one link for a .tar.gz of the same folder. The links point back at this server
(`/api/v1/downloads/<token>/<file>`), like a signed object-store URL: whoever holds one may fetch that
file of that revision until the token expires, without an API key. The files are made from the packed
revision on request; optimizer state is never exported. Behind a proxy that rewrites Host, links start
with the configured `public_url` instead of the request's own base URL.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import StringConstraints

from mintd.api.auth import Authenticator, Unauthorized
from mintd.api.errors import ERROR_RESPONSES
from mintd.api.tinker import Id, owner, service
from mintd.catalog import Revision
from mintd.service.tinker import TinkerService
from mintd.store.peft import CONFIG_FILE, README_FILE, WEIGHTS_FILE, tar_gz

router = APIRouter(prefix="/api/v1", tags=["exports"], responses=ERROR_RESPONSES)
ARCHIVE = "archive.tar.gz"
_AUDIENCE = "download"
_MEDIA = {
    CONFIG_FILE: "application/json",
    WEIGHTS_FILE: "application/octet-stream",
    README_FILE: "text/markdown",
    ARCHIVE: "application/gzip",
}


def _link(request: Request, who: str, rev: Revision, filename: str) -> str:
    auth: Authenticator = request.app.state.auth
    settings = request.app.state.settings
    claims = {"aud": _AUDIENCE, "sub": who, "ref": rev.ref, "file": filename}
    token = auth.sign(claims, settings.download_ttl_s)
    path = request.app.url_path_for("download", token=token, filename=filename)
    if settings.public_url:
        return settings.public_url.rstrip("/") + path
    return str(request.url_for("download", token=token, filename=filename))


def _expires(request: Request) -> float:
    return time.time() + request.app.state.settings.download_ttl_s


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(
    run_id: Id,
    checkpoint_id: Id,
    request: Request,
    who: str = Depends(owner),
    svc: TinkerService = Depends(service),
) -> dict[str, Any]:
    rev = svc.checkpoint(who, run_id, checkpoint_id)
    urls = {name: _link(request, who, rev, name) for name in (CONFIG_FILE, WEIGHTS_FILE, README_FILE)}
    return {"urls": urls, "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_expires(request)))}


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
def checkpoint_archive(
    run_id: Id,
    checkpoint_id: Id,
    request: Request,
    who: str = Depends(owner),
    svc: TinkerService = Depends(service),
) -> Response:
    rev = svc.checkpoint(who, run_id, checkpoint_id)
    headers = {"Expires": formatdate(_expires(request), usegmt=True)}
    return RedirectResponse(_link(request, who, rev, ARCHIVE), status_code=302, headers=headers)


@router.get("/downloads/{token}/{filename}", name="download")
def download(
    token: Annotated[str, StringConstraints(max_length=4096)],
    filename: Id,
    request: Request,
    svc: TinkerService = Depends(service),
) -> Response:
    auth: Authenticator = request.app.state.auth
    claims = auth.verify(token)
    if claims.get("aud") != _AUDIENCE or claims.get("file") != filename or filename not in _MEDIA:
        raise Unauthorized("this link is not valid for this file")
    files = svc.peft_files(claims["sub"], claims["ref"])  # 404 once the revision is deleted or expired
    data = tar_gz(files) if filename == ARCHIVE else files[filename]
    disposition = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response(data, media_type=_MEDIA[filename], headers=disposition)
