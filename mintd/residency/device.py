"""Packed adapter -> engine slot: the one copy from host memory to the device."""

from __future__ import annotations

import numpy as np
import torch

from mintd.engine.adapters import Adapter, BufferWeights, Piece
from mintd.engine.engine import Engine
from mintd.store.packed import Entry, PackedAdapter, Source, read_packed, views


def load_packed_into(
    engine: Engine,
    source: Source | PackedAdapter,
    trainable: bool = False,
    verify: bool = True,
    with_optimizer: bool = True,
) -> int:
    """Packed adapter -> a new engine slot. A frozen slot on the CPU adopts views of the (private: a
    copy-on-write memory map, or read when small) float32 buffer as it is: nothing is copied, and
    nothing ever writes to it. Otherwise the weights' group is copied once into one private tensor
    on the engine's device (float32 masters for a trainable slot; the engine's frozen dtype,
    bfloat16 on a bfloat16 GPU, for a frozen one) and the slot adopts views of it (no per-tensor
    copies). A frozen slot's views are made when read (`BufferWeights`). Optimizer state, used only
    by a trainable slot (and skipped when `with_optimizer` is False: a fresh optimizer), goes to the
    engine's optimizer, which copies it itself."""
    packed = source if isinstance(source, PackedAdapter) else read_packed(source, verify=verify)
    if packed.header.base_fingerprint != engine.fingerprint:
        raise ValueError(
            f"packed adapter: trained on base model {packed.header.base_fingerprint[:12]}..., "
            f"but this engine serves {engine.fingerprint[:12]}..."
        )
    index = {**packed.header.weights, **packed.header.delta_mem_tensors}
    needed = {e.group for e in index.values()}
    dtype = torch.float32 if trainable else engine.slots.frozen_dtype
    if trainable or not _adoptable(engine, packed):
        groups = {name: _private_copy(packed.groups[name], engine.device, dtype) for name in needed}
    else:
        groups = {name: packed.groups[name] for name in needed}
    pieces = None if trainable or packed.header.delta_mem else _pieces(packed.header.weights)
    if pieces is not None:  # a frozen LoRA slot: views made when read (see `BufferWeights`)
        return engine.slots.add(engine.slots.adopt(packed.header.spec, BufferWeights(groups, pieces)))
    tensors = views(groups, index)
    if trainable and with_optimizer:
        tensors.update(packed.optimizer)
    return engine.load_adapter(
        packed.header.spec, tensors, trainable=trainable, copy=False, delta_mem=packed.header.delta_mem
    )


def frozen_view(engine: Engine, packed: PackedAdapter) -> Adapter | None:
    """The frozen slot `load_packed_into` would make of a verified LoRA adapter that needs no copy (a
    CPU engine adopts views of the buffer), built where it is called: the loader thread builds it, so
    the engine thread's whole part of a cold load is adding it to the slot table. Its weights are
    `BufferWeights`, views made when read rather than kept. None when a slot needs more (a device copy,
    a dtype conversion, δ-mem weights, another base): then the engine thread runs `load_packed_into`,
    which also says what is wrong."""
    header = packed.header
    if header.delta_mem is not None or header.base_fingerprint != engine.fingerprint:
        return None
    if not _adoptable(engine, packed):
        return None
    pieces = _pieces(header.weights)
    if pieces is None:
        return None
    return engine.slots.adopt(header.spec, BufferWeights(packed.groups, pieces))


# a layout's (A, B) pieces by target, by the id of its header's index (adapters of one layout share that
# dict: see `store.packed`); the index is kept beside them so the id stays its own
_PIECES: dict[int, tuple[dict[str, Entry], dict[str, tuple[Piece, Piece]] | None]] = {}
_MAX_PIECES = 256


def _pieces(index: dict[str, Entry]) -> dict[str, tuple[Piece, Piece]] | None:
    """`index`'s matrices paired by target; None unless every key is a target's lora_A or lora_B and
    every target has both (then `load_packed_into` says what is wrong)."""
    cached = _PIECES.get(id(index))
    if cached is not None and cached[0] is index:
        return cached[1]
    targets = sorted({key.rpartition(".")[0] for key in index})
    try:
        pieces = {t: (Piece(*index[f"{t}.lora_A"]), Piece(*index[f"{t}.lora_B"])) for t in targets}
    except KeyError:
        pieces = None
    if pieces is not None and len(index) != 2 * len(pieces):
        pieces = None
    if len(_PIECES) >= _MAX_PIECES:
        _PIECES.clear()
    _PIECES[id(index)] = (index, pieces)
    return pieces


def _adoptable(engine: Engine, packed: PackedAdapter) -> bool:
    """Whether a frozen slot can hold views of `packed`'s weights as they are."""
    index = {**packed.header.weights, **packed.header.delta_mem_tensors}
    dtype = engine.slots.frozen_dtype
    return engine.device.type == "cpu" and all(packed.groups[e.group].dtype == dtype for e in index.values())


def _private_copy(group: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One `dtype` copy of a group on `device`. On the CPU a float32 group is copied by numpy's plain
    memcpy: torch would run a large copy on its intra-op thread pool, which forward passes keep busy
    while loads run in the background (measured ~12 ms instead of ~0.5 ms per copy on a busy 2-core host).
    """
    if device.type == "cpu" and group.dtype == dtype == torch.float32:
        out = torch.empty_like(group)
        np.copyto(out.numpy(), group.numpy())
        return out
    return group.to(device, dtype, copy=True)
