"""Shared fixtures: tiny models built once per test session, and never any hub access."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Set before anything imports transformers / huggingface_hub, which read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_model_dir(arch, seed=0)`: a `test`-size model folder, built once and reused."""
    from mintd.engine.tiny import make_tiny_model

    built: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in built:
            out = tmp_path_factory.mktemp(f"{arch}-seed{seed}")
            built[arch, seed] = make_tiny_model(out, arch=arch, seed=seed)
        return built[arch, seed]

    return get


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def moe_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("qwen3-moe")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for the session (fails, not skips, where none can start)."""
    from tests.servers import postgres_cluster

    with postgres_cluster() as socket_dir:
        yield socket_dir


@pytest.fixture
def pg_url(pg_cluster: str) -> str:
    """A new empty PostgreSQL database per test."""
    from tests.servers import pg_database

    return pg_database(pg_cluster)


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback for the session; the AWS environment that reaches it."""
    from tests.servers import s3_server

    with s3_server() as env:
        yield env


@pytest.fixture
def s3_url(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://BUCKET/blobs` on a new empty bucket, with boto3's environment pointed at the server."""
    from tests.servers import new_bucket

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return f"s3://{new_bucket(s3_env)}/blobs"
