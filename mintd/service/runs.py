"""Training-run records: who owns a run, on which base model, with which LoRA config.

A run's adapter lives in an engine slot and its saves in the catalog; this small record is what
outlives the process, so the REST views (`GET training_runs`) and create-from-state still know a run
after a restart. One JSON file per run, replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# What `create_model` makes (`<session id>:train:<n>`); nothing else may name a file here.
_RUN_ID = re.compile(r"s-[0-9a-f]{16,64}:train:[0-9]{1,19}")


class RunRecords:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, run_id: str) -> Path:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"training run id {run_id[:80]!r} is not one this server makes")
        return self.root / f"{run_id}.json"

    def write(self, run_id: str, record: dict[str, Any]) -> None:
        tmp = self._file(run_id).with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._file(run_id))

    def read(self, run_id: str) -> dict[str, Any] | None:
        if not _RUN_ID.fullmatch(run_id):
            return None
        path = self._file(run_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json"))
