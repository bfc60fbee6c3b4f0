"""Assembling a server: engines for the named base models, the control plane, the HTTP app."""

from __future__ import annotations

import gc
import ipaddress
import secrets
import socket
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from mintd.api.app import create_app
from mintd.api.auth import Authenticator
from mintd.catalog import Catalog, CatalogDB
from mintd.config import BlobSettings, CatalogSettings, EngineSettings, ServeSettings
from mintd.engine.engine import Engine
from mintd.service.checkpoints import Checkpoints
from mintd.service.futures import FutureStore
from mintd.service.metrics import Metrics
from mintd.service.runs import ReplicaInfo, RunRecords
from mintd.service.serving import Serving
from mintd.service.threads import on_passing_thread
from mintd.service.tinker import TinkerService
from mintd.store.blobs import open_blobs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret(data_dir: Path) -> bytes:
    """The JWT signing key: made once per data dir, so tokens survive a restart."""
    path = data_dir / "jwt-secret"
    if not path.is_file():
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def parse_keys(keys: list[str]) -> dict[str, str]:
    """`KEY` (owner named after the key's prefix) or `OWNER=KEY`."""
    out = {}
    for item in keys:
        owner, sep, key = item.partition("=")
        if not sep:
            owner, key = f"key-{item[:8]}", item
        if not key or not owner:
            raise ValueError(f"--api-key: {item!r} must be KEY or OWNER=KEY")
        out[key] = owner
    return out


def build_app(
    models: dict[str, Path],
    settings: ServeSettings | None = None,
    api_keys: list[str] | None = None,
    engine_settings: EngineSettings | None = None,
    catalog_settings: CatalogSettings | None = None,
    blob_settings: BlobSettings | None = None,
) -> tuple[FastAPI, TinkerService]:
    settings = settings or ServeSettings()
    blob_settings = blob_settings or BlobSettings()
    keys = parse_keys(api_keys or [])
    if not keys and not is_loopback(settings.host):
        raise ValueError(f"--host {settings.host}: binding beyond loopback needs at least one --api-key")
    if not models:
        raise ValueError("--model: give at least one NAME=DIR")
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # The shared stores first: a wrong URL fails in a second, not after loading the models.
    catalog = Catalog(CatalogDB.from_settings(catalog_settings or CatalogSettings(), data_dir))
    blobs = open_blobs(blob_settings.blob_url, data_dir, int(blob_settings.blob_cache_budget))
    runs = RunRecords(catalog.db, replica_info(settings))
    runs.import_folder(data_dir / "runs")
    engines = on_passing_thread(
        lambda: {name: Engine(path, engine_settings) for name, path in models.items()}
    )
    runs.start_heartbeat()
    service = TinkerService(
        engines,
        Checkpoints(catalog, blobs),
        runs,
        FutureStore(settings.future_retention_s),
        settings,
    )
    auth = Authenticator(keys, _secret(data_dir))
    serving = Serving(service, settings, Metrics(service))
    app = create_app(service, auth, settings, catalog=catalog, blobs=blobs, serving=serving)
    return app, service


def freeze_startup_heap() -> None:
    """Take what startup built (models, libraries' module state: some 500,000 objects) out of the cyclic
    garbage collector's sight. Otherwise every full collection walks all of it under the GIL, and loads
    of cold adapters, which allocate, set them off while the engine thread steps (measured: a 340 ms
    pause with 800,000 objects tracked). For a serving process's entry point, once, after `build_app`;
    never in a process that builds and drops servers (what is frozen is never collected)."""
    gc.collect()
    gc.freeze()


def replica_info(settings: ServeSettings) -> ReplicaInfo:
    """This process among the replicas of one catalog: its name, where clients reach it, its lease."""
    name = settings.replica_id or f"{socket.gethostname()}:{settings.port}"
    url = settings.public_url or f"http://{settings.host}:{settings.port}"
    return ReplicaInfo(name, url, settings.run_lease_s)


class ServerThread:
    """A real uvicorn server on a background thread (the demo and the end-to-end tests use it)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="mintd-http", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server failed to start on {self.url}")
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
