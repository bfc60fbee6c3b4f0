"""A real mintd server per test, on 127.0.0.1, over the session's tiny qwen3 model."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mintd.config import ServeSettings
from mintd.server import ServerThread, build_app
from mintd.service.tinker import TinkerService


@dataclass
class LiveServer:
    url: str
    service: TinkerService
    model_dir: Path


def start_server(
    model_dir: Path, data_dir: Path, api_keys: list[str] | None = None, **settings
) -> tuple[ServerThread, TinkerService]:
    settings = ServeSettings(data_dir=data_dir, long_poll_s=2.0, **settings)
    app, service = build_app({"tiny": model_dir}, settings, api_keys)
    return ServerThread(app), service


@pytest.fixture
def server(qwen3_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    thread, service = start_server(qwen3_dir, tmp_path / "data")
    with thread:
        yield LiveServer(thread.url, service, qwen3_dir)
    service.close()
