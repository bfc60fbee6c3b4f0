"""Tiny, deterministic Hugging Face models built offline, for tests and the demo.

No model hub is reachable here, so every test and demo runs on models made from scratch: a
byte-level BPE tokenizer trained on an embedded corpus plus randomly initialised weights of a
real architecture. The folder written is an ordinary Hugging Face model folder, so the code
under test loads it exactly as it would load a downloaded base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GenerationConfig,
    GptOssConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

from mintd.lora_config import LoraSpec

if TYPE_CHECKING:
    from mintd.engine.engine import Engine

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ARCHS = ("qwen3", "llama", "qwen3-moe", "deepseek-v3", "gpt-oss", "qwen3-next")
MAX_POSITIONS = 4096
EXPERTS, EXPERTS_PER_TOKEN = 4, 2
SLIDING_WINDOW = 16  # gpt-oss: small, so that test prompts already run past it


@dataclass(frozen=True)
class Preset:
    """Shape of one model size. `vocab` is the model's vocabulary; the tokenizer is trained toward it, and
    where the embedded corpus runs out of merges first (the 0.6B shape) the rows past the tokenizer's last
    id stay unused, as in released checkpoints whose vocabulary is padded past their tokenizer's."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


PRESETS: dict[str, Preset] = {
    "test": Preset(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1024),
    "small": Preset(hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1408, vocab=4096),
    "base": Preset(hidden=768, layers=12, heads=12, kv_heads=4, head_dim=64, intermediate=3072, vocab=4096),
    # Qwen3-0.6B's shape (untied embeddings, unlike the release: the same bytes read per decoded token)
    "qwen3-0.6b": Preset(
        hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936
    ),
}

CORPUS = """\
User: Hello! Who are you?
Assistant: Hello! I am a small assistant. I can answer simple questions, count, and do sums.
User: What is your name?
Assistant: My name is Mint. It is nice to meet you.
User: What color is the sky?
Assistant: The sky is blue on a clear day, grey when it rains, and orange or pink at sunset.
User: What color is grass?
Assistant: Grass is green. In a dry summer it can turn yellow or brown.
User: Name three animals.
Assistant: A cat, a dog, and a horse. There are many more: the cow, the sheep, the goat, the pig.
User: Which animal is the biggest?
Assistant: The blue whale is the biggest animal. An elephant is the biggest animal on land.
User: Can you count to ten?
Assistant: Yes: one, two, three, four, five, six, seven, eight, nine, ten.
User: What is 3 + 4?
Assistant: 3 + 4 = 7.
User: What is 12 - 5?
Assistant: 12 - 5 = 7.
User: What is 6 * 7?
Assistant: 6 * 7 = 42.
User: Thank you!
Assistant: You are welcome. Have a good day!

Alice has a red ball. Bob has a blue kite. Carol has a green hat, and Dave has a yellow boat.
Eve likes purple flowers. Frank likes black coffee. Grace likes white snow. Henry likes brown bread.
Ivy, Jack, Kate, Leo, Mia, Noah, Olivia, Paul, Quinn, Rose, Sam, Tom, Uma, Victor, Wendy, Xavier,
Yara and Zoe are friends. They meet in the park every Sunday.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the warm sun.
A small cat sat on the mat. The cat saw a mouse and ran after it, but the mouse was too fast.
The bird sings in the tall tree. The fish swims in the cold river. The frog jumps into the pond.
The lion is the king of the jungle. The tiger has orange fur with black stripes.
The zebra has black and white stripes. The giraffe has a long neck and eats leaves from high trees.
The monkey climbs trees and eats bananas. The bear sleeps all winter in a dark cave.
The rabbit has long ears and eats carrots. The owl hunts at night. The bee makes sweet honey.
Colors: red, orange, yellow, green, blue, indigo, violet, purple, pink, brown, black, white, grey, gold.
Animals: cat, dog, horse, cow, sheep, goat, pig, duck, hen, fox, wolf, bear, lion, tiger, zebra, giraffe,
elephant, monkey, rabbit, mouse, owl, eagle, snake, frog, fish, shark, whale, dolphin, bee, ant, spider.
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Months: January, February, March, April, May, June, July, August, September, October, November, December.
Numbers in words: zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen,
fourteen, fifteen, sixteen, seventeen, eighteen, nineteen, twenty, thirty, forty, fifty, sixty, seventy,
eighty, ninety, one hundred, one thousand.
Questions often start with who, what, where, when, why, or how. Answers should be short and true.
It is sunny today. Yesterday it was cloudy, and tomorrow it may rain. Take an umbrella just in case!
The train leaves at 9:15 and arrives at 11:30. The ticket costs $12.50, or 10% less with a card.
Water boils at 100 degrees and freezes at 0 degrees. A day has 24 hours; an hour has 60 minutes.
"Please," said the teacher, "open your books to page 42." The students read quietly (mostly).
Is it true? No, it's false. Maybe... We'll see; time will tell. Don't worry -- be happy.
Email: hello@example.com; web: https://example.com/path?q=1&x=2; code: print("hi") # done
Brackets [like this], braces {like that}, angle <tags>, and a pipe | or a backslash \\ or a tilde ~.
"""


def _training_texts() -> Iterator[str]:
    """The corpus plus sum and product tables for 0-100.

    The English text alone holds too few distinct words for BPE to reach 4096 tokens; the
    tables add thousands of distinct numbers.
    """
    yield CORPUS
    yield " ".join(str(n) for n in range(101))
    for a in range(101):
        yield "\n".join(f"{a} + {b} = {a + b}\n{a} * {b} = {a * b}" for b in range(101))


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer: every byte is in the alphabet, so any text round-trips."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _preset(arch: str, size: str) -> Preset:
    """The preset for `size`, failing early (before any training) on a bad arch or size."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[size]


def make_config(arch: str, size: str, vocab_size: int, eos_token_id: int) -> PretrainedConfig:
    """Model config for `arch` at preset `size`, with untied embeddings like the real base models."""
    p = _preset(arch, size)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        head_dim=p.head_dim,
        intermediate_size=p.intermediate,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    moe = dict(
        num_experts_per_tok=EXPERTS_PER_TOKEN, moe_intermediate_size=p.intermediate // 2, norm_topk_prob=True
    )
    if arch == "qwen3-moe":
        return Qwen3MoeConfig(**common, **moe, num_experts=EXPERTS, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "deepseek-v3":  # MLA (low-rank q and compressed kv) + MoE with a shared expert, layer 0 dense
        common.pop("head_dim")
        common["num_key_value_heads"] = p.heads  # MLA expands one latent to every head
        return DeepseekV3Config(
            **common,
            **moe,
            q_lora_rank=p.hidden // 2,
            kv_lora_rank=p.hidden // 4,
            qk_rope_head_dim=p.head_dim // 2,
            qk_nope_head_dim=p.head_dim // 2,
            v_head_dim=p.head_dim,
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
        )
    if arch == "gpt-oss":  # attention sinks, alternating sliding-window / full attention, MoE with biases
        common.pop("intermediate_size")
        return GptOssConfig(
            **common,
            intermediate_size=p.intermediate // 2,
            num_local_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_PER_TOKEN,
            sliding_window=SLIDING_WINDOW,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(p.layers)],
        )
    # qwen3-next: Gated DeltaNet linear attention, then full attention, alternating; MoE with a shared expert
    return Qwen3NextConfig(
        **common,
        **moe,
        num_experts=EXPERTS,
        shared_expert_intermediate_size=p.intermediate // 2,
        decoder_sparse_step=1,
        linear_num_key_heads=p.kv_heads,
        linear_num_value_heads=p.heads,
        linear_key_head_dim=p.head_dim,
        linear_value_head_dim=p.head_dim,
        layer_types=[("linear_attention", "full_attention")[i % 2] for i in range(p.layers)],
    )


def count_parameters(config: PretrainedConfig) -> int:
    """Parameter count of the model `config` describes, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def tiny_tokenizer_and_config(arch: str, size: str) -> tuple[PreTrainedTokenizerFast, PretrainedConfig]:
    """The tokenizer and model config `make_tiny_model` writes: the vocabulary is the preset's, or the
    tokenizer's where that is larger."""
    vocab = _preset(arch, size).vocab
    tokenizer = make_tokenizer(vocab)
    config = make_config(arch, size, max(vocab, len(tokenizer)), eos_token_id=tokenizer.eos_token_id)
    return tokenizer, config


def make_tiny_model(out_dir: Path, arch: str = "qwen3", seed: int = 0, size: str = "test") -> Path:
    """Write a loadable model folder; the same (arch, seed, size) always gives identical weights."""
    out_dir = Path(out_dir)
    tokenizer, config = tiny_tokenizer_and_config(arch, size)
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def random_adapter(
    engine: Engine, rank: int, seed: int, **fields: object
) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """A LoRA adapter with random A and B (B not zero, so it changes the model's answers) for every
    target of `engine`'s base (narrowed by `fields` of LoraSpec): test and benchmark fleets of
    distinct saved adapters."""
    spec = LoraSpec(rank=rank, **fields)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in engine.slots.targets_for(spec):
        a_shape, b_shape = target.shapes(rank)
        tensors[f"{target.name}.lora_A"] = torch.randn(a_shape, generator=gen) * 0.05
        tensors[f"{target.name}.lora_B"] = torch.randn(b_shape, generator=gen) * 0.05
    return spec, tensors


def frozen_random(engine: Engine, slot: int, seed: int) -> int:
    """A frozen copy (snapshot) of trainable `slot` with random LoRA B matrices, `slot` dropped: a fresh
    adapter's B is zero, so it would answer exactly as the base (tests and benchmarks of mixed batches)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in engine.slots[slot].weights.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    frozen = engine.snapshot(slot)
    engine.drop(slot)
    return frozen
