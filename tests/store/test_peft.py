import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from mintd.config import EngineSettings
from mintd.engine.adapters import LoraSpec
from mintd.engine.engine import Engine
from mintd.store.peft import (
    from_peft_state_dict,
    load_peft_folder,
    peft_config,
    save_peft_folder,
    to_peft_state_dict,
)

SPECS = {
    "all": LoraSpec(rank=4, alpha=16, seed=1),
    "no_unembed": LoraSpec(rank=2, seed=2, train_unembed=False),
    "mlp_only": LoraSpec(rank=8, seed=3, train_attn=False, train_unembed=False),
}


@pytest.fixture(scope="module")
def dirs(qwen3_dir, moe_dir):
    return {"qwen3": qwen3_dir, "qwen3-moe": moe_dir}


@pytest.fixture(scope="module")
def engines(dirs):
    return {arch: Engine(path, EngineSettings(device="cpu")) for arch, path in dirs.items()}


def _adapter(engine: Engine, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """Exported tensors of a fresh adapter with random (non-zero) B."""
    slot = engine.create_adapter(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    for a, b in engine.slots[slot].weights.values():
        b.data.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        a.data.add_(torch.randn(a.shape, generator=gen) * 0.01)
    _, tensors = engine.export_adapter(slot)
    engine.drop(slot)
    return tensors


def _targets(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rpartition(".")[0] for k in tensors})


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
@pytest.mark.parametrize("which", SPECS)
def test_state_dict_round_trip_is_exact(engines, arch, which):
    spec = SPECS[which]
    tensors = _adapter(engines[arch], spec)
    config = peft_config(spec, _targets(tensors))
    state = to_peft_state_dict(tensors)
    assert all(k.startswith("base_model.model.") and k.endswith(".weight") for k in state)
    _assert_same(from_peft_state_dict(state, spec.rank, config.target_parameters), tensors)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
@pytest.mark.parametrize("which", SPECS)
def test_folder_round_trip_is_exact(engines, tmp_path, arch, which):
    spec = SPECS[which]
    tensors = _adapter(engines[arch], spec)
    save_peft_folder(tmp_path, spec, tensors, base_model_name="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        spec.rank,
        spec.alpha,
        "tiny",
    )
    loaded_spec, loaded = load_peft_folder(tmp_path)
    assert (loaded_spec.rank, loaded_spec.alpha, loaded_spec.kinds) == (spec.rank, spec.alpha, spec.kinds)
    _assert_same(loaded, tensors)
    slot = engines[arch].load_adapter(loaded_spec, loaded)  # the engine accepts it as is
    engines[arch].drop(slot)


def test_config_targets(engines):
    spec = SPECS["all"]
    config = peft_config(spec, _targets(_adapter(engines["qwen3-moe"], spec)))
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}
    assert set(config.target_parameters) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (4, 16, 0.0, "none")
    dense = peft_config(spec, _targets(_adapter(engines["qwen3"], spec)))
    assert set(dense.target_modules) == {*("q_proj", "k_proj", "v_proj", "o_proj"), "lm_head"} | {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert not dense.target_parameters


@pytest.mark.parametrize("which", SPECS)
def test_key_names_and_layout_match_peft(engines, dirs, which):
    """PEFT's own PeftModel has exactly our keys and shapes, and its per-expert delta is B[e] @ A[e]."""
    spec = SPECS[which]
    tensors = _adapter(engines["qwen3-moe"], spec)
    model = AutoModelForCausalLM.from_pretrained(dirs["qwen3-moe"])
    peft_model = get_peft_model(model, peft_config(spec, _targets(tensors)))
    ours = to_peft_state_dict(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    result = set_peft_model_state_dict(peft_model, ours)
    assert not result.unexpected_keys
    experts = peft_model.base_model.model.model.layers[1].mlp.experts  # down_proj wrapper, then gate_up
    for wrapper, param in ((experts, "down_proj"), (experts.base_layer, "gate_up_proj")):
        assert wrapper.parameter_name == param
        a = tensors[f"model.layers.1.mlp.experts.{param}.lora_A"]
        b = tensors[f"model.layers.1.mlp.experts.{param}.lora_B"]
        expected = torch.einsum("eor,eri->eoi", b, a) * spec.scale
        torch.testing.assert_close(wrapper.get_delta_weight("default"), expected)


def test_saved_folder_loads_in_peft(engines, dirs, tmp_path):
    spec = SPECS["all"]
    tensors = _adapter(engines["qwen3-moe"], spec)
    save_peft_folder(tmp_path, spec, tensors, base_model_name=str(dirs["qwen3-moe"]))
    model = AutoModelForCausalLM.from_pretrained(dirs["qwen3-moe"])
    peft_model = PeftModel.from_pretrained(model, tmp_path)
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    _assert_same(
        from_peft_state_dict(state, spec.rank, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), tensors
    )


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
def test_folder_saved_by_peft_loads(engines, dirs, tmp_path, arch):
    """The reverse direction: PeftModel.save_pretrained output (base lm_head copy included) reads back."""
    spec = SPECS["all"]
    tensors = _adapter(engines[arch], spec)
    model = AutoModelForCausalLM.from_pretrained(dirs[arch])
    peft_model = get_peft_model(model, peft_config(spec, _targets(tensors)))
    set_peft_model_state_dict(peft_model, to_peft_state_dict(tensors))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)
    loaded_spec, loaded = load_peft_folder(tmp_path)
    assert (loaded_spec.rank, loaded_spec.alpha, loaded_spec.kinds) == (spec.rank, spec.alpha, spec.kinds)
    _assert_same(loaded, tensors)


def test_to_peft_rejects_non_lora_tensors():
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        to_peft_state_dict({"model.layers.0.self_attn.q_proj.lora_A.exp_avg": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="must be 2-D"):
        to_peft_state_dict({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(1, 2, 4)})


# malformed folders ---------------------------------------------------------------------------------


@pytest.fixture
def folder(engines, tmp_path):
    spec = SPECS["no_unembed"]
    save_peft_folder(tmp_path, spec, _adapter(engines["qwen3"], spec), base_model_name="tiny")
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_folder_and_files(folder, tmp_path):
    with pytest.raises(ValueError, match="no such adapter folder"):
        load_peft_folder(tmp_path / "nope")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_peft_folder(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft_folder(folder)


def test_bad_config_json(folder):
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_peft_folder(folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_peft_folder(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": "8"}, "r must be a positive integer"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
        ({"use_dora": True}, "use_dora"),
        ({"use_rslora": True}, "use_rslora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"bias": "all"}, "bias"),
        ({"target_modules": "q_proj|v_proj"}, "regex"),
        ({"r": 3}, "not rank 3"),
        ({"target_modules": ["q_proj"]}, "not among target_modules"),
    ],
)
def test_unsupported_or_inconsistent_config(folder, changes, message):
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        load_peft_folder(folder)


def test_bad_weights(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_peft_folder(folder)


def test_weights_missing_half_or_unexpected_keys(engines, tmp_path):
    spec = SPECS["no_unembed"]
    tensors = _adapter(engines["qwen3"], spec)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    save_peft_folder(tmp_path / "half", spec, tensors, base_model_name="tiny")
    _edit_weights(tmp_path / "half", lambda s: s.pop(key))
    with pytest.raises(ValueError, match="q_proj has no lora_B"):
        load_peft_folder(tmp_path / "half")

    save_peft_folder(tmp_path / "extra", spec, tensors, base_model_name="tiny")
    _edit_weights(
        tmp_path / "extra", lambda s: s.update({"base_model.model.model.norm.weight": torch.ones(4)})
    )
    with pytest.raises(ValueError, match="unexpected key"):
        load_peft_folder(tmp_path / "extra")

    save_peft_folder(tmp_path / "empty", spec, {}, base_model_name="tiny")
    with pytest.raises(ValueError, match="no LoRA weights"):
        load_peft_folder(tmp_path / "empty")


def test_base_layer_copy_is_ignored(engines, tmp_path):
    """PEFT saves the base lm_head next to its LoRA when lm_head is targeted; that is no adapter weight."""
    spec = SPECS["all"]
    tensors = _adapter(engines["qwen3"], spec)
    save_peft_folder(tmp_path, spec, tensors, base_model_name="tiny")
    _edit_weights(
        tmp_path, lambda s: s.update({"base_model.model.lm_head.base_layer.weight": torch.ones(3, 2)})
    )
    _assert_same(load_peft_folder(tmp_path)[1], tensors)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-moe"])
def test_a_typical_q_v_adapter_made_by_peft_loads_and_scores_alike(engines, dirs, tmp_path, arch):
    """PEFT's usual choice, target_modules=["q_proj", "v_proj"] with its own random init, saved by PEFT:
    it loads as that subset and the engine scores exactly as the PeftModel does."""
    from mintd.engine.train import Datum, TrainGroup

    model = AutoModelForCausalLM.from_pretrained(dirs[arch], dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path)

    spec, tensors = load_peft_folder(tmp_path)
    assert spec.target_modules == ("q_proj", "v_proj") and spec.kinds == {"attn"}
    assert (spec.rank, spec.scale) == (4, 2.0)
    engine = engines[arch]
    slot = engine.load_adapter(spec, tensors, trainable=False)
    full = engine.create_adapter(LoraSpec(rank=4, seed=1))  # same rank, other target set: another group
    seq = torch.arange(3, 30) % engine.vocab_size
    datum = Datum(seq[:-1], {"target_tokens": seq[1:]})
    ours = engine.forward_backward([TrainGroup(slot, [datum]), TrainGroup(full, [datum])], forward_only=True)
    with torch.no_grad():
        logits = peft_model(seq[None, :-1]).logits[0].float()
    theirs = torch.log_softmax(logits, -1).gather(-1, seq[1:, None])[:, 0]
    assert torch.allclose(ours[0].logprobs[0], theirs, atol=1e-4)
    engine.drop(slot)
    engine.drop(full)


def test_target_modules_are_checked():
    with pytest.raises(ValueError, match="not among"):
        LoraSpec(target_modules=("qq_proj",))
    with pytest.raises(ValueError, match="train_mlp is false"):
        LoraSpec(train_mlp=False, target_modules=("q_proj", "down_proj"))
    assert LoraSpec(target_modules=("v_proj", "q_proj", "q_proj")).target_modules == ("q_proj", "v_proj")


def test_export_readme_says_what_peft_cannot_load():
    from mintd.store.peft import export_readme, peft_unloadable

    pair = {"lora_A": torch.zeros(2, 4), "lora_B": torch.zeros(4, 2)}
    names = ["model.layers.0.self_attn.q_a_proj", "model.layers.0.mlp.gate_proj", "lm_head"]
    tensors = {f"{n}.{k}": t for n in names for k, t in pair.items()}
    tensors["model.layers.1.mlp.experts.down_proj.lora_A"] = torch.zeros(4, 2, 4)
    tensors["model.layers.1.mlp.experts.down_proj.lora_B"] = torch.zeros(4, 4, 2)
    assert peft_unloadable("deepseek_v3", names) == ["model.layers.0.mlp.gate_proj"]
    assert peft_unloadable("llama", names) == []
    blocked = export_readme(tensors, "dsv3", "deepseek_v3")
    assert "PEFT cannot load this adapter" in blocked and "`gate_proj`" in blocked
    assert "- attn: q_a_proj" in blocked and "experts.down_proj" in blocked and "target_parameters" in blocked
    assert "PEFT cannot load" not in export_readme(tensors, "llama", "llama")
