"""Tinker wire values (already decoded from JSON or protobuf into plain Python) to engine inputs.

JSON (0.22) and protobuf (0.38) bodies decode to the same dict shapes, so there is one path here.
Every error names the field it is about.
"""

from __future__ import annotations

from typing import Any

import torch

from mintd.engine.train import Datum

_DTYPES = {"int64": torch.int64, "float32": torch.float32}


def tensor(value: Any, field: str) -> torch.Tensor:
    """TensorData `{data, dtype, shape?, sparse_crow_indices?, sparse_col_indices?}` (or a bare list)."""
    if isinstance(value, list):
        try:
            return torch.tensor(value)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{field}: malformed tensor ({exc})") from None
    if not isinstance(value, dict) or "data" not in value:
        raise ValueError(f"{field}: expected TensorData with a 'data' list")
    dtype = _DTYPES.get(value.get("dtype", "float32"))
    if dtype is None:
        raise ValueError(f"{field}.dtype: must be int64 or float32")
    data = value["data"]
    data = data if isinstance(data, list) else [data]
    shape = value.get("shape")
    crow, col = value.get("sparse_crow_indices"), value.get("sparse_col_indices")
    try:
        if crow is not None or col is not None:
            if shape is None or len(shape) != 2 or crow is None or col is None:
                raise ValueError(f"{field}: sparse CSR needs a 2-D shape, crow and col indices")
            values = torch.tensor(data, dtype=dtype)
            # check_invariants: indices out of range must be an error here, not memory corruption later
            return torch.sparse_csr_tensor(
                torch.tensor(crow), torch.tensor(col), values, size=tuple(shape), check_invariants=True
            ).to_dense()
        t = torch.tensor(data, dtype=dtype)
        return t.reshape(shape) if shape is not None else t
    except (RuntimeError, TypeError, IndexError) as exc:
        raise ValueError(f"{field}: malformed tensor ({exc})") from None


def tokens(model_input: Any, field: str) -> list[int]:
    """ModelInput `{chunks: [...]}` to token ids; only text chunks reach a text-only base model."""
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise ValueError(f"{field}: expected a ModelInput with a 'chunks' list")
    out: list[int] = []
    for i, chunk in enumerate(model_input["chunks"]):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise ValueError(
                f"{field}.chunks[{i}]: {kind!r} chunks are not supported by this text-only base model"
            )
        ids = chunk.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{field}.chunks[{i}].tokens: expected a list of integers")
        out.extend(ids)
    return out


def datum(value: Any, index: int) -> Datum:
    field = f"data[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected a Datum object")
    ids = tokens(value.get("model_input"), f"{field}.model_input")
    raw_inputs = value.get("loss_fn_inputs") or {}
    if not isinstance(raw_inputs, dict):
        raise ValueError(f"{field}.loss_fn_inputs: expected an object")
    inputs = {}
    for name, raw in raw_inputs.items():
        t = tensor(raw, f"{field}.loss_fn_inputs.{name}")
        inputs[name] = t.long() if name == "target_tokens" else t.float()
    return Datum(torch.tensor(ids, dtype=torch.long), inputs)
