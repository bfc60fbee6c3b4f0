"""Checkpoints addressed by `tinker://<training_run_id>/<kind>/<name>`, kept under the data dir.

Each checkpoint is a folder holding the adapter's tensors (safetensors; optimizer state too for
`weights/`) and a metadata file. It is written to a temporary folder, fsynced, then renamed into
place, so a half-written checkpoint is never visible.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

KINDS = {"weights": "training", "sampler_weights": "sampler"}
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_TEN_YEARS = 10 * 365 * 24 * 3600


class CheckpointNotFound(LookupError):
    """An unknown or expired checkpoint (a LookupError, not a KeyError, so its message prints plainly)."""


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    @classmethod
    def parse(cls, path: str, field: str = "path") -> TinkerPath:
        if not path.startswith("tinker://"):
            raise ValueError(f"{field}: {path!r} is not a tinker:// path")
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{field}: {path!r} must look like tinker://<run>/<kind>/<name>")
        if parts[1] not in KINDS:
            kinds = " or ".join(KINDS)
            raise ValueError(f"{field}: unknown checkpoint kind {parts[1]!r} (expected {kinds})")
        return cls(*parts)

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class CheckpointInfo:
    path: str
    checkpoint_id: str
    checkpoint_type: str
    created_at: float
    size_bytes: int
    expires_at: float | None
    meta: dict[str, Any]


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"path: checkpoint name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def check_ttl(ttl_seconds: int | None) -> int | None:
    if ttl_seconds is not None and not 3600 <= ttl_seconds <= _TEN_YEARS:
        raise ValueError("ttl_seconds: must be between 3600 and 10 years, or null (never expires)")
    return ttl_seconds


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, p: TinkerPath) -> Path:
        return self.root / p.run_id / p.kind / p.name

    def save(
        self,
        p: TinkerPath,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        ttl_seconds: int | None = None,
        overwrite: bool = False,
    ) -> CheckpointInfo:
        final = self._dir(p)
        if final.exists() and not overwrite and not self._expired(final):
            raise ValueError(f"path: checkpoint {p} already exists (pass overwrite=True to replace it)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "adapter.safetensors")
            now = time.time()
            info = {
                "meta": meta,
                "created_at": now,
                "expires_at": None if ttl_seconds is None else now + ttl_seconds,
            }
            (tmp / "checkpoint.json").write_text(json.dumps(info))
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.info(p)

    def _expired(self, folder: Path) -> bool:
        expires = json.loads((folder / "checkpoint.json").read_text()).get("expires_at")
        return expires is not None and expires < time.time()

    def info(self, p: TinkerPath) -> CheckpointInfo:
        folder = self._dir(p)
        if not (folder / "checkpoint.json").is_file() or self._expired(folder):
            raise CheckpointNotFound(f"checkpoint {p} not found (or expired)")
        data = json.loads((folder / "checkpoint.json").read_text())
        return CheckpointInfo(
            path=str(p),
            checkpoint_id=p.checkpoint_id,
            checkpoint_type=KINDS[p.kind],
            created_at=data["created_at"],
            size_bytes=(folder / "adapter.safetensors").stat().st_size,
            expires_at=data["expires_at"],
            meta=data["meta"],
        )

    def load(self, p: TinkerPath) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
        info = self.info(p)
        return info, load_file(self._dir(p) / "adapter.safetensors")

    def list(self, run_id: str) -> list[CheckpointInfo]:
        out = []
        for kind in KINDS:
            folder = self.root / run_id / kind
            for child in sorted(folder.iterdir()) if folder.is_dir() else ():
                if child.name.startswith(".tmp-"):
                    continue
                try:
                    out.append(self.info(TinkerPath(run_id, kind, child.name)))
                except CheckpointNotFound:
                    continue
        return sorted(out, key=lambda c: c.created_at)

    def delete(self, p: TinkerPath) -> None:
        self.info(p)
        shutil.rmtree(self._dir(p))

    def set_ttl(self, p: TinkerPath, ttl_seconds: int | None) -> None:
        self.info(p)
        path = self._dir(p) / "checkpoint.json"
        data = json.loads(path.read_text())
        data["expires_at"] = None if ttl_seconds is None else time.time() + ttl_seconds
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    def write_run(self, run_id: str, record: dict[str, Any]) -> None:
        folder = self.root / run_id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "run.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(folder / "run.json")

    def read_run(self, run_id: str) -> dict[str, Any] | None:
        path = self.root / run_id / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run_ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/run.json"))
