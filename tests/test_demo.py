"""`mintd demo`, short: it trains, serves each policy through /v1 with the openai client, warns about
nothing, and ends saying where its data is and what next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_cleanly_and_points_onward(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    command = [sys.executable, "-m", "mintd.cli", "demo", "--data-dir", str(data), "--sl-steps", "3"]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--rl-steps", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Warning" not in out, f"the demo warns:\n{out}"
    assert "3 policies trained concurrently" in out
    assert "Served through the OpenAI endpoint (/v1)" in out
    for policy in ("counter", "adder", "colorist"):  # by its prod alias, or its newest revision
        assert f"local/{policy}@" in out, out
    assert "from openai import OpenAI" in out and 'base_url="http://127.0.0.1:8000/v1"' in out
    assert f"the base model is in {data / 'tiny-qwen3'}" in out.replace("\n", "")
    for command in ("mintd adapters list", "mintd adapters log counter", "mintd serve --model tiny="):
        assert command in out, f"{command!r} is not among the next steps:\n{out}"
    assert (data / "server" / "catalog.db").is_file()
