"""The packed adapter format: one file per revision, one contiguous checksummed buffer.

A PEFT folder holds one safetensors entry per LoRA matrix, so loading a 24-layer adapter allocates
hundreds of tensors. A packed file holds the same numbers in ONE buffer, so loading it memory-maps the
file (or reads it, when small: see `MAP_MIN_BYTES`) into one tensor and hands out per-target views of
it; moving it to the device is one copy.

Layout (little-endian)::

    b"MINTLORA"  u32 format version  u64 header length  32-byte sha256 of the header
    JSON header (UTF-8)
    zero padding to a multiple of 64 bytes
    buffer: groups of tensors, each group one dtype of one section, each group 64-byte aligned

The header holds the format version, the base-model fingerprint, the LoRA spec (rank, alpha, scale,
train flags), the target names, the weights' dtype, the groups (byte ranges of the buffer), a tensor
index (name -> group, element offset within the group, shape) for the adapter weights and, optionally,
for the optimizer state of a training checkpoint, and the buffer's sha256. A δ-mem adapter adds a
`delta_mem` entry: its spec and the index of its fp32 `delta_mem.<parameter>` tensors (a section of
their own; the LoRA targets are then empty unless the spec says `lora`). Files without δ-mem carry no
such entry, so they are byte-identical to what earlier builds wrote. The header's own sha256 sits
in the fixed preamble, so every byte of the file is covered by a checksum. Packing is deterministic
(sorted names, sorted JSON keys, no timestamps): equal adapters give equal bytes, which lets the
content-addressed blob store keep them once.

"Tensor objects" (see `storage_count`) are distinct storages, i.e. separate allocations: views of one
storage count once. A packed load makes two: the file's buffer (mapped or read) and the private copy
the slot keeps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mintd.lora_config import DELTA_MEM_TENSOR_PREFIX, DeltaMemSpec, LoraSpec, is_weight

MAGIC = b"MINTLORA"
FORMAT_VERSION = 1
ALIGN = 64
# Files smaller than this are read into memory, not mapped: each map is a kernel mapping for as long as
# the adapter is held (device slots and the host tier hold thousands of small adapters, and Linux allows
# a process 65,530 mappings by default, after which every load fails), and touching a small mapped file
# costs page faults that a read of it does not. Larger files are mapped: their pages stay in the page
# cache, unduplicated, and are read only where used.
MAP_MIN_BYTES = 1 << 20
_PREAMBLE = struct.Struct("<8sIQ32s")  # magic, version, header length, header sha256
_MAX_HEADER = 64 << 20
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_SECTIONS = ("weights", "delta_mem", "optimizer")


Source = Path | str | bytes | bytearray


@dataclass(frozen=True)
class Group:
    """A byte range of the buffer holding tensors of one section and one dtype, back to back."""

    dtype: str
    offset: int
    nbytes: int


class Entry(NamedTuple):
    """Where one tensor lives: its group, its element offset within the group, its shape (and size)."""

    group: str
    offset: int
    shape: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class PackedHeader:
    format_version: int
    base_fingerprint: str
    spec: LoraSpec
    targets: tuple[str, ...]
    dtype: str
    groups: dict[str, Group]
    weights: dict[str, Entry]
    optimizer: dict[str, Entry]
    buffer_nbytes: int
    sha256: str
    delta_mem: DeltaMemSpec | None = None
    delta_mem_tensors: dict[str, Entry] = field(default_factory=dict)


@dataclass(frozen=True)
class PackedAdapter:
    """A header and the buffer's groups as flat tensors (views of one storage); the per-tensor dicts
    are views of those."""

    header: PackedHeader
    groups: dict[str, torch.Tensor]

    @cached_property
    def nbytes(self) -> int:
        """Bytes its groups hold (what a copy of it occupies)."""
        return sum(g.numel() * g.element_size() for g in self.groups.values())

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Adapter weights `<target>.lora_A` / `.lora_B` and `delta_mem.<parameter>`, as the engine's
        `export_adapter` names them: new views at each call, not kept (a host tier holds thousands of
        packed adapters, and every tensor kept is one more object for Python's full collections)."""
        return views(self.groups, {**self.header.weights, **self.header.delta_mem_tensors})

    @property
    def optimizer(self) -> dict[str, torch.Tensor]:
        """Optimizer state (`<param>.exp_avg`, ...), empty when the file holds none (new views, as
        `tensors`)."""
        return views(self.groups, self.header.optimizer)


def storage_count(tensors: Iterable[torch.Tensor]) -> int:
    """Tensor objects as the benchmark and tests count them: distinct storages (allocations); views
    of one storage count once."""
    return len({t.untyped_storage().data_ptr() for t in tensors})


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`Engine.export_adapter(with_optimizer=True)` output -> (weights, optimizer state) for `pack`."""
    weights = {k: v for k, v in tensors.items() if is_weight(k)}
    return weights, {k: v for k, v in tensors.items() if k not in weights}


# writing ------------------------------------------------------------------------------------------


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _targets(tensors: dict[str, torch.Tensor], rank: int) -> list[str]:
    """Target names, checking every key is a LoRA matrix, every target has both, at the spec's rank."""
    targets: dict[str, set[str]] = {}
    for key, t in tensors.items():
        target, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not target:
            raise ValueError(f"pack: {key} is not a LoRA weight (<target>.lora_A / .lora_B)")
        if t.dim() < 2 or (t.shape[-2] if kind == "lora_A" else t.shape[-1]) != rank:
            raise ValueError(f"pack: {key} has shape {tuple(t.shape)}, not rank {rank}")
        targets.setdefault(target, set()).add(kind)
    for target, kinds in targets.items():
        if len(kinds) != 2:
            raise ValueError(f"pack: {target} has no {({'lora_A', 'lora_B'} - kinds).pop()}")
    return sorted(targets)


def _layout(sections: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, Group], dict[str, dict]]:
    """Assign each tensor a group (section + dtype) and an offset; groups are aligned and back to back."""
    groups: dict[str, Group] = {}
    index: dict[str, dict] = {}
    offset = 0
    for section in _SECTIONS:
        tensors = sections[section]
        index[section] = {}
        by_dtype: dict[str, list[str]] = {}
        for key in sorted(tensors):
            dtype = _DTYPE_NAMES.get(tensors[key].dtype)
            if dtype is None:
                raise ValueError(
                    f"pack: {key} has dtype {tensors[key].dtype}; supported: {', '.join(_DTYPES)}"
                )
            by_dtype.setdefault(dtype, []).append(key)
        for dtype in sorted(by_dtype):
            name = f"{section}.{dtype}"
            elements = 0
            for key in by_dtype[dtype]:
                shape = list(tensors[key].shape)
                index[section][key] = {"group": name, "offset": elements, "shape": shape}
                elements += tensors[key].numel()
            nbytes = elements * _DTYPES[dtype].itemsize
            groups[name] = Group(dtype, offset, nbytes)
            offset = _align(offset + nbytes)
    return groups, index


def pack(
    spec: LoraSpec,
    tensors: dict[str, torch.Tensor],
    fingerprint: str,
    optimizer: dict[str, torch.Tensor] | None = None,
    delta_mem: DeltaMemSpec | None = None,
) -> bytes:
    """Adapter weights (and optionally optimizer state) of a model with base `fingerprint` -> file bytes;
    with `delta_mem`, the tensors include its `delta_mem.` weights."""
    memory = {k: t for k, t in tensors.items() if k.startswith(DELTA_MEM_TENSOR_PREFIX)}
    tensors = {k: t for k, t in tensors.items() if k not in memory}
    if memory and delta_mem is None:
        raise ValueError(f"pack: {sorted(memory)[0]} without a delta_mem spec")
    if delta_mem is not None and not memory:
        raise ValueError("pack: a delta_mem spec without delta_mem weights")
    if any(t.dtype != torch.float32 for t in memory.values()):
        raise ValueError("pack: delta_mem weights must be float32")
    targets = _targets(tensors, spec.rank)
    if delta_mem is None or delta_mem.lora:
        if not targets:
            raise ValueError("pack: no LoRA weights")
    elif targets:
        raise ValueError(f"pack: {targets[0]}: this delta_mem adapter has no LoRA (delta_mem.lora false)")
    dtypes = {_DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in tensors.values()} or {"float32"}
    if len(dtypes) != 1:
        raise ValueError(f"pack: adapter weights mix dtypes {sorted(dtypes)}")
    sections = {"weights": tensors, "delta_mem": memory, "optimizer": optimizer or {}}
    groups, index = _layout(sections)
    buffer = bytearray(_align(max(g.offset + g.nbytes for g in groups.values())))
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    for section, entries in index.items():
        for key, entry in entries.items():
            group = groups[entry["group"]]
            data = sections[section][key].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            flat.narrow(
                0, group.offset + entry["offset"] * _DTYPES[group.dtype].itemsize, data.numel()
            ).copy_(data)
    header = {
        "format_version": FORMAT_VERSION,
        "base_fingerprint": fingerprint,
        "lora": {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": spec.scale,
            "train_attn": spec.train_attn,
            "train_mlp": spec.train_mlp,
            "train_unembed": spec.train_unembed,
            # only when set, so files of adapters without it stay byte-identical to format 1 as first written
            **({"target_modules": list(spec.target_modules)} if spec.target_modules else {}),
        },
        "targets": targets,
        "dtype": dtypes.pop(),
        "groups": {
            name: {"dtype": g.dtype, "offset": g.offset, "nbytes": g.nbytes} for name, g in groups.items()
        },
        "tensors": index["weights"],
        "optimizer": index["optimizer"],
        "buffer": {"nbytes": len(buffer), "sha256": hashlib.sha256(buffer).hexdigest()},
    }
    if delta_mem is not None:
        header["delta_mem"] = {"spec": delta_mem.model_dump(), "tensors": index["delta_mem"]}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text), hashlib.sha256(text).digest())
    head = preamble + text
    return bytes(head + bytes(_align(len(head)) - len(head)) + buffer)


def write_packed(
    path: Path | str,
    spec: LoraSpec,
    tensors: dict[str, torch.Tensor],
    fingerprint: str,
    optimizer: dict[str, torch.Tensor] | None = None,
) -> None:
    """`pack` to a plain file. Durable, atomic, deduplicated storage is the blob store's job."""
    Path(path).write_bytes(pack(spec, tensors, fingerprint, optimizer))


# reading ------------------------------------------------------------------------------------------


def _field(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{where}: header field {key!r} is missing or malformed")
    return value


def _entries(raw: Any, groups: dict[str, Group], section: str, where: str) -> dict[str, Entry]:
    """Parse one tensor index, checking every tensor lies inside its group and none overlap.
    Runs once per tensor on every load, hence plain lookups rather than `_field`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: header field {section!r} must be a tensor index")
    entries: dict[str, Entry] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for key, item in raw.items():
        try:
            group, offset, shape = item["group"], item["offset"], tuple(item["shape"])
        except (TypeError, KeyError):
            raise ValueError(f"{where}: tensor {key} has a malformed index entry") from None
        if type(offset) is not int or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: tensor {key} has a malformed offset or shape {item}")
        g = groups.get(group) if isinstance(group, str) and group.startswith(f"{section}.") else None
        if g is None:
            raise ValueError(f"{where}: tensor {key} names unknown group {group!r}")
        end = offset + math.prod(shape)
        if offset < 0 or end * _DTYPES[g.dtype].itemsize > g.nbytes:
            raise ValueError(f"{where}: tensor {key} lies outside its group {group}")
        spans.setdefault(group, []).append((offset, end, key))
        entries[key] = Entry(group, offset, shape, end - offset)
    for group_spans in spans.values():
        group_spans.sort()
        for (_, end, first), (start, _, second) in zip(group_spans, group_spans[1:], strict=False):
            if start < end:
                raise ValueError(f"{where}: tensors {first} and {second} overlap")
    return entries


def _groups(raw: Any, buffer_nbytes: int, where: str) -> dict[str, Group]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: header field 'groups' is missing or malformed")
    groups = {}
    for name, item in raw.items():
        g = Group(
            _field(item, "dtype", str, where),
            _field(item, "offset", int, where),
            _field(item, "nbytes", int, where),
        )
        section, _, dtype = name.partition(".")
        if section not in _SECTIONS or dtype != g.dtype or dtype not in _DTYPES:
            raise ValueError(f"{where}: group {name!r} is not <weights|optimizer>.<supported dtype>")
        if g.offset < 0 or g.offset % ALIGN or g.nbytes < 0 or g.offset + g.nbytes > buffer_nbytes:
            raise ValueError(f"{where}: group {name!r} lies outside the buffer or is misaligned")
        if g.nbytes % _DTYPES[dtype].itemsize:
            raise ValueError(f"{where}: group {name!r} is not a whole number of {dtype} elements")
        groups[name] = g
    ordered = sorted(groups.items(), key=lambda item: item[1].offset)
    for (first, a), (second, b) in zip(ordered, ordered[1:], strict=False):
        if b.offset < a.offset + a.nbytes:
            raise ValueError(f"{where}: groups {first} and {second} overlap")
    return groups


def _parse_header(raw: Any, where: str) -> PackedHeader:
    """Header JSON -> PackedHeader, raising ValueError on anything inconsistent."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: header is not a JSON object")
    version = _field(raw, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: header format_version {version} disagrees with the preamble")
    lora = _field(raw, "lora", dict, where)
    try:
        spec = LoraSpec(
            rank=lora.get("rank"),
            alpha=lora.get("alpha"),
            train_attn=lora.get("train_attn"),
            train_mlp=lora.get("train_mlp"),
            train_unembed=lora.get("train_unembed"),
            target_modules=lora.get("target_modules"),
        )
    except ValueError as e:
        raise ValueError(f"{where}: header lora spec is invalid ({e})") from None
    if lora.get("scale") != spec.scale:
        raise ValueError(f"{where}: header lora scale {lora.get('scale')} is not alpha / rank = {spec.scale}")
    buffer = _field(raw, "buffer", dict, where)
    nbytes = _field(buffer, "nbytes", int, where)
    groups = _groups(raw.get("groups"), nbytes, where)
    weights = _entries(raw.get("tensors"), groups, "weights", where)
    targets = _field(raw, "targets", list, where)
    if sorted({k.rpartition(".")[0] for k in weights}) != targets or len(weights) != 2 * len(targets):
        raise ValueError(f"{where}: header targets disagree with the tensor index")
    dtype = _field(raw, "dtype", str, where)
    if any(groups[e.group].dtype != dtype for e in weights.values()):
        raise ValueError(f"{where}: header dtype {dtype} disagrees with the weights' groups")
    delta_mem, memory = _delta_mem(raw, groups, where)
    if not targets and (delta_mem is None or delta_mem.lora):
        raise ValueError(f"{where}: header names no LoRA targets")
    return PackedHeader(
        format_version=version,
        base_fingerprint=_field(raw, "base_fingerprint", str, where),
        spec=spec,
        targets=tuple(targets),
        dtype=dtype,
        groups=groups,
        weights=weights,
        optimizer=_entries(raw.get("optimizer"), groups, "optimizer", where),
        buffer_nbytes=nbytes,
        sha256=_field(buffer, "sha256", str, where),
        delta_mem=delta_mem,
        delta_mem_tensors=memory,
    )


def _delta_mem(
    raw: dict, groups: dict[str, Group], where: str
) -> tuple[DeltaMemSpec | None, dict[str, Entry]]:
    """The header's δ-mem spec and tensor index (None and {} for a LoRA adapter)."""
    if "delta_mem" not in raw:
        return None, {}
    entry = _field(raw, "delta_mem", dict, where)
    try:
        spec = DeltaMemSpec(**_field(entry, "spec", dict, where))
    except ValueError as e:
        raise ValueError(f"{where}: header delta_mem spec is invalid ({e})") from None
    memory = _entries(entry.get("tensors"), groups, "delta_mem", where)
    if not memory or any(not k.startswith(DELTA_MEM_TENSOR_PREFIX) for k in memory):
        raise ValueError(f"{where}: header delta_mem tensors are missing or misnamed")
    if any(groups[e.group].dtype != "float32" for e in memory.values()):
        raise ValueError(f"{where}: header delta_mem tensors must be float32")
    return spec, memory


def refuse_peft(header: PackedHeader) -> None:
    """PEFT has no δ-mem adapter type: a δ-mem adapter (with or without a LoRA) cannot be exported."""
    if header.delta_mem is not None:
        raise ValueError(
            "PEFT export: this is a delta_mem adapter (per-layer memory projections, gates and readouts "
            "that PEFT has no adapter type for); it exists only in mintd's packed format"
        )


# Files whose buffer checksum matched, by identity (device, inode, size, mtime): reading the same
# unchanged file again skips re-hashing it. Any write to a file changes its mtime, so it is hashed again.
_VERIFIED: dict[tuple[int, int, int, int], str] = {}
_MAX_VERIFIED = 1 << 16
# Parsed headers by layout: a header's text less its buffer checksum, which is all that differs between
# adapters of one spec on one base. A cold load of a thousand distinct adapters of a few specs parses a
# few headers, not a thousand (on the test model the parse was about a fifth of a cold load's work, run
# under the GIL beside the engine's steps). Few: a header of a many-target adapter is tens of kilobytes.
_LAYOUTS: dict[bytes, PackedHeader] = {}
_MAX_LAYOUTS = 256
_BUFFER_SHA = re.compile(rb'"sha256"\s*:\s*"([0-9a-f]{64})"')


def _map(source: Source) -> tuple[memoryview, str, tuple[int, int, int, int] | None]:
    """The file's bytes, private (writes to the returned tensors never reach the file): a copy-on-write
    memory map of a path of `MAP_MIN_BYTES` or more, a copy of a smaller file or of in-memory bytes;
    and the file's identity. The map keeps no file descriptor open (Python's `mmap` keeps one per map:
    a process holding ~20,000 adapters then fails every load, and every new connection, with "too many
    open files")."""
    if isinstance(source, bytes | bytearray):
        return memoryview(bytearray(source)), "packed adapter", None
    path = Path(source)
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if st.st_size >= MAP_MIN_BYTES:
                storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=st.st_size)
                now = path.stat()
                if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == identity:  # the same file
                    mapped = torch.empty(0, dtype=torch.uint8).set_(storage)
                    return memoryview(mapped.numpy()), str(path), identity
            buffer = bytearray(st.st_size)  # small, or replaced meanwhile: read what was opened
            return memoryview(buffer)[: f.readinto(buffer)], str(path), identity
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read packed adapter ({e})") from None


def _header(text: bytes, where: str) -> PackedHeader:
    """The parsed header (checksummed already). Texts equal but for the one buffer checksum they hold
    parse to equal headers but for that checksum, so a layout seen before is not parsed again."""
    found = _BUFFER_SHA.findall(text)
    layout = _BUFFER_SHA.sub(b"", text) if len(found) == 1 and text.count(b'"sha256"') == 1 else None
    header = _LAYOUTS.get(layout) if layout is not None else None
    if header is not None:
        return replace(header, sha256=found[0].decode())
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: header is not valid JSON ({e})") from None
    header = _parse_header(raw, where)
    if layout is not None:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            del _LAYOUTS[next(iter(_LAYOUTS))]  # the oldest
        _LAYOUTS[layout] = header
    return header


def read_packed(source: Source, verify: bool = True) -> PackedAdapter:
    """Parse and memory-map a packed adapter. The header is always checked against its sha256; the
    buffer too unless `verify=False` (for a content-addressed blob whose name was verified already),
    once per unchanged file: a file read again with the same identity is not re-hashed."""
    data, where, identity = _map(source)
    if len(data) < _PREAMBLE.size:
        raise ValueError(f"{where}: truncated file ({len(data)} bytes, shorter than the preamble)")
    magic, version, header_len, header_sha = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where}: not a packed adapter (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: unsupported format version {version} (this build reads {FORMAT_VERSION})")
    end = _PREAMBLE.size + header_len
    if header_len > _MAX_HEADER or end > len(data):
        raise ValueError(f"{where}: truncated file (header of {header_len} bytes does not fit)")
    text = data[_PREAMBLE.size : end]
    if hashlib.sha256(text).digest() != header_sha:
        raise ValueError(f"{where}: header checksum mismatch (corrupt file)")
    header = _header(bytes(text), where)
    start = _align(end)
    if start + header.buffer_nbytes > len(data):
        raise ValueError(
            f"{where}: truncated file ({len(data)} bytes, header says {start + header.buffer_nbytes})"
        )
    if start + header.buffer_nbytes < len(data):
        raise ValueError(f"{where}: {len(data) - start - header.buffer_nbytes} unexpected trailing bytes")
    if any(data[end:start]):
        raise ValueError(f"{where}: non-zero padding after the header (corrupt file)")
    buffer = data[start:]
    if verify and (identity is None or _VERIFIED.get(identity) != header.sha256):
        if hashlib.sha256(buffer).hexdigest() != header.sha256:
            raise ValueError(f"{where}: buffer checksum mismatch (corrupt file)")
        if identity is not None:
            if len(_VERIFIED) >= _MAX_VERIFIED:
                _VERIFIED.clear()
            _VERIFIED[identity] = header.sha256
    raw_tensor = torch.frombuffer(buffer, dtype=torch.uint8)
    groups = {
        name: raw_tensor.narrow(0, g.offset, g.nbytes).view(_DTYPES[g.dtype])
        for name, g in header.groups.items()
    }
    return PackedAdapter(header, groups)


def views(groups: dict[str, torch.Tensor], index: dict[str, Entry]) -> dict[str, torch.Tensor]:
    """Per-tensor views of the group tensors. One `split` per group cuts every piece in one call
    (gaps between tensors, empty in files `pack` writes, become pieces that are dropped)."""
    by_group: dict[str, list[tuple[str, Entry]]] = {}
    for key, e in index.items():
        by_group.setdefault(e.group, []).append((key, e))
    out = {}
    for name, items in by_group.items():
        items.sort(key=lambda item: item[1].offset)
        sizes, end = [], 0
        for _, e in items:
            sizes += (e.offset - end, e.numel)
            end = e.offset + e.numel
        sizes.append(groups[name].numel() - end)
        pieces = groups[name].split(sizes)
        for i, (key, e) in enumerate(items):
            out[key] = pieces[2 * i + 1].view(e.shape)
    return out


# PEFT ---------------------------------------------------------------------------------------------


def packed_to_peft_folder(
    packed: PackedAdapter, directory: Path | str, base_model_name: str, model_type: str | None = None
) -> None:
    """Export for Hugging Face PEFT (`PeftModel.from_pretrained`); optimizer state is not exported."""
    from mintd.store.peft import save_peft_folder  # PEFT pulls in transformers: only when converting

    refuse_peft(packed.header)
    save_peft_folder(directory, packed.header.spec, packed.tensors, base_model_name, model_type)


def peft_folder_to_packed(directory: Path | str, fingerprint: str) -> bytes:
    """Import a PEFT LoRA folder trained on the base model with `fingerprint`; PEFT folders do not
    record a fingerprint, so the caller vouches for it and the engine checks the shapes on load."""
    from mintd.store.peft import load_peft_folder

    spec, tensors = load_peft_folder(directory)
    return pack(spec, tensors, fingerprint)
