"""oneDNN-packed base linears (CPU, bfloat16): the same function as the plain weights, used only
without autograd."""

from __future__ import annotations

import pytest
import torch

from mintd.config import EngineSettings
from mintd.engine import packed
from mintd.engine.adapters import BASE_SLOT
from mintd.engine.engine import Engine
from mintd.engine.lora import MultiLoraLinear
from mintd.engine.sampling import SampleRequest, SamplingParams

pytestmark = pytest.mark.skipif(
    not packed.available(torch.device("cpu"), torch.bfloat16), reason="needs torch with oneDNN (mkldnn)"
)


def test_a_packed_linear_computes_what_the_plain_one_does() -> None:
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(packed.PackedLinear(linear)(x), linear(x), rtol=2e-2, atol=2e-2)


def test_a_bf16_engine_samples_the_same_with_and_without_packing(qwen3_dir) -> None:
    engine = Engine(qwen3_dir, EngineSettings(dtype="bfloat16"))
    layers = [m for m in engine.model.modules() if isinstance(m, MultiLoraLinear)]
    assert all(m.packed is not None for m in layers)
    request = SampleRequest(
        BASE_SLOT, [5, 6, 7, 8], SamplingParams(max_tokens=1, temperature=0.0), prompt_logprobs=True
    )
    with_packing = engine.sample([request])[0].prompt_logprobs[1:]
    for m in layers:
        m.packed = None
    plain = engine.sample([request])[0].prompt_logprobs[1:]
    assert with_packing == pytest.approx(plain, abs=5e-2)
    with torch.enable_grad():  # training never reads the packed copy
        x = torch.randn(2, layers[0].base.in_features, dtype=torch.bfloat16, requires_grad=True)
        layers[0].packed = lambda _x: pytest.fail("packed weights used under autograd")
        layers[0](x).sum().backward()
