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
from mintd.engine.tiny import ARCHS
from mintd.engine.train import Datum, TrainGroup
from mintd.store.peft import is_expert_target, peft_config, peft_unloadable, to_peft_state_dict

ATOL = 1e-4


def specs(engine: Engine) -> list[LoraSpec]:
    """Different ranks and target sets; two rank-8 adapters share a group (the stacked per-row path)."""
    attn = list(
        dict.fromkeys(t.name.rpartition(".")[2] for t in engine.slots.targets.values() if t.kind == "attn")
    )
    return [
        LoraSpec(rank=2, seed=11, train_unembed=False),
        LoraSpec(rank=4, seed=12, train_attn=False),
        LoraSpec(rank=8, seed=13),
        LoraSpec(rank=8, seed=14),
        LoraSpec(rank=16, alpha=8, seed=15, train_mlp=False),
        # a subset like PEFT's usual q_proj + v_proj; rank 8 like two above, but a group of its own
        LoraSpec(rank=8, seed=16, train_mlp=False, train_unembed=False, target_modules=(attn[0], attn[-2])),
    ]


@dataclass
class Setup:
    engine: Engine
    model_dir: Path
    slots: list[int]  # adapter slots, in SPECS order
    tensors: dict[int, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tiny_model_dir) -> Setup:
    model_dir = tiny_model_dir(request.param)
    engine = Engine(model_dir, EngineSettings(device="cpu"))
    slots, tensors = [], {}
    for spec in specs(engine):
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


def _reference_models(setup: Setup, slot: int) -> list[torch.nn.Module]:
    """References for a slot: the plain HF model for the base. For an adapter, the HF model with every
    delta merged into its weights (W + scale * B @ A: independent of PEFT, covers every layer), and a
    PeftModel carrying the exported adapter wherever PEFT can express all of its layers."""
    load = dict(dtype=torch.float32, attn_implementation=setup.engine.family.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, **load).eval()
    if slot == BASE_SLOT:
        return [model]
    adapter = setup.engine.slots[slot]
    tensors = setup.tensors[slot]
    names = sorted({k.rpartition(".")[0] for k in tensors})
    refs = []
    if not peft_unloadable(model.config.model_type, names):
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(setup.model_dir, **load), peft_config(adapter.spec, names)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = set_peft_model_state_dict(peft, to_peft_state_dict(tensors))
        assert not result.unexpected_keys
        refs.append(peft.eval())
    with torch.no_grad():
        for name in names:
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            module, _, param = name.rpartition(".") if is_expert_target(name) else (name, "", "weight")
            delta = adapter.spec.scale * (b @ a)  # [..., out, in]; gpt-oss stores experts as [E, in, out]
            if getattr(model.get_submodule(module), "is_transposed", False):
                delta = delta.transpose(-1, -2)
            getattr(model.get_submodule(module), param).add_(delta)
    return [model, *refs]


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
    if any(t.num_experts for t in engine.slots.targets.values()):
        assert len(routed) >= 3, f"tokens reached experts {routed} only"

    references: dict[int, list[torch.nn.Module]] = {}
    base_model = _reference_models(setup, BASE_SLOT)[0]
    for group, out in zip(groups, mixed, strict=True):
        alone = engine.forward_backward([group], forward_only=True)[0]
        if group.slot not in references:
            references[group.slot] = _reference_models(setup, group.slot)
        for datum, lp, lp_alone in zip(group.data, out.logprobs, alone.logprobs, strict=True):
            assert lp.shape == datum.inputs["target_tokens"].shape
            torch.testing.assert_close(lp, lp_alone, atol=ATOL, rtol=0)
            for reference in references[group.slot]:
                torch.testing.assert_close(lp, _reference_logprobs(reference, datum), atol=ATOL, rtol=0)
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
