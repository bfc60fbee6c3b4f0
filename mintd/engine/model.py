"""Loading a frozen base model from a local Hugging Face folder, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mintd.families import Family, family_for

_CHUNK = 1 << 20


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """float32 on CPU (exact comparisons, no bf16 penalty there), bfloat16 on CUDA."""
    if preference == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, preference)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model_dir: Path) -> str:
    """sha256 over the canonical config and the digest of every weight file: adapters trained on one
    base model must never be applied to another."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("transformers_version", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weight_files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not weight_files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors or *.bin weight files")
    for path in weight_files:
        h.update(path.name.encode())
        h.update(_file_sha256(path).encode())
    return h.hexdigest()


def load_base_model(
    model_dir: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Family]:
    """The base stays frozen and in eval mode: only adapter tensors ever receive gradients.

    `attn_implementation="auto"` takes the family's (sdpa where it is supported; eager for gpt-oss,
    whose attention sinks sdpa cannot express)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    family = family_for(AutoConfig.from_pretrained(model_dir).model_type)
    attn = family.attn_implementation if attn_implementation == "auto" else attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    except ValueError as exc:  # transformers names the implementations the model supports
        raise ValueError(f"{model_dir}: attn_implementation {attn!r}: {exc}") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer, family
