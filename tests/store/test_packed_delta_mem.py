"""δ-mem adapters in the packed format: their `delta_mem.` tensors round-trip bit for bit (with or
without a LoRA, with optimizer state), through an engine slot and back; PEFT export refuses them."""

import json
import struct

import pytest
import torch

from mintd.config import EngineSettings
from mintd.engine.adapters import LoraSpec
from mintd.engine.delta_mem import DeltaMemSpec
from mintd.engine.engine import Engine
from mintd.engine.optim import AdamParams
from mintd.engine.train import Datum, TrainGroup
from mintd.residency.device import load_packed_into
from mintd.store.packed import pack, packed_to_peft_folder, read_packed, split_state

LORA = LoraSpec(rank=4, seed=0)
EPISODE = Datum(
    torch.arange(10, 22),
    {"target_tokens": torch.arange(11, 23), "segment_ids": torch.tensor([0.0] * 5 + [1.0] * 7)},
)


@pytest.fixture(scope="module")
def engine(qwen3_dir) -> Engine:
    return Engine(qwen3_dir, EngineSettings(device="cpu"))


def trained(engine: Engine, spec: DeltaMemSpec) -> int:
    slot = engine.create_adapter(LORA, spec)
    engine.forward_backward([TrainGroup(slot, [EPISODE])])
    engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    return slot


def header(data: bytes) -> dict:
    _, _, length, _ = struct.unpack_from("<8sIQ32s", data)
    return json.loads(data[struct.calcsize("<8sIQ32s") : struct.calcsize("<8sIQ32s") + length])


def loss(engine: Engine, slot: int) -> float:
    return engine.forward_backward([TrainGroup(slot, [EPISODE])], forward_only=True)[0].loss


@pytest.mark.parametrize("with_lora", [False, True])
def test_round_trip_is_bit_identical(engine, with_lora, tmp_path):
    spec = DeltaMemSpec(readout_init="base_slice", seed=3, lora=with_lora)
    slot = trained(engine, spec)
    _, tensors = engine.export_adapter(slot, with_optimizer=True)
    weights, optimizer = split_state(tensors)
    assert any(k.startswith("delta_mem.") for k in weights)
    assert any(k.startswith("delta_mem.") and k.endswith(".exp_avg") for k in optimizer)
    data = pack(LORA, weights, engine.fingerprint, optimizer, spec)

    packed = read_packed(data)
    assert packed.header.delta_mem == spec
    assert bool(packed.header.targets) == with_lora
    assert packed.tensors.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(packed.tensors[k], v), k
    for k, v in optimizer.items():
        assert torch.equal(packed.optimizer[k], v), k

    for trainable in (False, True):
        loaded = load_packed_into(engine, packed, trainable=trainable)
        assert engine.delta_mem_spec(loaded) == spec
        assert loss(engine, loaded) == loss(engine, slot)
        _, again = engine.export_adapter(loaded, with_optimizer=trainable)
        assert pack(LORA, split_state(again)[0], engine.fingerprint, None, spec) == pack(
            LORA, weights, engine.fingerprint, None, spec
        )

    with pytest.raises(ValueError, match="PEFT export: this is a delta_mem adapter"):
        packed_to_peft_folder(packed, tmp_path / "peft", "tiny")


def test_lora_files_carry_no_delta_mem_entry(engine):
    slot = engine.create_adapter(LORA)
    _, tensors = engine.export_adapter(slot)
    data = pack(LORA, tensors, engine.fingerprint)
    assert "delta_mem" not in header(data) and read_packed(data).header.delta_mem is None


def test_pack_refuses_mismatched_delta_mem(engine):
    spec = DeltaMemSpec(seed=1)
    _, tensors = engine.export_adapter(trained(engine, spec))
    with pytest.raises(ValueError, match="pack: delta_mem.layers.0.gate_bias without a delta_mem spec"):
        pack(LORA, tensors, engine.fingerprint)
    lora_tensors = engine.export_adapter(engine.create_adapter(LORA))[1]
    with pytest.raises(ValueError, match="pack: a delta_mem spec without delta_mem weights"):
        pack(LORA, lora_tensors, engine.fingerprint, None, spec)
    with pytest.raises(ValueError, match="has no LoRA"):
        pack(LORA, {**tensors, **lora_tensors}, engine.fingerprint, None, spec)
