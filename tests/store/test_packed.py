"""The packed format round-trips exactly (engine and PEFT), matches PEFT's outputs, and refuses every
kind of damage with an error naming it."""

import hashlib
import json
import os
import struct
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mintd.config import EngineSettings
from mintd.engine.adapters import LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.optim import AdamParams
from mintd.engine.train import Datum, TrainGroup
from mintd.residency.device import load_packed_into
from mintd.store import packed as packed_module
from mintd.store.packed import (
    ALIGN,
    MAGIC,
    pack,
    packed_to_peft_folder,
    peft_folder_to_packed,
    read_packed,
    split_state,
    storage_count,
    write_packed,
)

ARCHS = {"qwen3": "qwen3_dir", "llama": "llama_dir", "qwen3-moe": "moe_dir"}
SPEC = LoraSpec(rank=4, alpha=16, seed=1)
ATOL = 1e-4


@pytest.fixture(scope="module", params=list(ARCHS))
def engine(request) -> Engine:
    return Engine(request.getfixturevalue(ARCHS[request.param]), EngineSettings(device="cpu"))


@pytest.fixture(scope="module")
def qwen3(qwen3_dir) -> Engine:
    return Engine(qwen3_dir, EngineSettings(device="cpu"))


def _random_adapter(engine: Engine, spec: LoraSpec = SPEC) -> int:
    """A slot with non-zero A and B (B = 0 would make the adapter the base model)."""
    slot = engine.create_adapter(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    for a, b in engine.slots[slot].weights.values():
        b.data.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        a.data.add_(torch.randn(a.shape, generator=gen) * 0.01)
    return slot


def _packed(engine: Engine, spec: LoraSpec = SPEC) -> bytes:
    slot = _random_adapter(engine, spec)
    spec, tensors = engine.export_adapter(slot)
    engine.drop(slot)
    return pack(spec, tensors, engine.fingerprint)


def _datum(engine: Engine, n: int = 12, seed: int = 0) -> Datum:
    seq = torch.randint(0, engine.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(seed))
    return Datum(seq[:-1], {"target_tokens": seq[1:]})


def _logprobs(engine: Engine, slot: int, datum: Datum) -> torch.Tensor:
    return engine.forward_backward([TrainGroup(slot, [datum])], forward_only=True)[0].logprobs[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# round trips --------------------------------------------------------------------------------------


def test_engine_packed_engine_is_bit_identical(engine):
    source = _random_adapter(engine)
    spec, tensors = engine.export_adapter(source)
    data = pack(spec, tensors, engine.fingerprint)
    assert pack(spec, tensors, engine.fingerprint) == data  # deterministic: equal adapters, equal bytes
    slot = load_packed_into(engine, data)
    loaded_spec, loaded = engine.export_adapter(slot)
    _assert_same(loaded, tensors)
    assert (loaded_spec.rank, loaded_spec.alpha, loaded_spec.kinds) == (spec.rank, spec.alpha, spec.kinds)
    assert not engine.slots[slot].trainable
    datum = _datum(engine)
    assert torch.equal(_logprobs(engine, slot, datum), _logprobs(engine, source, datum))
    engine.drop(slot)
    engine.drop(source)


@pytest.mark.parametrize(
    "spec", [SPEC, LoraSpec(rank=4, seed=2, train_mlp=False, target_modules=("q_proj", "v_proj", "lm_head"))]
)
def test_packed_peft_packed_is_identical(engine, tmp_path, spec):
    data = _packed(engine, spec)
    assert read_packed(data).header.spec.target_modules == spec.target_modules
    packed_to_peft_folder(read_packed(data), tmp_path, base_model_name="tiny")
    assert peft_folder_to_packed(tmp_path, engine.fingerprint) == data


def test_peft_logprobs_match(engine, tmp_path):
    """Engine slot loaded from a packed file == PeftModel loaded from that file's PEFT export."""
    data = _packed(engine)
    packed_to_peft_folder(read_packed(data), tmp_path, base_model_name=str(engine.model_dir))
    base = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(base, tmp_path).eval()
    slot = load_packed_into(engine, data)
    datum = _datum(engine, n=20, seed=3)
    with torch.no_grad():
        logits = reference(input_ids=datum.tokens.unsqueeze(0)).logits[0].float()
    expected = torch.log_softmax(logits, -1).gather(-1, datum.inputs["target_tokens"].unsqueeze(-1))[:, 0]
    base_lp = _logprobs(engine, 0, datum)
    ours = _logprobs(engine, slot, datum)
    assert (ours - base_lp).abs().max() > 1e-3  # the adapter does change the outputs
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    engine.drop(slot)


def test_path_and_bytes_read_alike(qwen3, tmp_path):
    slot = _random_adapter(qwen3)
    spec, tensors = qwen3.export_adapter(slot)
    qwen3.drop(slot)
    path = tmp_path / "adapter.mint"
    write_packed(path, spec, tensors, qwen3.fingerprint)
    from_file, from_bytes = read_packed(path), read_packed(path.read_bytes())
    _assert_same(from_file.tensors, tensors)
    _assert_same(from_bytes.tensors, tensors)
    assert from_file.header == from_bytes.header
    assert from_file.header.base_fingerprint == qwen3.fingerprint
    assert len(path.read_bytes()) % ALIGN == 0


def _mappings_of(path) -> int:
    return sum(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


def test_small_files_are_read_and_large_ones_mapped(qwen3, tmp_path, monkeypatch):
    """A memory map per held adapter would run into the kernel's limit on mappings (65,530 by
    default) long before a host tier of small adapters fills its byte budget."""
    path = tmp_path / "adapter.mint"
    path.write_bytes(_packed(qwen3))
    assert path.stat().st_size < packed_module.MAP_MIN_BYTES
    read = read_packed(path)
    assert _mappings_of(path) == 0
    monkeypatch.setattr(packed_module, "MAP_MIN_BYTES", 0)
    mapped = read_packed(path)
    assert _mappings_of(path) == 1
    _assert_same(read.tensors, mapped.tensors)
    del mapped
    assert _mappings_of(path) == 0


def test_a_mapped_file_holds_no_file_descriptor(qwen3, tmp_path, monkeypatch):
    """Python's `mmap` keeps a descriptor per map, and a process holding thousands of adapters would
    run out of them (the default soft limit is often 1,024)."""
    path = tmp_path / "adapter.mint"
    path.write_bytes(_packed(qwen3))
    monkeypatch.setattr(packed_module, "MAP_MIN_BYTES", 0)
    before = len(os.listdir("/proc/self/fd"))
    held = [read_packed(path) for _ in range(50)]
    assert len(os.listdir("/proc/self/fd")) == before
    assert _mappings_of(path) == 50
    _assert_same(held[0].tensors, held[-1].tensors)


@pytest.mark.parametrize("map_min_bytes", [0, packed_module.MAP_MIN_BYTES], ids=["mapped", "read"])
def test_writes_to_loaded_views_never_reach_the_file(qwen3, tmp_path, monkeypatch, map_min_bytes):
    monkeypatch.setattr(packed_module, "MAP_MIN_BYTES", map_min_bytes)
    path = tmp_path / "adapter.mint"
    path.write_bytes(_packed(qwen3))
    before = path.read_bytes()
    packed = read_packed(path)
    next(iter(packed.tensors.values())).add_(1.0)
    assert path.read_bytes() == before


def test_trainable_load_restores_optimizer_and_trains_privately(qwen3):
    source = _random_adapter(qwen3)
    datum = _datum(qwen3)
    qwen3.forward_backward([TrainGroup(source, [datum])])
    qwen3.optim_step(source, AdamParams(learning_rate=1e-2))
    spec, state = qwen3.export_adapter(source, with_optimizer=True)
    weights, optimizer = split_state(state)
    assert optimizer, "a step leaves optimizer state"
    data = pack(spec, weights, qwen3.fingerprint, optimizer)
    packed = read_packed(data)
    _assert_same(packed.optimizer, optimizer)
    assert storage_count([*packed.tensors.values(), *packed.optimizer.values()]) == 1

    slot = load_packed_into(qwen3, data, trainable=True)
    _assert_same(qwen3.export_adapter(slot, with_optimizer=True)[1], state)
    # The same step from the same state gives the same weights; the source stays untouched by it.
    for s in (source, slot):
        qwen3.forward_backward([TrainGroup(s, [datum])])
        qwen3.optim_step(s, AdamParams(learning_rate=1e-2))
    _assert_same(qwen3.export_adapter(slot)[1], qwen3.export_adapter(source)[1])
    frozen = load_packed_into(qwen3, data)
    _assert_same(qwen3.export_adapter(frozen)[1], weights)
    for s in (source, slot, frozen):
        qwen3.drop(s)


# tensor objects -----------------------------------------------------------------------------------


def _synthetic(layers: int, rank: int = 8, hidden: int = 32) -> dict[str, torch.Tensor]:
    tensors = {}
    for i in range(layers):
        for leaf in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            tensors[f"model.layers.{i}.{leaf}.lora_A"] = torch.randn(rank, hidden)
            tensors[f"model.layers.{i}.{leaf}.lora_B"] = torch.randn(hidden, rank)
    return tensors


@pytest.mark.parametrize("layers", [2, 48])
def test_one_storage_whatever_the_layer_count(layers):
    tensors = _synthetic(layers)
    packed = read_packed(pack(LoraSpec(rank=8), tensors, "fp"))
    _assert_same(packed.tensors, tensors)
    assert storage_count(tensors.values()) == len(tensors) == 8 * layers
    assert storage_count(packed.tensors.values()) == 1


def test_loaded_slot_holds_one_storage(qwen3):
    slot = load_packed_into(qwen3, _packed(qwen3))
    tensors = [t for pair in qwen3.slots[slot].weights.values() for t in pair]
    assert len(tensors) > 4 and storage_count(tensors) == 1
    qwen3.drop(slot)


# damage -------------------------------------------------------------------------------------------


def _buffer_start(data: bytes) -> int:
    header_len = struct.unpack_from("<Q", data, 12)[0]
    return -(-(52 + header_len) // ALIGN) * ALIGN


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_corrupt_buffer_byte_fails_the_checksum(qwen3):
    data = _packed(qwen3)
    for at in (_buffer_start(data), len(data) // 2 + _buffer_start(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="buffer checksum mismatch"):
            read_packed(_flip(data, at))
        read_packed(_flip(data, at), verify=False)  # the trusted-blob fast path skips only this check


def test_a_file_is_verified_once_until_it_changes(qwen3, tmp_path):
    path = tmp_path / "adapter.mint"
    data = _packed(qwen3)
    path.write_bytes(data)
    read_packed(path)  # hashed: the checksum matched
    read_packed(path)  # the same unchanged file: not hashed again
    path.write_bytes(_flip(data, len(data) - 1))  # same size, new content: its identity changes
    later = path.stat().st_mtime_ns + 10**9  # (a coarse file-system clock could repeat the mtime)
    os.utime(path, ns=(later, later))
    with pytest.raises(ValueError, match="buffer checksum mismatch"):
        read_packed(path)


def test_adapters_of_one_layout_keep_their_own_checksums_and_values(qwen3):
    """The second read of a layout takes the parsed header of the first; it must still carry its own
    buffer checksum (so its corruption is caught) and give its own values."""
    first, second = (_packed(qwen3, LoraSpec(rank=4, alpha=16, seed=s)) for s in (1, 2))
    a = read_packed(first)
    b = read_packed(second)
    assert b.header.sha256 != a.header.sha256
    assert b.header.sha256 == hashlib.sha256(second[_buffer_start(second) :]).hexdigest()
    assert b.header.weights == a.header.weights
    assert any(not torch.equal(b.tensors[k], a.tensors[k]) for k in a.tensors)
    with pytest.raises(ValueError, match="buffer checksum mismatch"):
        read_packed(_flip(second, len(second) - 1))


def test_corrupt_header_byte_fails_its_checksum(qwen3):
    data = _packed(qwen3)
    with pytest.raises(ValueError, match="header checksum mismatch"):
        read_packed(_flip(data, 52 + 10))
    with pytest.raises(ValueError, match="header checksum mismatch"):
        read_packed(_flip(data, 20))  # inside the stored header hash


def test_bad_magic_and_version(qwen3):
    data = _packed(qwen3)
    with pytest.raises(ValueError, match="bad magic"):
        read_packed(b"NOTMINTL" + data[8:])
    with pytest.raises(ValueError, match="unsupported format version 2"):
        read_packed(data[:8] + struct.pack("<I", 2) + data[12:])
    with pytest.raises(ValueError, match="bad magic"):
        read_packed(b"x" * 200)


def test_truncated_file(qwen3, tmp_path):
    data = _packed(qwen3)
    for size in (0, 10, 60, _buffer_start(data) - 1, _buffer_start(data) + 5, len(data) - 1):
        path = tmp_path / f"cut{size}.mint"
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match="truncated file"):
            read_packed(path)
    with pytest.raises(ValueError, match="unexpected trailing bytes"):
        read_packed(data + b"\0" * ALIGN)


def test_unreadable_path(tmp_path):
    with pytest.raises(ValueError, match="cannot read packed adapter"):
        read_packed(tmp_path / "missing.mint")


def _with_header(data: bytes, edit) -> bytes:
    """Re-encode the file with an edited header and a valid header hash: only the edit is wrong."""
    header_len = struct.unpack_from("<Q", data, 12)[0]
    header = json.loads(data[52 : 52 + header_len])
    edit(header)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<IQ", 1, len(text)) + hashlib.sha256(text).digest() + text
    head += bytes(-len(head) % ALIGN)
    return head + data[_buffer_start(data) :]


def _first(index: dict) -> dict:
    return index[sorted(index)[0]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(format_version=7), "format_version 7 disagrees"),
        (lambda h: h.pop("base_fingerprint"), "'base_fingerprint' is missing"),
        (lambda h: h["lora"].update(scale=99.0), "scale 99.0 is not alpha / rank"),
        (lambda h: h["lora"].update(rank=0), "lora spec is invalid"),
        (lambda h: h.update(targets=h["targets"][1:]), "targets disagree"),
        (lambda h: h.update(dtype="float16"), "dtype float16 disagrees"),
        (lambda h: _first(h["tensors"]).update(offset=10**9), "lies outside its group"),
        (lambda h: _first(h["tensors"]).update(shape=[-1, 4]), "malformed offset or shape"),
        (lambda h: _first(h["tensors"]).pop("offset"), "malformed index entry"),
        (lambda h: _first(h["tensors"]).update(group=3), "unknown group"),
        (lambda h: _first(h["tensors"]).update(group="weights.float16"), "unknown group"),
        (lambda h: h["tensors"][sorted(h["tensors"])[1]].update(offset=1), "overlap"),
        (lambda h: h["groups"]["weights.float32"].update(offset=8), "misaligned"),
        (lambda h: h["groups"]["weights.float32"].update(nbytes=10**9), "outside the buffer"),
        (lambda h: h["groups"]["weights.float32"].update(nbytes=6), "whole number of float32"),
        (lambda h: h["groups"]["weights.float32"].update(dtype="int8"), "supported dtype"),
        (lambda h: h["groups"].update(extra=h["groups"]["weights.float32"]), "supported dtype"),
        (lambda h: h["groups"].update({"optimizer.float32": h["groups"]["weights.float32"]}), "overlap"),
        (lambda h: h["buffer"].update(nbytes=h["buffer"]["nbytes"] + ALIGN), "truncated file"),
        (lambda h: h["buffer"].update(sha256="0" * 64), "buffer checksum mismatch"),
    ],
)
def test_inconsistent_header(qwen3, edit, message):
    with pytest.raises(ValueError, match=message):
        read_packed(_with_header(_packed(qwen3), edit))


def test_wrong_base_model_creates_no_slot(qwen3):
    data = pack(SPEC, read_packed(_packed(qwen3)).tensors, "f" * 64)
    before = len(qwen3.slots)
    with pytest.raises(ValueError, match=r"trained on base model ffffffffffff.*but this engine serves"):
        load_packed_into(qwen3, data)
    assert len(qwen3.slots) == before


def test_mismatched_targets_are_refused_by_the_engine(qwen3):
    data = pack(LoraSpec(rank=8), _synthetic(2), qwen3.fingerprint)
    with pytest.raises(ValueError, match="adapter tensors"):
        load_packed_into(qwen3, data)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "no LoRA weights"),
        ({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, "not a LoRA weight"),
        ({"model.layers.0.mlp.up_proj.lora_A": torch.zeros(8, 4)}, "has no lora_B"),
        ({"q.lora_A": torch.zeros(4, 4), "q.lora_B": torch.zeros(4, 8)}, "not rank 8"),
        ({"q.lora_A": torch.zeros(8, 4), "q.lora_B": torch.zeros(4, 8, dtype=torch.float16)}, "mix dtypes"),
        (
            {
                "q.lora_A": torch.zeros(8, 4, dtype=torch.int32),
                "q.lora_B": torch.zeros(4, 8, dtype=torch.int32),
            },
            "dtype",
        ),
    ],
)
def test_pack_refuses_bad_tensors(tensors, message):
    with pytest.raises(ValueError, match=message):
        pack(LoraSpec(rank=8), tensors, "fp")
