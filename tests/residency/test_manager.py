"""The working set on its own: what the engine thread does for a cold load."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mintd.catalog import Provenance, Revision
from mintd.config import EngineSettings
from mintd.engine.engine import Engine
from mintd.engine.tiny import random_adapter
from mintd.residency import Residency
from mintd.residency.device import frozen_view, load_packed_into
from mintd.store.packed import pack, read_packed


def _revision(content_hash: str, fingerprint: str) -> Revision:
    return Revision(
        1,
        "alice",
        "a",
        "ad-1",
        1,
        "sampler",
        content_hash,
        None,
        Provenance(fingerprint),
        None,
        0.0,
        None,
        None,
        {},
    )


def test_the_loader_builds_a_cpu_slot_and_the_engine_thread_only_adds_it(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    engine = Engine(qwen3_dir, EngineSettings())
    spec, tensors = random_adapter(engine, 4, seed=1)
    blob = tmp_path / "a.mintd"

    blob.write_bytes(pack(spec, tensors, engine.fingerprint))
    rev = _revision("c" * 64, engine.fingerprint)
    residency = Residency(engine, lambda r: read_packed(blob), 2**30, 2**30, "test")
    try:
        deadline = time.monotonic() + 30
        while not residency.ready(rev):
            assert time.monotonic() < deadline, "the load never finished"
            time.sleep(0.01)
        staged = residency.host._entries[rev.content_hash].staged
        assert staged.adapter is not None  # built on the loader thread
        slot = residency.acquire(rev)
        assert engine.slots[slot] is staged.adapter
        reference = engine.slots[load_packed_into(engine, blob)]
        for name, (a, b) in reference.weights.items():
            got_a, got_b = engine.slots[slot].weights[name]
            assert torch.equal(got_a, a) and torch.equal(got_b, b) and not got_a.requires_grad
    finally:
        residency.close()


def test_the_host_tier_keeps_the_bytes_alone_and_reloads_from_them(qwen3_dir: Path, tmp_path: Path) -> None:
    """The slot the loader built leaves with the first device copy: what the host tier keeps is a
    handful of objects per adapter (Python's full collections scan every one), and a reload from it
    (no disk read, no hash) gives the same weights."""
    engine = Engine(qwen3_dir, EngineSettings())
    blob = tmp_path / "a.mintd"
    blob.write_bytes(pack(*random_adapter(engine, 4, seed=1), engine.fingerprint))
    rev = _revision("c" * 64, engine.fingerprint)
    reads = []
    residency = Residency(engine, lambda r: reads.append(r) or read_packed(blob), 2**30, 2**30, "test")
    try:
        deadline = time.monotonic() + 30
        while not residency.ready(rev):
            assert time.monotonic() < deadline, "the load never finished"
            time.sleep(0.01)
        slot = residency.acquire(rev)
        first = {n: (a.clone(), b.clone()) for n, (a, b) in engine.slots[slot].weights.items()}
        assert residency.host._entries[rev.content_hash].staged.adapter is None
        residency.release(rev)
        residency.drop(rev)  # off the device; still in the host tier
        assert residency.ready(rev)
        again = engine.slots[residency.acquire(rev)].weights
        assert len(reads) == 1 and residency.host.hits == 1
        assert first.keys() == again.keys()
        for name, (a, b) in first.items():
            assert torch.equal(again[name][0], a) and torch.equal(again[name][1], b)
    finally:
        residency.close()


def test_a_slot_that_needs_a_copy_or_another_base_is_left_to_the_engine_thread(qwen3_dir: Path) -> None:

    engine = Engine(qwen3_dir, EngineSettings())
    spec, tensors = random_adapter(engine, 4, seed=1)
    assert frozen_view(engine, read_packed(pack(spec, tensors, engine.fingerprint))) is not None
    assert (
        frozen_view(engine, read_packed(pack(spec, tensors, "0" * 64))) is None
    )  # load_packed_into says why
    engine.slots.frozen_dtype = torch.bfloat16  # a conversion: a private copy, made on the engine thread
    assert frozen_view(engine, read_packed(pack(spec, tensors, engine.fingerprint))) is None
