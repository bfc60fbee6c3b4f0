import json
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mintd.cli import app
from mintd.engine.tiny import (
    ARCHS,
    PRESETS,
    count_parameters,
    make_config,
    make_tiny_model,
    make_tokenizer,
    random_adapter,
    tiny_tokenizer_and_config,
)

MODEL_TYPES = {
    "qwen3": "qwen3",
    "llama": "llama",
    "qwen3-moe": "qwen3_moe",
    "deepseek-v3": "deepseek_v3",
    "gpt-oss": "gpt_oss",
    "qwen3-next": "qwen3_next",
}


@pytest.fixture(scope="module")
def big_tokenizer():
    """The tokenizer the small and base presets use (the same vocabulary target)."""
    assert PRESETS["small"].vocab == PRESETS["base"].vocab
    return make_tokenizer(PRESETS["small"].vocab)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_loads_and_runs(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    assert model.config.model_type == MODEL_TYPES[arch]
    assert model.config.vocab_size == len(tokenizer)
    assert not model.config.tie_word_embeddings
    batch = tokenizer("User: What is 3 + 4?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_moe_config(moe_dir):
    config = AutoConfig.from_pretrained(moe_dir)
    assert (config.num_experts, config.num_experts_per_tok, config.decoder_sparse_step) == (4, 2, 1)
    assert config.mlp_only_layers == []
    assert config.norm_topk_prob


def test_test_size_builds_fast(tiny_model_dir, tmp_path):
    tiny_model_dir("qwen3")  # imports and first-use costs are paid here, not timed
    start = time.perf_counter()
    make_tiny_model(tmp_path / "m")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_deterministic_per_seed(tiny_model_dir, tmp_path, arch):
    weights = (tiny_model_dir(arch) / "model.safetensors").read_bytes()
    again = make_tiny_model(tmp_path / "again", arch=arch, seed=0)
    assert (again / "model.safetensors").read_bytes() == weights
    assert (tiny_model_dir(arch, seed=1) / "model.safetensors").read_bytes() != weights


def test_parameter_count_matches_loaded_model(qwen3_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    loaded = sum(p.numel() for p in model.parameters())
    assert count_parameters(AutoConfig.from_pretrained(qwen3_dir)) == loaded


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces  \n\ttabs\r\nand CRLF",
        "héllo wörld — ñ, ß, ø, 世界, こんにちは, 안녕, Привет, مرحبا",
        "emoji 🤖🦊🏳️‍🌈 and a zero-width joiner \u200d and NUL \x00 byte",
        "3 + 4 = 7; 12345678901234567890 * 0.5",
        "",
    ],
)
def test_tokenizer_round_trips_any_text(qwen3_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_tokenizer_adds_no_bos(qwen3_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    assert tokenizer.bos_token is None
    assert tokenizer.encode("hi") == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("hi"))


def test_chat_template(qwen3_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(special)) == 1


def test_eos_and_pad_ids(qwen3_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == eos
    assert model.config.eos_token_id == model.config.pad_token_id == eos
    assert model.config.bos_token_id is None
    generation = json.loads((qwen3_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos


def test_vocab_sizes(qwen3_dir, big_tokenizer):
    assert len(AutoTokenizer.from_pretrained(qwen3_dir)) == PRESETS["test"].vocab
    assert len(big_tokenizer) == PRESETS["small"].vocab


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_reach_their_sizes(big_tokenizer, arch):
    def params(size: str) -> int:
        return count_parameters(make_config(arch, size, len(big_tokenizer), big_tokenizer.eos_token_id))

    assert params("small") >= 20_000_000
    assert params("base") >= 100_000_000


def test_qwen3_0_6b_preset_has_the_release_shape():
    """Qwen3-0.6B's shapes and vocabulary, padded past what the embedded corpus trains (untied, so
    0.6B + one more embedding-sized matrix)."""
    tokenizer, config = tiny_tokenizer_and_config("qwen3", "qwen3-0.6b")
    assert len(tokenizer) < config.vocab_size == 151_936
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (1024, 28, 3072)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 128)
    assert count_parameters(config) - 151_936 * 1024 == pytest.approx(596e6, rel=0.01)


def test_random_adapter_takes_spec_fields(qwen3_dir):
    from mintd.engine.engine import Engine

    engine = Engine(qwen3_dir)
    spec, tensors = random_adapter(engine, 4, seed=0, train_unembed=False)
    assert (spec.rank, spec.train_unembed) == (4, False)
    assert tensors and not any("lm_head" in k for k in tensors)
    assert any("lm_head" in k for k in random_adapter(engine, 4, seed=0)[1])


def test_unknown_arch_or_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="unknown size"):
        make_tiny_model(tmp_path, size="huge")


def test_cli_make_tiny_model(tmp_path):
    out = tmp_path / "cli-model"
    result = CliRunner().invoke(app, ["make-tiny-model", str(out), "--arch", "llama", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output
    assert (out / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(out).model_type == "llama"


def test_cli_rejects_unknown_arch(tmp_path):
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "m"), "--arch", "gpt2"])
    assert result.exit_code != 0
    assert not (tmp_path / "m").exists()
