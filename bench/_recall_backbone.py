"""Stage 0 of the recall benchmark (not under test): make the tiny random base competent at the
*in-context* version of the task, as a real instruct model would be, then freeze it.

Full fine-tuning is not a Tinker operation, so it runs here offline with plain torch on the Hugging Face
model, and the result is saved as an ordinary model folder the server then serves as its base. Cached:
a folder that already holds a model trained for the same settings is reused.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _recall_task import Episode, Task
from transformers import AutoModelForCausalLM, AutoTokenizer

from mintd.engine.tiny import make_tiny_model

MARKER = "recall_stage0.json"  # written last: its presence (with equal settings) means the folder is done


def in_context_batch(episodes: list[Episode], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) right-padded; labels are -100 except on the answer."""
    rows = [e.full_context() + list(e.answer) for e in episodes]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (r, e) in enumerate(zip(rows, episodes, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, len(r) - len(e.answer) : len(r)] = torch.tensor(e.answer)
    return ids, mask, labels


def answer_loss(model: torch.nn.Module, episodes: list[Episode], pad: int) -> tuple[torch.Tensor, float]:
    """Mean CE over answer tokens, and the exact-match rate of the value (argmax at the value position)."""
    ids, mask, labels = in_context_batch(episodes, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    first = (targets != -100).int().argmax(dim=1)  # the value: the first answer position
    rows = torch.arange(len(episodes))
    exact = (logits[rows, first].argmax(-1) == targets[rows, first]).float().mean().item()
    return loss, exact


def prepare_backbone(
    out_dir: Path,
    make_task: Callable[[AutoTokenizer], Task],
    settings: dict,
    log: Callable[[str], None],
) -> dict:
    """Train (or reuse) the competent base in `out_dir`; returns its record (steps, held-out EM, seconds)."""
    marker = out_dir / MARKER
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        record = json.loads(marker.read_text())
        log(f"stage 0: reusing {out_dir} (held-out in-context EM {record['held_out_em']:.3f})")
        return record
    started = time.perf_counter()
    make_tiny_model(out_dir, settings["arch"], seed=0, size=settings["size"])
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    task = make_task(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.train()
    torch.manual_seed(settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / settings["max_steps"])
    held_out = task.episodes(256, seed=settings["seed"] + 999)
    rng = random.Random(settings["seed"])
    pad = tokenizer.pad_token_id
    exact, step = 0.0, 0
    for step in range(1, settings["max_steps"] + 1):
        batch = [task.episode(rng) for _ in range(settings["batch"])]
        loss, _ = answer_loss(model, batch, pad)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay.step()
        if step % settings["eval_every"] == 0:
            model.eval()
            with torch.no_grad():
                _, exact = answer_loss(model, held_out, pad)
            model.train()
            log(f"stage 0: step {step} loss {loss.item():.3f} held-out in-context EM {exact:.3f}")
            if exact >= settings["target_em"]:
                break
    if exact < settings["target_em"]:
        log(f"stage 0: in-context EM {exact:.3f} < {settings['target_em']} after {step} steps; going on")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    record = {
        "settings": settings,
        "steps": step,
        "held_out_em": exact,
        "seconds": round(time.perf_counter() - started, 1),
    }
    marker.write_text(json.dumps(record))
    return record
