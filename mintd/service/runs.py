"""Training-run records and the replica that holds each run, in the catalog database every replica shares.

A run's adapter lives in one replica's engine slot; its saves are catalog revisions any replica serves.
The record (owner, base model, LoRA config) outlives the process, so the REST views and create-from-state
know a run after a restart and on every replica. `replica` names the process holding the run; that
replica's heartbeat row is the lease: while it is fresher than `lease_s`, requests for the run that
reach another replica are refused with `RunElsewhere` (HTTP 409) naming where it lives, so a router can
send them there. A replica that dies stops beating and its lease lapses; its runs' saved states resume
on any replica.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from mintd.catalog.db import CatalogDB
from mintd.catalog.models import Replica, TrainingRun

log = logging.getLogger("mintd.runs")
_runs = TrainingRun.__table__
_replicas = Replica.__table__


class RunElsewhere(LookupError):
    """A request for a training run held by another replica (HTTP 409 naming it)."""

    def __init__(self, run_id: str, replica: str, url: str, lease_left_s: float) -> None:
        self.run_id, self.replica, self.url, self.lease_left_s = run_id, replica, url, lease_left_s
        if lease_left_s > 0:
            msg = f"model_id: training run {run_id} lives on replica {replica} ({url}); send requests there"
        else:
            msg = (
                f"model_id: training run {run_id} lived on replica {replica} ({url}), whose lease lapsed "
                f"{-lease_left_s:.0f}s ago (the replica stopped); resume it from its last saved state"
            )
        super().__init__(msg)

    @property
    def live(self) -> bool:
        return self.lease_left_s > 0


@dataclass(frozen=True)
class ReplicaInfo:
    name: str
    url: str
    lease_s: float


class RunRecords:
    def __init__(self, db: CatalogDB, replica: ReplicaInfo) -> None:
        self.db = db
        self.replica = replica
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat(started=True)

    # records --------------------------------------------------------------------------------------

    def write(self, run_id: str, record: dict[str, Any]) -> None:
        """Record a run as held by this replica (a new run, or one replaced in place)."""
        values = {"owner": record["owner"], "replica": self.replica.name, "record": record}
        with self.db.write() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(insert(_runs).values(id=run_id, created_at=time.time(), **values))
            except IntegrityError:
                conn.execute(update(_runs).where(_runs.c.id == run_id).values(**values))

    def release(self, run_id: str) -> None:
        """The run's adapter left this replica (unloaded): no replica holds it any more."""
        with self.db.write() as conn:
            conn.execute(
                update(_runs)
                .where(_runs.c.id == run_id, _runs.c.replica == self.replica.name)
                .values(replica=None)
            )

    def read(self, run_id: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            return conn.execute(select(_runs.c.record).where(_runs.c.id == run_id)).scalar()

    def ids(self, owner: str) -> list[str]:
        with self.db.read() as conn:
            stmt = select(_runs.c.id).where(_runs.c.owner == owner).order_by(_runs.c.id)
            return list(conn.execute(stmt).scalars())

    def elsewhere(self, run_id: str, owner: str) -> RunElsewhere | None:
        """Why this replica cannot serve `owner`'s run: held by another replica (alive or not); None
        when nobody else holds it (unknown, unloaded, or this replica's own)."""
        stmt = (
            select(_runs.c.replica, _replicas.c.url, _replicas.c.heartbeat_at)
            .select_from(_runs.join(_replicas, _replicas.c.name == _runs.c.replica))
            .where(_runs.c.id == run_id, _runs.c.owner == owner)
        )
        with self.db.read() as conn:
            row = conn.execute(stmt).first()
        if row is None or row.replica == self.replica.name:
            return None
        left = row.heartbeat_at + self.replica.lease_s - time.time()
        return RunElsewhere(run_id, row.replica, row.url, left)

    def import_folder(self, folder: Path) -> int:
        """Adopt the one-JSON-file-per-run records of earlier versions (`<data_dir>/runs`), once."""
        count = 0
        for path in sorted(Path(folder).glob("*.json")):
            if self.read(path.stem) is None:
                record = json.loads(path.read_text())
                self.write(path.stem, record)
                self.release(path.stem)  # its process is gone
                count += 1
            path.rename(path.with_suffix(".imported"))
        return count

    # the lease ------------------------------------------------------------------------------------

    def heartbeat(self, started: bool = False) -> None:
        now = time.time()
        r = self.replica
        values = {"url": r.url, "heartbeat_at": now}
        if started:
            values["started_at"] = now
        with self.db.write() as conn:
            done = conn.execute(update(_replicas).where(_replicas.c.name == r.name).values(**values))
            if done.rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(_replicas).values(name=r.name, **{"started_at": now, **values}))
                except IntegrityError:  # another process registered the same name just now
                    conn.execute(update(_replicas).where(_replicas.c.name == r.name).values(**values))

    def start_heartbeat(self) -> None:
        """Renew the lease three times per lease period, on a daemon thread, until `stop()`."""

        def beat() -> None:
            while not self._stop.wait(self.replica.lease_s / 3):
                try:
                    self.heartbeat()
                except Exception:  # the database may be briefly away; the next beat tries again
                    log.warning("replica %s: lease heartbeat failed", self.replica.name, exc_info=True)

        self._thread = threading.Thread(target=beat, name="mintd-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
