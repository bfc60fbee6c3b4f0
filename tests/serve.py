"""`mintd serve` as its own process, for tests that must watch or kill the server itself."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, data_dir: Path, port: int, *args: str) -> subprocess.Popen:
    """Start `mintd serve --model tiny=<model_dir>` with extra `args`; return once it answers."""
    command = [sys.executable, "-m", "mintd.cli", "serve", "--model", f"tiny={model_dir}"]
    command += ["--data-dir", str(data_dir), "--port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: a busy shared CPU makes more thrash
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("mintd serve did not come up")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
