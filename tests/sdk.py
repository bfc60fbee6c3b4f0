"""Run Python scripts under the real client SDKs, each in its own venv built by scripts/sdk_envs.sh.

The SDKs pin their own pydantic/httpx/protobuf, so they cannot share the test process: a test hands a
script to `run_sdk_script`, which runs it with that venv's interpreter. torch and numpy are importable
there too (the venvs fall back to the main .venv's site-packages for what they lack).

A missing venv fails the test rather than skipping it: end-to-end compatibility with the SDKs is the
point of the project, and a silently skipped check looks like a passing one.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SDK_ENVS: dict[str, Path] = {
    name: REPO / ".venv-sdk" / name / "bin" / "python" for name in ("tinker-0.22", "tinker-0.38", "mint-0.2")
}


# Appended to every script: once it has run to its end, leave without interpreter teardown. The SDK's
# daemon event-loop thread can abort the process (SIGABRT) while torch and threads are torn down,
# after the script's work and output are complete; that is the client library's shutdown, not the
# server under test. An exception earlier in the script never reaches this line and still fails.
_CLEAN_EXIT = "\n\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_sys.stderr.flush()\n_os._exit(0)\n"


def sdk_python(env: str) -> Path:
    """The interpreter of SDK venv `env`; fails the test when the venv was never built."""
    python = SDK_ENVS[env]
    if not python.exists() or not (python.parent.parent / ".mintd-sdk-installed").exists():
        pytest.fail(
            f"SDK venv {env!r} is missing ({python.parent.parent}): run `bash scripts/test.sh` "
            "(or `bash scripts/sdk_envs.sh`) to build .venv-sdk/",
            pytrace=False,
        )
    return python


def run_sdk_script(
    env: str, script: str, env_vars: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run `script` (Python source) with SDK venv `env`'s interpreter, offline and without telemetry.

    Fails the test, showing the script's stdout and stderr, if it exits non-zero or times out."""
    python = sdk_python(env)
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    environ.update({"HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0", "PYTHONUNBUFFERED": "1"})
    environ.update(env_vars or {})
    with tempfile.TemporaryDirectory(prefix="mintd-sdk-") as tmp:
        path = Path(tmp) / "sdk_script.py"  # a file, not -c, so tracebacks show the failing line
        path.write_text(script + _CLEAN_EXIT)
        try:
            proc = subprocess.run(
                [str(python), str(path)],
                cwd=tmp,
                env=environ,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"SDK script under {env} timed out after {timeout}s\n{_show(e.stdout, e.stderr)}",
                pytrace=False,
            )
    if proc.returncode != 0:
        pytest.fail(
            f"SDK script under {env} exited {proc.returncode}\n{_show(proc.stdout, proc.stderr)}",
            pytrace=False,
        )
    return proc


def run_sdk_json(
    env: str, script: str, env_vars: dict[str, str] | None = None, timeout: float = 120.0
) -> Any:
    """`run_sdk_script`, then the script's last stdout line parsed as JSON (its answer)."""
    proc = run_sdk_script(env, script, env_vars, timeout)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        pytest.fail(
            f"SDK script under {env} printed nothing\n{_show(proc.stdout, proc.stderr)}", pytrace=False
        )
    return json.loads(lines[-1])


def _show(stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    def text(s: str | bytes | None) -> str:
        return s.decode(errors="replace") if isinstance(s, bytes) else (s or "")

    return f"--- stdout ---\n{text(stdout)}\n--- stderr ---\n{text(stderr)}"
