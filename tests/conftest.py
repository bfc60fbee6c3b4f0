"""Shared fixtures: tiny models built once per test session, and never any hub access."""

import os
from collections.abc import Callable
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
