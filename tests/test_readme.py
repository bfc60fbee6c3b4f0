"""The README's first training loop, run verbatim with the tinker 0.38 SDK against a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mintd.config import ServeSettings
from mintd.server import ServerThread, build_app

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_readme.py runs this block verbatim against a live server -->"


def first_loop() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost its tested example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    return block.group(1)


def test_the_readme_training_loop_runs_and_learns(qwen3_dir: Path, tmp_path: Path) -> None:
    code = first_loop()
    assert len(code.strip().splitlines()) <= 30, "the example should stay short enough to read at once"
    app, service = build_app({"tiny": qwen3_dir}, ServeSettings(data_dir=tmp_path / "data"))
    with ServerThread(app) as server:
        env = {**os.environ, "TINKER_BASE_URL": server.url, "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0"}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    service.close()
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, f"the README example warns:\n{done.stderr}"
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", done.stdout)]
    assert len(losses) == 30 and losses[-1] < losses[0] / 4, losses
    path = re.search(r"(tinker://\S+/sampler_weights/paris) -> '", done.stdout)
    assert path is not None, done.stdout
    revision = service.catalog.resolve("local", path.group(1))
    assert revision.kind == "sampler"


def test_the_security_table_lists_every_route(qwen3_dir: Path, tmp_path: Path) -> None:
    app, service = build_app({"tiny": qwen3_dir}, ServeSettings(data_dir=tmp_path / "data"))
    service.close()
    text = README.read_text()
    table = text[text.index("<!-- tests/test_readme.py checks that this table") :].split("\n\n")[0]
    routes = [f"`{method.upper()} {path}`" for path, ops in app.openapi()["paths"].items() for method in ops]
    assert len(routes) >= 45
    missing = [r for r in routes if r not in table]
    assert not missing, f"routes the README's security table does not list: {missing}"
