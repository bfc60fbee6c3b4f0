"""Engine fixtures: a fresh engine per test over the session's tiny models."""

from pathlib import Path

import pytest
import torch

from mintd.engine.engine import Engine
from mintd.engine.train import Datum


@pytest.fixture
def engine(qwen3_dir: Path) -> Engine:
    return Engine(qwen3_dir)


def next_token_datum(tokens: list[int], weights: list[float] | None = None) -> Datum:
    """Datum predicting each next token of `tokens` (Tinker's alignment: input[i] predicts target[i])."""
    ids = torch.tensor(tokens)
    inputs = {"target_tokens": ids[1:]}
    if weights is not None:
        inputs["weights"] = torch.tensor(weights, dtype=torch.float32)
    return Datum(ids[:-1], inputs)
