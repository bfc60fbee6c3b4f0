"""Real servers for tests: `mintd serve` in its own process (for tests that watch or kill the server
itself), and for the shared-storage tests a throwaway PostgreSQL cluster and an S3 server (moto) on
loopback. Where PostgreSQL or the S3 server cannot start, the test fails saying what to install (never
skips): a skipped PostgreSQL or S3 test would look like a passing one. `bash scripts/test.sh` installs both.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
_INSTALL_PG = "apt-get install -y postgresql (bash scripts/test.sh installs it)"


def pg_bin() -> Path:
    found = shutil.which("pg_ctl")
    candidates = [found] if found else sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates or not (Path(os.path.realpath(candidates[-1])).parent / "initdb").exists():
        pytest.fail(f"PostgreSQL server (initdb, pg_ctl) not found: {_INSTALL_PG}", pytrace=False)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("the psycopg driver is missing: pip install -e '.[postgres]'", pytrace=False)
    return Path(os.path.realpath(candidates[-1])).parent


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A fresh cluster on a unix socket (no TCP), trust auth, fsync off; yields the URL prefix
    `postgresql+psycopg://mintd@/` to which a database name and `?host=...` are added by `pg_database`.
    PostgreSQL refuses to run as root; then the cluster belongs to `nobody`."""
    binaries = pg_bin()
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "nobody", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="mintd-pg-"))
    if as_root:
        shutil.chown(root, "nobody")
    data = root / "data"

    def run(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            pytest.fail(f"{cmd[0]} failed:\n{proc.stdout}{proc.stderr}{log}", pytrace=False)

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "mintd", "--no-sync")
    options = f"-k {root} -c listen_addresses='' -c fsync=off -c max_connections=200 -p 54329"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield str(root)
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def pg_database(socket_dir: str) -> str:
    """A new empty database in the cluster; its SQLAlchemy URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=socket_dir, port=54329, user="mintd", dbname="postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://mintd@/{name}?host={socket_dir}&port=54329"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in its own process on 127.0.0.1; yields the AWS environment that points boto3
    (and so `mintd serve --blob-url s3://...`) at it."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] is missing: pip install -e '.[dev]' (bash scripts/test.sh)", pytrace=False)
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"moto S3 server did not start:\n{log.read().decode()}", pytrace=False)
                    time.sleep(0.1)
            yield {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def new_bucket(env: dict[str, str]) -> str:
    """An empty bucket on the S3 server `env` points at; its name."""
    import boto3

    name = f"mintd-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
    return name


def serve(
    model_dir: Path,
    data_dir: Path,
    port: int,
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen:
    """Start `mintd serve --model tiny=<model_dir>` with extra `args` (and `env` settings, its output in
    `log`); return once it answers."""
    command = [sys.executable, "-m", "mintd.cli", "serve", "--model", f"tiny={model_dir}"]
    command += ["--data-dir", str(data_dir), "--port", str(port), *args]
    # one thread: a busy shared CPU makes more thrash
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    said = f":\n{log.read_text()}" if log else ""
    raise AssertionError(f"mintd serve did not come up{said}")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
