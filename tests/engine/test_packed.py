"""oneDNN-packed base linears (CPU, float32 / bfloat16): the same function and input gradient as the
plain weights, packed in place (no second copy), tied weights left plain."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mintd.config import EngineSettings
from mintd.engine import packed
from mintd.engine.adapters import BASE_SLOT
from mintd.engine.engine import Engine
from mintd.engine.lora import MultiLoraLinear
from mintd.engine.sampling import SampleRequest, SamplingParams

pytestmark = pytest.mark.skipif(
    not packed.available(torch.device("cpu"), torch.float32), reason="needs torch with oneDNN (mkldnn)"
)

# float32: oneDNN sums in another order than MKL, nothing more; bfloat16: one rounding of the output
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pack", [True, False])
def test_a_packed_linear_computes_and_backpropagates_what_the_plain_one_does(dtype, pack) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(dtype).requires_grad_(False)
    weight, bias = linear.weight.clone(), linear.bias.clone()
    fast = packed.PackedLinear(linear, pack=pack)
    assert linear.weight.is_mkldnn == pack  # packed in place: the plain weight is gone
    assert torch.equal(packed.dense_weight(linear), weight)  # readers of the values still get them
    tol = TOLERANCE[dtype]
    x = torch.randn(3, 5, 64, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), F.linear(x, weight, bias), rtol=tol, atol=tol)
    x.requires_grad_(True)
    grad = torch.randn(3, 5, 96, dtype=dtype)
    (fast(x) * grad).sum().backward()
    torch.testing.assert_close(x.grad, grad @ weight, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_samples_the_same_with_and_without_packing(qwen3_dir, dtype) -> None:
    request = SampleRequest(
        BASE_SLOT, [5, 6, 7, 8], SamplingParams(max_tokens=1, temperature=0.0), prompt_logprobs=True
    )
    engine = Engine(qwen3_dir, EngineSettings(dtype=dtype, cpu_packed_min_weight=0))
    layers = [m for m in engine.model.modules() if isinstance(m, MultiLoraLinear)]
    assert all(m.packed is not None and m.base.weight.is_mkldnn for m in layers)
    with_packing = engine.sample([request])[0].prompt_logprobs[1:]
    plain = Engine(qwen3_dir, EngineSettings(dtype=dtype, cpu_packed_linears=False))
    expected = plain.sample([request])[0].prompt_logprobs[1:]
    assert with_packing == pytest.approx(expected, abs=1e-5 if dtype == "float32" else 5e-2)


def test_a_tied_unembedding_stays_plain_and_shared(qwen3_dir, tmp_path) -> None:
    shutil.copytree(qwen3_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    for file in tmp_path.glob("*.safetensors"):  # the unembedding is the embedding's weight
        tensors = load_file(file)
        tensors.pop("lm_head.weight", None)
        save_file(tensors, file, metadata={"format": "pt"})
    engine = Engine(tmp_path, EngineSettings(dtype="float32", cpu_packed_min_weight=0))
    unembed, embed = engine.model.get_output_embeddings(), engine.model.get_input_embeddings()
    assert unembed.base.weight is embed.weight and not embed.weight.is_mkldnn
    assert unembed.packed is not None
    assert all(
        m.base.weight.is_mkldnn
        for m in engine.model.modules()
        if isinstance(m, MultiLoraLinear) and m is not unembed
    )


def test_linears_below_the_size_threshold_stay_plain(qwen3_dir) -> None:
    """oneDNN's fixed cost per call loses to F.linear on small weights: those are not packed."""
    engine = Engine(qwen3_dir, EngineSettings(dtype="float32", cpu_packed_min_weight=64 * 128))
    layers = [m for m in engine.model.modules() if isinstance(m, MultiLoraLinear)]
    big = [m for m in layers if m.base.weight.numel() >= 64 * 128]
    assert big and len(big) < len(layers)
    assert all((m.packed is not None) == (m in big) for m in layers)
    assert all(m.base.weight.is_mkldnn == (m in big) for m in layers)
