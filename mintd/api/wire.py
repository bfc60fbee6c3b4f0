"""Tinker wire values (already decoded from JSON or protobuf into plain Python) to engine inputs.

JSON (0.22) and protobuf (0.38) bodies decode to the same dict shapes, so there is one path here; the
protobuf decoder hands over numpy arrays where JSON gives lists. This is the edge: everything a
request carries is checked here once, every error names the field it is about, and no tensor larger
than `max_elements` is ever allocated (sizes are checked from the shape). The service receives engine
data (`Datum`, `KLDatum`, token lists) and checks only what needs the model (vocabulary, length).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mintd.engine.distill import KLDatum
from mintd.engine.train import Datum
from mintd.service.provenance import DatumSpans, Span

_DTYPES = {"int64": torch.int64, "float32": torch.float32}
SPAN_KINDS = ("prompt_tokens", "sampled_tokens")


def _as_tensor(data: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(data))
        return t if dtype is None else t.to(dtype)
    return torch.tensor(data, dtype=dtype)


def _shape(value: Any, field: str, max_elements: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ValueError(f"{field}.shape: expected a list of integers")
    if any(d < 0 or d > max_elements for d in value) or math.prod(value) > max_elements:
        raise ValueError(f"{field}.shape: {value} is negative or holds more than {max_elements} elements")
    return tuple(value)


def tensor(value: Any, field: str, max_elements: int) -> torch.Tensor:
    """TensorData `{data, dtype, shape?, sparse_crow_indices?, sparse_col_indices?}` (or a bare list,
    whose values decide the dtype)."""
    if isinstance(value, (list, np.ndarray)):
        data, dtype, shape, crow, col = value, None, None, None, None
    else:
        if not isinstance(value, dict) or "data" not in value:
            raise ValueError(f"{field}: expected TensorData with a 'data' list")
        dtype = _DTYPES.get(value.get("dtype", "float32"))
        if dtype is None:
            raise ValueError(f"{field}.dtype: must be int64 or float32")
        data = value["data"] if isinstance(value["data"], (list, np.ndarray)) else [value["data"]]
        shape = None if value.get("shape") is None else _shape(value["shape"], field, max_elements)
        crow, col = value.get("sparse_crow_indices"), value.get("sparse_col_indices")
    if len(data) > max_elements:
        raise ValueError(f"{field}: {len(data)} values, more than the {max_elements} allowed")
    sparse = crow is not None or col is not None
    if sparse and (shape is None or len(shape) != 2 or crow is None or col is None):
        raise ValueError(f"{field}: sparse CSR needs a 2-D shape, crow and col indices")
    try:
        if sparse:
            values = _as_tensor(data, dtype)
            # check_invariants: indices out of range must be an error here, not memory corruption later
            return torch.sparse_csr_tensor(
                _as_tensor(crow), _as_tensor(col), values, size=shape, check_invariants=True
            ).to_dense()
        t = _as_tensor(data, dtype)
        return t.reshape(shape) if shape is not None else t
    except (RuntimeError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise ValueError(f"{field}: malformed tensor ({exc})") from None


def tokens(model_input: Any, field: str) -> np.ndarray:
    """ModelInput `{chunks: [...]}` to int64 token ids; only text chunks reach a text-only base model."""
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise ValueError(f"{field}: expected a ModelInput with a 'chunks' list")
    parts: list[np.ndarray] = []
    for i, chunk in enumerate(model_input["chunks"]):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise ValueError(
                f"{field}.chunks[{i}]: {kind!r} chunks are not supported by this text-only base model"
            )
        ids = chunk.get("tokens")
        if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            try:
                ids = np.array(ids, dtype=np.int64)
            except OverflowError:
                raise ValueError(f"{field}.chunks[{i}].tokens: token id out of range") from None
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            raise ValueError(f"{field}.chunks[{i}].tokens: expected a list of integers")
        parts.append(ids.astype(np.int64, copy=False).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def training_data(data: list[Any], max_elements: int) -> tuple[list[Datum], list[DatumSpans | None]]:
    """A forward(_backward) request's `data`: each datum and its provenance spans (tinker 0.38)."""
    datums: list[Datum] = []
    spans: list[DatumSpans | None] = []
    for i, raw in enumerate(data):
        datums.append(datum(raw, i, max_elements))
        spans.append(datum_provenance(raw, datums[-1], i))
    return datums, spans


def kl_data(data: list[Any], max_elements: int) -> list[KLDatum]:
    """MinT's `ReverseKLDatum`s {student_input, reference_input, target_tokens, weights}."""
    out = []
    for index, value in enumerate(data):
        where = f"data[{index}]"
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a ReverseKLDatum object")
        for name in ("target_tokens", "weights"):
            if value.get(name) is None:
                raise ValueError(f"{where}.{name}: missing")
        out.append(
            KLDatum(
                torch.from_numpy(tokens(value.get("student_input"), f"{where}.student_input")),
                torch.from_numpy(tokens(value.get("reference_input"), f"{where}.reference_input")),
                tensor(value["target_tokens"], f"{where}.target_tokens", max_elements).long().reshape(-1),
                tensor(value["weights"], f"{where}.weights", max_elements).float().reshape(-1),
            )
        )
    return out


def datum(value: Any, index: int, max_elements: int) -> Datum:
    field = f"data[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected a Datum object")
    ids = tokens(value.get("model_input"), f"{field}.model_input")
    if len(ids) > max_elements:
        raise ValueError(f"{field}.model_input: {len(ids)} tokens, more than the {max_elements} allowed")
    raw_inputs = value.get("loss_fn_inputs") or {}
    if not isinstance(raw_inputs, dict):
        raise ValueError(f"{field}.loss_fn_inputs: expected an object")
    inputs = {}
    for name, raw in raw_inputs.items():
        t = tensor(raw, f"{field}.loss_fn_inputs.{name}", max_elements)
        inputs[name] = t.long() if name == "target_tokens" else t.float()
    return Datum(torch.from_numpy(ids), inputs)


def parse_spans(value: Any, field: str) -> list[Span]:
    if not isinstance(value, list):
        raise ValueError(f"{field}: expected a list of provenance spans")
    spans = []
    for k, item in enumerate(value):
        where = f"{field}[{k}]"
        kinds = [kind for kind in SPAN_KINDS if isinstance(item, dict) and kind in item]
        if len(kinds) != 1:
            raise ValueError(f"{where}: expected one of {', '.join(SPAN_KINDS)}")
        run = item[kinds[0]]
        if not isinstance(run, dict):
            raise ValueError(f"{where}.{kinds[0]}: expected an object")
        sequence_id, offset, length = run.get("sequence_id"), run.get("offset", 0), run.get("length")
        if not isinstance(sequence_id, str) or not sequence_id:
            raise ValueError(f"{where}.sequence_id: must be a non-empty string")
        for name, n in (("offset", offset), ("length", length)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{where}.{name}: must be an integer >= 0")
        spans.append(Span(kinds[0] == "sampled_tokens", sequence_id, offset, length))
    return spans


def datum_provenance(raw: dict[str, Any], datum: Datum, index: int) -> DatumSpans | None:
    """A datum's spans, checked to come as a pair and to tile model_input and the loss rows."""
    where = f"data[{index}]"
    present = [name for name in ("model_input_spans", "loss_fn_input_spans") if raw.get(name) is not None]
    if not present:
        return None
    if len(present) == 1:
        raise ValueError(
            f"{where}: model_input_spans and loss_fn_input_spans come as a pair; only {present[0]}"
        )
    prov = DatumSpans(
        parse_spans(raw["model_input_spans"], f"{where}.model_input_spans"),
        parse_spans(raw["loss_fn_input_spans"], f"{where}.loss_fn_input_spans"),
    )
    target = datum.inputs.get("target_tokens")
    rows = len(datum.tokens) if target is None else int(target.shape[0])
    for name, spans, n, what in (
        ("model_input_spans", prov.model_input, len(datum.tokens), "model_input tokens"),
        ("loss_fn_input_spans", prov.loss, rows, "target_tokens rows"),
    ):
        covered = sum(s.length for s in spans)
        if covered != n:
            raise ValueError(f"{where}.{name}: spans cover {covered} positions but the datum has {n} {what}")
    return prov
