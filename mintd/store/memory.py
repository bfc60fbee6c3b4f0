"""A δ-mem instance's state as the bytes of a catalog `memory` revision.

Layout: the magic `MINTDMEM`, a little-endian u32 header length, a JSON header (format, the instance,
layers, rank, tokens written in all, session length), the state (`engine/delta_mem/state.state_bytes`: fp32
[layers, r, r]), then the session's token ids (int32 little-endian). The session is what the instance
has written since its conversation last started over (the prompt and the generated tokens but the last);
serving compares a resent chat against it to write each token once, and keeping it in the revision makes
that hold after a restart and after a rollback of `live` (the session rolls back with the state).
The header names the instance (`owner/adapter`) so that no two instances ever share a blob: erasing one
deletes its bytes even where another wrote the same tokens.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch

from mintd.engine.delta_mem.state import state_bytes, state_from_bytes

MAGIC = b"MINTDMEM"
FORMAT = 1


@dataclass(frozen=True)
class MemoryState:
    state: torch.Tensor  # [layers, r, r] fp32
    tokens_written: int  # every token written into the state since the instance began
    session: tuple[int, ...]  # the tokens written since the conversation last started over
    instance: str  # owner/adapter of the instance it belongs to

    @property
    def layers(self) -> int:
        return self.state.shape[0]

    @property
    def rank(self) -> int:
        return self.state.shape[1]


def pack_memory(memory: MemoryState) -> bytes:
    header = {
        "format": FORMAT,
        "instance": memory.instance,
        "layers": memory.layers,
        "rank": memory.rank,
        "tokens_written": memory.tokens_written,
        "session": len(memory.session),
    }
    head = json.dumps(header, sort_keys=True).encode()
    session = np.asarray(memory.session, dtype="<i4").tobytes()
    return MAGIC + struct.pack("<I", len(head)) + head + state_bytes(memory.state) + session


def read_memory(data: bytes) -> MemoryState:
    """The inverse of `pack_memory`; ValueError on bytes that are not one."""
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
        raise ValueError("memory state: not a mintd δ-mem state (bad magic)")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4 + size
    header = json.loads(data[len(MAGIC) + 4 : start])
    if header.get("format") != FORMAT:
        raise ValueError(f"memory state: format {header.get('format')!r}, this server reads {FORMAT}")
    layers, rank, count = header["layers"], header["rank"], header["session"]
    end = start + layers * rank * rank * 4
    if len(data) != end + 4 * count:
        raise ValueError(f"memory state: {len(data)} bytes, the header describes {end + 4 * count}")
    state = state_from_bytes(data[start:end], layers, rank)
    session = tuple(int(t) for t in np.frombuffer(data[end:], dtype="<i4"))
    return MemoryState(state, int(header["tokens_written"]), session, str(header["instance"]))
