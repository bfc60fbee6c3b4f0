"""SIGKILL a process at random points while it saves revisions and promotes an alias: afterwards no
partial revision is visible, no acknowledged one is lost, and the next process carries on."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mintd.catalog import Catalog, CatalogDB
from mintd.config import CatalogSettings
from mintd.store.blobs import BlobStore
from mintd.store.packed import read_packed
from tests.api.http import TinkerHTTP
from tests.servers import REPO, free_port, serve

ROUNDS = 10


def _run_and_kill(data_dir: Path, round_no: int, delay: float) -> list[str]:
    """Start the writer, SIGKILL it `delay` seconds after it is ready; the lines it acknowledged."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.service.crash_child", str(data_dir), str(round_no)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.strip())
            ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(60), f"writer never started: {proc.stderr.read() if proc.poll() is not None else ''}"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    return lines[1:]


def _check(data_dir: Path, acked_saves: dict[int, str], acked_promote: int | None) -> dict[int, str]:
    """Assert the invariants; the revisions now visible (number -> content hash)."""
    db = data_dir / "catalog.db"
    with sqlite3.connect(db) as conn:  # the database file itself is sound
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    catalog = Catalog(CatalogDB.from_settings(CatalogSettings(), data_dir))
    blobs = BlobStore(data_dir / "blobs")
    revisions = catalog.log("local", "policy", limit=10_000) if acked_saves else []
    numbers = sorted(r.number for r in revisions)
    assert numbers == list(range(1, len(numbers) + 1))  # no gap: nothing half-registered
    for rev in revisions:  # every visible revision is whole: its blob exists and verifies
        read_packed(blobs.path(rev.content_hash), verify=True)
    for number, sha in acked_saves.items():  # every acknowledged save is there, unchanged
        assert catalog.resolve("local", f"policy@{number}").content_hash == sha
    assert len(numbers) - len(acked_saves) <= 1  # at most the one save in flight at the kill
    if acked_promote is not None:
        alias = {a.name: a for a in catalog.show("local", "policy").aliases}["prod"]
        assert alias.number >= acked_promote  # promotes only move forward here: the ack holds
        read_packed(blobs.path(catalog.resolve("local", "policy:prod").content_hash), verify=True)
    catalog.db.engine.dispose()
    return {rev.number: rev.content_hash for rev in revisions}


def test_sigkill_while_saving_and_promoting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    acked_saves: dict[int, str] = {}
    acked_promote: int | None = None
    for round_no in range(ROUNDS):
        lines = _run_and_kill(data_dir, round_no, rng.uniform(0.0, 1.0))
        for line in lines:
            verb, number, *rest = line.split()
            if verb == "saved":
                acked_saves[int(number)] = rest[0]
            else:
                acked_promote = int(number)
        # a save that committed just before the kill, unacknowledged, is kept: from now on it is known
        acked_saves = _check(data_dir, acked_saves, acked_promote)
        print(f"round {round_no}: {len(lines)} acknowledgments, {len(acked_saves)} revisions")
    assert len(acked_saves) >= ROUNDS  # the kills landed while there was work going on


def test_sigkill_of_the_server_during_tinker_saves(qwen3_dir: Path, tmp_path: Path) -> None:
    """The whole service path: the SDK-facing server killed mid-save, restarted on the same data dir."""
    data_dir, port = tmp_path / "data", free_port()
    server = serve(qwen3_dir, data_dir, port)
    acked: list[str] = []
    with TinkerHTTP(f"http://127.0.0.1:{port}") as c:
        model_id = c.new_model()

        def save_forever() -> None:
            for seq in itertools.count(1):
                try:
                    done = c.result(
                        c.ok("save_weights", {"model_id": model_id, "seq_id": seq, "path": f"s{seq}"})
                    )
                except (httpx.TransportError, AssertionError):
                    return
                acked.append(done["path"])

        saver = threading.Thread(target=save_forever, daemon=True)
        saver.start()
        while len(acked) < 5:
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        saver.join(30)

    server = serve(qwen3_dir, data_dir, port)
    try:
        with TinkerHTTP(f"http://127.0.0.1:{port}") as c:
            listed = [
                x["tinker_path"] for x in c.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
            ]
            assert listed[: len(acked)] == acked and len(listed) - len(acked) <= 1
            body = {"session_id": c.session(), "model_seq_id": 0, "path": acked[-1], "optimizer": True}
            assert c.result(c.ok("load_weights", body))["model_id"]  # the newest acknowledged state loads
    finally:
        server.kill()
        server.wait(10)
