"""Every family's contract: what each switch adapts, the attention implementation, and the engine's
invariants (trainer -> sampler handoff, save/load with optimizer, packed round trip) on each layout."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mintd.config import EngineSettings
from mintd.engine.adapters import LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.lora import LoraContext, install_lora
from mintd.engine.optim import AdamParams
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.tiny import ARCHS
from mintd.engine.train import TrainGroup
from mintd.families import (
    DEFAULT,
    FAMILIES,
    LINEAR_KINDS,
    UnclassifiedLayerError,
    classify,
    family_for,
    markdown_table,
)
from mintd.residency.device import load_packed_into
from mintd.store.packed import (
    pack,
    packed_to_peft_folder,
    peft_folder_to_packed,
    read_packed,
    split_state,
)
from tests.engine.conftest import next_token_datum

README = Path(__file__).resolve().parents[2] / "README.md"
# What the issue names per family, by switch: each must be adapted in every layer that has it.
EXPECTED = {
    "qwen3": {"attn": {"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp": {"gate_proj", "up_proj", "down_proj"}},
    "llama": {"attn": {"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp": {"gate_proj", "up_proj", "down_proj"}},
    "qwen3-moe": {"attn": {"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp": {"gate_up_proj", "down_proj"}},
    "deepseek-v3": {
        "attn": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
        # layer 0 dense, then routed experts + a shared expert
        "mlp": {"gate_proj", "up_proj", "down_proj", "gate_up_proj"},
    },
    "gpt-oss": {"attn": {"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp": {"gate_up_proj", "down_proj"}},
    "qwen3-next": {
        "attn": {"in_proj_qkvz", "in_proj_ba", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"},
        "mlp": {"gate_proj", "up_proj", "down_proj", "gate_up_proj"},
    },
}


@pytest.fixture(scope="module", params=ARCHS)
def engine(request, tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir(request.param), EngineSettings(device="cpu"))


def _arch(engine: Engine) -> str:
    return next(a for a in ARCHS if family_for(engine.model.config.model_type).tiny_arch == a)


def test_every_projection_the_family_names_is_adapted(engine):
    targets = engine.slots.targets.values()
    by_kind = {
        k: {t.name.rpartition(".")[2] for t in targets if t.kind == k} for k in ("attn", "mlp", "unembed")
    }
    expected = EXPECTED[_arch(engine)]
    assert by_kind["attn"] == expected["attn"]
    assert expected["mlp"] <= by_kind["mlp"]
    assert by_kind["unembed"] == {"lm_head"}
    # and each in every layer that holds it: nothing matching a contract leaf is left unwrapped
    for name, module in engine.model.named_modules():
        if isinstance(module, nn.Linear) and engine.family.kind_of(name.rpartition(".")[2]):
            pytest.fail(f"{name} is a contract target but was not wrapped")


def test_coverage_lists_every_weight_matrix(engine):
    coverage = engine.coverage()
    assert set(coverage) == {"family", "attn_implementation", "attn", "mlp", "unembed", "excluded"}
    assert coverage["attn_implementation"] == engine.model.config._attn_implementation
    adapted = engine.adapted(LoraSpec())
    for kind in ("attn", "mlp", "unembed"):
        assert coverage[kind] == adapted[kind]
    leaves = {t.name.rpartition(".")[2] for t in engine.slots.targets.values()}
    assert leaves == {n.rpartition(".")[2] for kind in ("attn", "mlp", "unembed") for n in coverage[kind]}
    assert "embed_tokens" in coverage["excluded"]
    assert engine.adapted(LoraSpec(train_mlp=False, train_unembed=False)) == {"attn": coverage["attn"]}


def test_attention_implementation_is_chosen_per_family(engine):
    expected = "eager" if engine.model.config.model_type == "gpt_oss" else "sdpa"
    assert engine.model.config._attn_implementation == expected


def test_attention_implementation_override(tiny_model_dir):
    assert (
        Engine(
            tiny_model_dir("qwen3"), EngineSettings(attn_implementation="eager")
        ).model.config._attn_implementation
        == "eager"
    )
    with pytest.raises(ValueError, match="attn_implementation 'sdpa'"):
        Engine(tiny_model_dir("gpt-oss"), EngineSettings(attn_implementation="sdpa"))


def test_an_unclassified_linear_layer_is_a_load_error_naming_it(qwen3_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    model.model.layers[1].self_attn.extra_proj = nn.Linear(8, 8)
    with pytest.raises(UnclassifiedLayerError, match=r"model\.layers\.1\.self_attn\.extra_proj\.weight"):
        classify(model, family_for("qwen3"))
    del model.model.layers[1].self_attn.extra_proj  # without it the same model classifies and installs
    assert install_lora(model, LoraContext(), classify(model, family_for("qwen3")))


def test_an_unknown_weight_matrix_is_an_error_too(qwen3_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    model.model.layers[0].mlp.register_parameter("mixer", nn.Parameter(torch.zeros(4, 4)))
    with pytest.raises(UnclassifiedLayerError, match=r"model\.layers\.0\.mlp\.mixer"):
        classify(model, family_for("qwen3"))


# model types without a tiny preset: their contract is checked on a meta-device build (no weights)
META_TYPES = [
    "qwen2",
    "mistral",
    "gemma2",
    "olmo2",
    "deepseek_v2",
    "qwen3_5_moe",
    "qwen3_5_text",
    "qwen2_moe",
    "mixtral",
    "glm4_moe",
    "ernie4_5_moe",
]
SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    head_dim=16,
)


@pytest.mark.parametrize("model_type", META_TYPES)
def test_contracts_of_families_without_a_preset(model_type):
    config = AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if hasattr(config, key):
            setattr(config, key, 32)
    for key in ("num_experts", "n_routed_experts", "num_local_experts"):
        if getattr(config, key, None):
            setattr(config, key, 4)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:2]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    family = family_for(model_type)
    assert (family is DEFAULT) == (model_type in ("qwen2", "mistral", "gemma2", "olmo2"))
    weights = classify(model, family)
    targets = install_lora(model, LoraContext(), weights)
    assert {f.kind for f in weights} == {"attn", "mlp", "unembed", None}
    assert {t.kind for t in targets.values()} == {"attn", "mlp", "unembed"}


def test_every_family_with_a_preset_is_in_the_table_and_the_readme():
    presets = {f.tiny_arch for f in FAMILIES if f.tiny_arch}
    assert presets == set(ARCHS)
    table = markdown_table()
    assert table in README.read_text(), "README's family table is stale: paste markdown_table() into it"
    for f in FAMILIES:
        assert f.label in table


def test_a_leaf_name_means_one_switch_in_every_family():
    for leaf, kind in LINEAR_KINDS.items():
        for f in FAMILIES:
            assert f.kind_of(leaf) in (None, kind), (
                f"{leaf} is {kind} in one family, {f.kind_of(leaf)} in {f.label}"
            )
            assert f.excluded_rule(leaf) is None or f.kind_of(leaf) is None


def test_model_types_of_the_presets_have_their_own_family(tiny_model_dir):
    for arch in ARCHS:
        family = family_for(AutoConfig.from_pretrained(tiny_model_dir(arch)).model_type)
        assert family.tiny_arch == arch


def _data(engine: Engine) -> list:
    return [
        next_token_datum(engine.tokenizer.encode(t))
        for t in ("The cat sat on the mat.", "3 + 4 = 7, 6 * 7 = 42")
    ]


def _greedy(engine: Engine, slot: int, prompt: list[int], n: int = 24):
    params = SamplingParams(max_tokens=n, temperature=0, stop=[])
    return engine.sample([SampleRequest(slot, prompt, params)])[0].sequences[0]


def test_trainer_to_sampler_handoff(engine):
    """A sampler snapshot samples exactly what the trained adapter computes, past the sliding window."""
    live = engine.create_adapter(LoraSpec(rank=4, seed=1))
    for _ in range(2):
        engine.forward_backward([TrainGroup(live, _data(engine))])
        engine.optim_step(live, AdamParams(learning_rate=2e-2))
    snap = engine.snapshot(live)
    prompt = engine.tokenizer.encode("User: What is your name?")
    seq = _greedy(engine, snap, prompt)
    assert seq.tokens == _greedy(engine, live, prompt).tokens
    assert (
        seq.tokens != _greedy(engine, 0, prompt).tokens or seq.logprobs != _greedy(engine, 0, prompt).logprobs
    )
    full = torch.tensor(prompt + seq.tokens)
    datum = next_token_datum(full.tolist())
    forward = engine.forward_backward([TrainGroup(snap, [datum])], forward_only=True)[0].logprobs[0]
    torch.testing.assert_close(torch.tensor(seq.logprobs), forward[len(prompt) - 1 :], atol=1e-4, rtol=0)


def test_save_load_with_optimizer_packed_and_peft_round_trips(engine, tmp_path):
    src = engine.create_adapter(LoraSpec(rank=4, seed=2))
    step = AdamParams(learning_rate=1e-2, weight_decay=0.01)
    engine.forward_backward([TrainGroup(src, _data(engine))])
    engine.optim_step(src, step)
    spec, tensors = engine.export_adapter(src, with_optimizer=True)
    weights, optimizer = split_state(tensors)
    packed = read_packed(pack(spec, weights, engine.fingerprint, optimizer))
    assert packed.tensors.keys() == weights.keys()
    assert all(torch.equal(packed.tensors[k], v) for k, v in weights.items())
    copy = load_packed_into(engine, packed, trainable=True)
    for s in (src, copy):
        engine.forward_backward([TrainGroup(s, _data(engine))])
        engine.optim_step(s, step)
    for a, b in zip(engine.slots[src].params, engine.slots[copy].params, strict=True):
        assert torch.equal(a, b)
    # packed -> PEFT folder -> packed is byte-identical on every family, subsets of targets included
    attn = engine.adapted(LoraSpec())["attn"]
    for s in (spec, LoraSpec(rank=2, seed=3, train_mlp=False, target_modules=(attn[0], "lm_head"))):
        data = pack(s, split_state(engine.export_adapter(engine.create_adapter(s))[1])[0], engine.fingerprint)
        folder = tmp_path / f"peft-{s.rank}"
        packed_to_peft_folder(read_packed(data), folder, "tiny", engine.model.config.model_type)
        assert peft_folder_to_packed(folder, engine.fingerprint) == data
