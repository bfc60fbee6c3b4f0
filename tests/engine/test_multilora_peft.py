"""One mixed batch of many adapters (and the base) gives, row for row, what each adapter gives alone and
what Hugging Face PEFT gives for that adapter; sampling reports the logprobs a forward pass computes."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from mintd.config import EngineSettings
from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.train import Datum, TrainGroup
from mintd.store.peft import peft_config, to_peft_state_dict

ATOL = 1e-4
FIXTURES = {"qwen3": "qwen3_dir", "llama": "llama_dir", "qwen3-moe": "moe_dir"}
# Different ranks and target sets; two rank-8 adapters share a group (the stacked per-row path).
SPECS = [
    LoraSpec(rank=2, seed=11, train_unembed=False),
    LoraSpec(rank=4, seed=12, train_attn=False),
    LoraSpec(rank=8, seed=13),
    LoraSpec(rank=8, seed=14),
    LoraSpec(rank=16, alpha=8, seed=15, train_mlp=False),
    # PEFT's usual subset; rank 8 like two above, but another target set: a group of its own
    LoraSpec(rank=8, seed=16, train_mlp=False, train_unembed=False, target_modules=("q_proj", "v_proj")),
]


@dataclass
class Setup:
    engine: Engine
    model_dir: Path
    slots: list[int]  # adapter slots, in SPECS order
    tensors: dict[int, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", params=list(FIXTURES))
def setup(request) -> Setup:
    model_dir = request.getfixturevalue(FIXTURES[request.param])
    engine = Engine(model_dir, EngineSettings(device="cpu"))
    slots, tensors = [], {}
    for spec in SPECS:
        slot = engine.create_adapter(spec)
        gen = torch.Generator().manual_seed(spec.seed)
        for _, b in engine.slots[slot].weights.values():  # B = 0 would make every adapter the base
            b.data.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        slots.append(slot)
        tensors[slot] = engine.export_adapter(slot)[1]
    return Setup(engine, model_dir, slots, tensors)


def _mixed_groups(setup: Setup) -> list[TrainGroup]:
    """10 rows of lengths 3..26 mixing every adapter and the base, interleaved, one or two per group."""
    gen = torch.Generator().manual_seed(0)
    order = [setup.slots[0], BASE_SLOT, setup.slots[1], setup.slots[2], setup.slots[4], BASE_SLOT]
    order += [setup.slots[3], setup.slots[5], setup.slots[0], setup.slots[2], setup.slots[4], setup.slots[5]]
    groups = []
    for i, slot in enumerate(order):
        data = []
        for j in range(1 + i % 2):
            n = 4 + (7 * i + 5 * j) % 23
            seq = torch.randint(0, setup.engine.vocab_size, (n,), generator=gen)
            data.append(Datum(seq[:-1], {"target_tokens": seq[1:]}))
        groups.append(TrainGroup(slot, data))
    return groups


def _reference_model(setup: Setup, slot: int) -> torch.nn.Module:
    """Plain HF model for the base; a PeftModel carrying the exported adapter otherwise."""
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32)
    if slot != BASE_SLOT:
        tensors = setup.tensors[slot]
        config = peft_config(setup.engine.slots[slot].spec, sorted({k.rpartition(".")[0] for k in tensors}))
        model = get_peft_model(model, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = set_peft_model_state_dict(model, to_peft_state_dict(tensors))
        assert not result.unexpected_keys
    return model.eval()


def _reference_logprobs(model: torch.nn.Module, datum: Datum) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=datum.tokens.unsqueeze(0)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, datum.inputs["target_tokens"].unsqueeze(-1))[:, 0]


def _forward_routing(engine: Engine, groups: list[TrainGroup]) -> tuple[list, set[int]]:
    """forward_backward(forward_only) plus the experts that received tokens (none for dense models)."""
    seen: set[int] = set()
    hooks = [
        layer.mlp.experts.register_forward_hook(lambda m, args, out: seen.update(args[1].unique().tolist()))
        for layer in engine.model.model.layers
        if hasattr(layer.mlp, "experts")
    ]
    try:
        return engine.forward_backward(groups, forward_only=True), seen
    finally:
        for h in hooks:
            h.remove()


def test_mixed_batch_equals_alone_and_peft(setup: Setup):
    engine = setup.engine
    groups = _mixed_groups(setup)
    mixed, routed = _forward_routing(engine, groups)
    if engine.model.config.model_type == "qwen3_moe":
        assert len(routed) >= 3, f"tokens reached experts {routed} only"

    references: dict[int, torch.nn.Module] = {}
    base_model = _reference_model(setup, BASE_SLOT)
    for group, out in zip(groups, mixed, strict=True):
        alone = engine.forward_backward([group], forward_only=True)[0]
        if group.slot not in references:
            references[group.slot] = _reference_model(setup, group.slot)
        for datum, lp, lp_alone in zip(group.data, out.logprobs, alone.logprobs, strict=True):
            assert lp.shape == datum.inputs["target_tokens"].shape
            torch.testing.assert_close(lp, lp_alone, atol=ATOL, rtol=0)
            torch.testing.assert_close(
                lp, _reference_logprobs(references[group.slot], datum), atol=ATOL, rtol=0
            )
            if group.slot != BASE_SLOT:  # the adapter really changes the output
                assert (lp - _reference_logprobs(base_model, datum)).abs().max() > 1e-3
        assert out.loss == pytest.approx(-sum(float(lp.sum()) for lp in out.logprobs), rel=1e-5)
    assert set(references) == {BASE_SLOT, *setup.slots}


def _score(engine: Engine, slot: int, sequence: list[int]) -> torch.Tensor:
    seq = torch.tensor(sequence)
    datum = Datum(seq[:-1], {"target_tokens": seq[1:]})
    return engine.forward_backward([TrainGroup(slot, [datum])], forward_only=True)[0].logprobs[0]


def test_sampled_and_prompt_logprobs_equal_forward(setup: Setup):
    engine = setup.engine
    gen = torch.Generator().manual_seed(1)
    requests = []
    for i, slot in enumerate([setup.slots[0], BASE_SLOT, setup.slots[2], setup.slots[3], setup.slots[4]]):
        prompt = torch.randint(0, engine.vocab_size, (2 + 5 * i,), generator=gen).tolist()
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i, stop=[])
        requests.append(SampleRequest(slot, prompt, params, num_samples=2, prompt_logprobs=True))
    results = engine.sample(requests)

    for req, res in zip(requests, results, strict=True):
        assert len(res.sequences) == 2
        assert res.prompt_logprobs[0] is None
        n = len(req.prompt)
        for seq in res.sequences:
            assert len(seq.tokens) == len(seq.logprobs) == 12 and seq.stop_reason == "length"
            forward = _score(engine, req.slot, req.prompt + seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs), forward[n - 1 :], atol=ATOL, rtol=0)
            torch.testing.assert_close(
                torch.tensor(res.prompt_logprobs[1:]), forward[: n - 1], atol=ATOL, rtol=0
            )
        assert res.sequences[0].tokens != res.sequences[1].tokens  # two samples, not one twice
