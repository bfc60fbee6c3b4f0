"""The few protobuf messages of the Tinker API (package `tinker_public`), by hand.

Why by hand: the server needs exactly one request (`ForwardBackwardRequest`, which tinker 0.38 always
sends as protobuf) and two responses (`ForwardBackwardOutput`, `SampleResponse`, which 0.38 accepts
only as protobuf). Carrying the `protobuf` runtime plus generated code for that is more weight and
version pinning than a ~300-line codec of the wire format.

The decoded request has the same shape as the JSON body tinker 0.22 sends, so the server has one
code path for both: chunks as `{"type": "encoded_text", "tokens": [...]}` / `{"type": "image",
"data": <base64>, "format": ...}`, tensors as `{"data": [flat row-major], "dtype": "int64" |
"float32", "shape": [...]}` (always dense, always with a shape).

Wire format recap (what the code below relies on): a message is a sequence of (tag, value) pairs,
tag = field_number << 3 | wire_type; wire types 0 varint, 1 fixed 8 bytes, 2 length-delimited,
5 fixed 4 bytes. proto3 scalars at their default value are simply absent; a map is a repeated
message {1 key, 2 value}; a repeated number may come packed (one length-delimited blob) or not.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ProtoDecodeError",
    "decode_forward_backward_request",
    "encode_forward_backward_output",
    "encode_forward_backward_request",
    "encode_sample_response",
]

# DType enum of the schema. The SDK writes only FLOAT32 and INT64; INT32 and BFLOAT16 are widened on
# read, exactly like the SDK's own readers, so callers see only the two public dtypes.
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
_WIRE_NUMPY = {DTYPE_FLOAT32: "<f4", DTYPE_INT64: "<i8", DTYPE_INT32: "<i4", DTYPE_BFLOAT16: "<u2"}
_PUBLIC_DTYPE = {
    DTYPE_FLOAT32: "float32",
    DTYPE_INT64: "int64",
    DTYPE_INT32: "int64",
    DTYPE_BFLOAT16: "float32",
}
_DTYPE_ENUM = {"float32": DTYPE_FLOAT32, "int64": DTYPE_INT64}

STOP_REASONS = {"stop": 0, "length": 1}
# An empty slot in a top-k matrix; the SDK turns a row starting with it into None and trims it.
TOPK_EMPTY_TOKEN, TOPK_EMPTY_LOGPROB = 0, -99999.0

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1


class ProtoDecodeError(ValueError):
    """A malformed or unsupported protobuf body: the client's fault, so a 400 with this message."""


# ---------------------------------------------------------------------------------------------------
# writing


class Writer:
    """Appends fields to a message. Defaults are written too when asked: harmless, and explicit."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def _varint(self, value: int) -> None:
        value &= _MASK64  # negative ints are 10-byte two's complement varints
        while value > 0x7F:
            self.buf.append(value & 0x7F | 0x80)
            value >>= 7
        self.buf.append(value)

    def _tag(self, field: int, wire_type: int) -> None:
        self._varint(field << 3 | wire_type)

    def varint(self, field: int, value: int) -> Writer:
        self._tag(field, _VARINT)
        self._varint(int(value))
        return self

    def double(self, field: int, value: float) -> Writer:
        self._tag(field, _I64)
        self.buf += struct.pack("<d", value)
        return self

    def blob(self, field: int, data: bytes | bytearray | memoryview) -> Writer:
        self._tag(field, _LEN)
        self._varint(len(data))
        self.buf += data
        return self

    def string(self, field: int, text: str) -> Writer:
        return self.blob(field, text.encode())

    def message(self, field: int, sub: Writer) -> Writer:
        return self.blob(field, sub.buf)

    def packed_varints(self, field: int, values: Sequence[int]) -> Writer:
        sub = Writer()
        for v in values:
            sub._varint(int(v))
        return self.blob(field, sub.buf)

    def getvalue(self) -> bytes:
        return bytes(self.buf)


# ---------------------------------------------------------------------------------------------------
# reading


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoDecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoDecodeError("varint longer than 10 bytes")


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yields (field number, wire type, value) for every field, unknown ones included, so the caller
    skips what it does not know by ignoring it. The value is an int for varints, a memoryview of the
    raw bytes for the other wire types (zero-copy: tensors are read straight out of the body)."""
    buf = memoryview(data)
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise ProtoDecodeError("field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type in (_I64, _I32, _LEN):
            if wire_type == _LEN:
                size, pos = _read_varint(buf, pos)
            else:
                size = 8 if wire_type == _I64 else 4
            if pos + size > len(buf):
                raise ProtoDecodeError(f"field {field}: truncated")
            value, pos = buf[pos : pos + size], pos + size
        else:  # 3/4 are the long-deprecated groups, 6/7 do not exist
            raise ProtoDecodeError(f"field {field}: unsupported wire type {wire_type}")
        yield field, wire_type, value


def _expect(field: int, wire_type: int, want: int) -> None:
    if wire_type != want:
        raise ProtoDecodeError(f"field {field}: wire type {wire_type}, expected {want}")


def _int(field: int, wire_type: int, value: Any) -> int:
    """A signed int32/int64 varint (negative ones arrive as 64-bit two's complement)."""
    _expect(field, wire_type, _VARINT)
    return value - (1 << 64) if value >> 63 else value


def _text(field: int, wire_type: int, value: Any) -> str:
    _expect(field, wire_type, _LEN)
    try:
        return bytes(value).decode()
    except UnicodeDecodeError as e:
        raise ProtoDecodeError(f"field {field}: invalid UTF-8") from e


def _double(field: int, wire_type: int, value: Any) -> float:
    _expect(field, wire_type, _I64)
    return struct.unpack("<d", value)[0]


def _ints(field: int, wire_type: int, value: Any) -> list[int]:
    """One element of a repeated int64, packed (proto3's default) or not."""
    if wire_type == _VARINT:
        return [_int(field, wire_type, value)]
    _expect(field, wire_type, _LEN)
    out, pos = [], 0
    while pos < len(value):
        v, pos = _read_varint(value, pos)
        out.append(v - (1 << 64) if v >> 63 else v)
    return out


def _map_entry(data: memoryview) -> tuple[str, int, Any]:
    """A map entry {1 key string, 2 value}: key, value's wire type, raw value (None if absent)."""
    key, wire_type, value = "", _LEN, None
    for f, wt, v in iter_fields(data):
        if f == 1:
            key = _text(f, wt, v)
        elif f == 2:
            wire_type, value = wt, v
    return key, wire_type, value


# ---------------------------------------------------------------------------------------------------
# ForwardBackwardRequest


def decode_forward_backward_request(body: bytes, max_elements: int) -> dict[str, Any]:
    """`ForwardBackwardRequest` bytes to the dict a 0.22 JSON body gives (flattened: the fields of
    `forward_backward_input` sit next to `model_id`/`seq_id`), plus `forward_only`. Token lists and
    tensor data stay numpy arrays; a tensor of more than `max_elements` is refused from its header,
    before anything is allocated.

    `loss_fn_config` merges the legacy numeric map (5) and v2 (7, numbers and text), v2 winning as
    the SDK asks; it is None when neither is sent, like an omitted JSON key. Provenance spans become
    each datum's `model_input_spans` / `loss_fn_input_spans` (present only when sent); unknown fields
    are skipped."""
    out: dict[str, Any] = {"model_id": "", "seq_id": 0, "data": [], "loss_fn": "", "forward_only": False}
    config_v1: dict[str, float] = {}
    config_v2: dict[str, float | str] = {}
    for f, wt, v in iter_fields(body):
        if f == 1:
            out["model_id"] = _text(f, wt, v)
        elif f == 2:
            out["seq_id"] = _int(f, wt, v)
        elif f == 3:
            _expect(f, wt, _LEN)
            try:
                out["data"].append(_decode_datum(v, max_elements))
            except ProtoDecodeError as e:
                raise ProtoDecodeError(f"data[{len(out['data'])}].{e}") from None
        elif f == 4:
            out["loss_fn"] = _text(f, wt, v)
        elif f == 5:
            _expect(f, wt, _LEN)
            key, vwt, value = _map_entry(v)
            config_v1[key] = 0.0 if value is None else _double(f, vwt, value)
        elif f == 6:
            _expect(f, wt, _VARINT)
            out["forward_only"] = bool(v)
        elif f == 7:
            _expect(f, wt, _LEN)
            key, vwt, value = _map_entry(v)
            if value is not None:
                _expect(f, vwt, _LEN)
                for cf, cwt, cv in iter_fields(value):  # LossConfigValue: oneof {1 number, 2 text}
                    if cf == 1:
                        config_v2[key] = _double(cf, cwt, cv)
                    elif cf == 2:
                        config_v2[key] = _text(cf, cwt, cv)
    out["loss_fn_config"] = {**config_v1, **config_v2} if config_v1 or config_v2 else None
    return out


def run_and_seq(body: bytes) -> tuple[str, int] | None:
    """`(model_id, seq_id)` of a ForwardBackwardRequest that failed to decode, when those two fields
    are readable, so that its refusal can still take the run's seq_id (the run must not stall)."""
    model_id, seq_id = None, None
    try:
        for f, wt, v in iter_fields(body):
            if f == 1:
                model_id = _text(f, wt, v)
            elif f == 2:
                seq_id = _int(f, wt, v)
    except ProtoDecodeError:
        pass
    return None if model_id is None or seq_id is None else (model_id, seq_id)


def _decode_datum(data: memoryview, max_elements: int) -> dict[str, Any]:
    chunks: list[dict[str, Any]] = []
    inputs: dict[str, dict[str, Any]] = {}
    spans: dict[str, list[dict[str, Any]]] = {}
    for f, wt, v in iter_fields(data):
        if f == 1:
            _expect(f, wt, _LEN)
            chunks.append(_decode_chunk(v))
        elif f == 2:
            _expect(f, wt, _LEN)
            key, vwt, value = _map_entry(v)
            _expect(f, vwt, _LEN)
            try:
                inputs[key] = _decode_tensor(value if value is not None else memoryview(b""), max_elements)
            except ProtoDecodeError as e:
                raise ProtoDecodeError(f"loss_fn_inputs[{key!r}]: {e}") from None
        elif f in (3, 4):
            _expect(f, wt, _LEN)
            spans.setdefault(_SPAN_FIELDS[f], []).append(_decode_span(v))
    return {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs, **spans}


_SPAN_FIELDS = {3: "model_input_spans", 4: "loss_fn_input_spans"}
_SPAN_KINDS = {1: "prompt_tokens", 2: "sampled_tokens"}


def _decode_span(data: memoryview) -> dict[str, Any]:
    """ProvenanceSpan {oneof 1 prompt_tokens, 2 sampled_tokens} of {1 sequence_id, 2 offset, 3 length}
    to `{kind: {sequence_id, offset, length}}`; proto3 leaves zeros off the wire, so absent means 0."""
    out: dict[str, Any] = {}
    for f, wt, v in iter_fields(data):
        if f in _SPAN_KINDS:
            _expect(f, wt, _LEN)
            run: dict[str, Any] = {"sequence_id": "", "offset": 0, "length": 0}
            for rf, rwt, rv in iter_fields(v):
                if rf == 1:
                    run["sequence_id"] = _text(rf, rwt, rv)
                elif rf in (2, 3):
                    run["offset" if rf == 2 else "length"] = _int(rf, rwt, rv)
            out = {_SPAN_KINDS[f]: run}
    return out


def _b64(data: memoryview) -> str:
    return base64.b64encode(data).decode()


def _decode_chunk(data: memoryview) -> dict[str, Any]:
    chunk: dict[str, Any] | None = None
    for f, wt, v in iter_fields(data):  # a oneof: the last arm on the wire wins
        if f not in (1, 2, 3):
            continue
        _expect(f, wt, _LEN)
        if f == 1:
            tokens = b""
            for tf, twt, tv in iter_fields(v):
                if tf == 1:
                    _expect(tf, twt, _LEN)
                    tokens = tv
            if len(tokens) % 4:
                raise ProtoDecodeError("encoded_text.tokens: length is not a multiple of 4 (int32)")
            chunk = {"type": "encoded_text", "tokens": np.frombuffer(tokens, "<i4").astype(np.int64)}
        elif f == 2:
            chunk = {"type": "image", "data": "", "format": ""}
            for tf, twt, tv in iter_fields(v):
                if tf == 1:
                    _expect(tf, twt, _LEN)
                    chunk["data"] = _b64(tv)
                elif tf == 2:
                    chunk["format"] = _text(tf, twt, tv)
                elif tf == 3:
                    chunk["expected_tokens"] = _int(tf, twt, tv)
                elif tf == 4:
                    _expect(tf, twt, _LEN)
                    dims = {"width": 0, "height": 0}
                    for df, dwt, dv in iter_fields(tv):
                        if df in (1, 2):
                            dims["width" if df == 1 else "height"] = _int(df, dwt, dv)
                    chunk["override_dimensions"] = dims
        else:
            chunk = {"type": "dmel", "dmel": ""}
            for tf, twt, tv in iter_fields(v):
                if tf == 1:
                    _expect(tf, twt, _LEN)
                    chunk["dmel"] = _b64(tv)
    if chunk is None:
        raise ProtoDecodeError("model_input chunk of no known kind (encoded_text, image, dmel)")
    return chunk


def _wire_array(data: memoryview | bytes, dtype: int, what: str) -> np.ndarray:
    """Little-endian bytes in a wire dtype to a native array of the public dtype (int64/float32)."""
    if dtype not in _WIRE_NUMPY:
        raise ProtoDecodeError(f"{what}: unsupported dtype enum {dtype}")
    wire = np.dtype(_WIRE_NUMPY[dtype])
    if len(data) % wire.itemsize:
        raise ProtoDecodeError(f"{what}: {len(data)} bytes is not a whole number of {wire.name}")
    arr = np.frombuffer(data, wire)
    if dtype == DTYPE_BFLOAT16:  # bf16 is the top half of a float32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.int64 if _PUBLIC_DTYPE[dtype] == "int64" else np.float32)


def _decode_tensor(data: memoryview, max_elements: int) -> dict[str, Any]:
    """Tensor {oneof {1 dense bytes, 2 SparseCsr}, 3 dtype, 4 shape} to a dense JSON-shaped dict
    (with a numpy array as `data`). CSR tensors are expanded with 0 in unlisted cells, the pad the SDK
    uses when it sparsifies `target_tokens`/`weights`."""
    dense: memoryview | None = None
    csr: dict[int, memoryview] | None = None
    dtype, shape = 0, []
    for f, wt, v in iter_fields(data):
        if f == 1:
            _expect(f, wt, _LEN)
            dense, csr = v, None
        elif f == 2:
            _expect(f, wt, _LEN)
            dense, csr = None, {}
            for cf, cwt, cv in iter_fields(v):
                if cf in (1, 2, 3):
                    _expect(cf, cwt, _LEN)
                    csr[cf] = cv
        elif f == 3:
            dtype = _int(f, wt, v)
        elif f == 4:
            shape += _ints(f, wt, v)
    if any(d < 0 for d in shape):
        raise ProtoDecodeError(f"negative dimension in shape {shape}")
    if any(d > max_elements for d in shape) or math.prod(shape) > max_elements:
        raise ProtoDecodeError(f"shape {shape} holds more than the {max_elements} elements allowed")
    if csr is None:
        arr = _wire_array(dense if dense is not None else b"", dtype, "dense")
        if not shape:
            shape = [arr.size]  # no shape: 1-D, as in JSON
        elif math.prod(shape) != arr.size:
            raise ProtoDecodeError(f"shape {shape} does not hold {arr.size} elements")
    else:
        if len(shape) != 2:
            raise ProtoDecodeError(f"sparse_csr needs a 2-D shape, got {shape}")
        values = _wire_array(csr.get(1, b""), dtype, "sparse_csr.values")
        crow = _wire_array(csr.get(2, b""), DTYPE_INT64, "sparse_csr.crow_indices")
        col = _wire_array(csr.get(3, b""), DTYPE_INT64, "sparse_csr.col_indices")
        rows, cols = shape
        if (
            len(crow) != rows + 1
            or crow[0] != 0
            or np.any(np.diff(crow) < 0)
            or crow[-1] != len(values)
            or len(col) != len(values)
            or (len(col) and (col.min() < 0 or col.max() >= cols))
        ):
            raise ProtoDecodeError(f"sparse_csr: indices do not describe a {rows}x{cols} CSR tensor")
        arr = np.zeros((rows, cols), values.dtype)
        arr[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return {"data": arr.ravel(), "dtype": _PUBLIC_DTYPE[dtype], "shape": shape}


def encode_forward_backward_request(
    model_id: str,
    seq_id: int,
    data: Sequence[Mapping[str, Any]],
    loss_fn: str,
    loss_fn_config: Mapping[str, float | str] | None = None,
    forward_only: bool = False,
) -> bytes:
    """The inverse of `decode_forward_backward_request`, as the SDK writes it (dense tensors, config
    numbers in both maps, text only in v2). For tests and tools that post protobuf bodies without
    the SDK."""
    w = Writer().string(1, model_id).varint(2, seq_id)
    for datum in data:
        d = Writer()
        for chunk in datum["model_input"]["chunks"]:
            c, kind = Writer(), chunk.get("type", "encoded_text")
            if kind == "encoded_text":
                d.message(1, c.message(1, Writer().blob(1, np.asarray(chunk["tokens"], "<i4").tobytes())))
            elif kind == "image":
                img = Writer().blob(1, base64.b64decode(chunk["data"])).string(2, chunk["format"])
                if chunk.get("expected_tokens") is not None:
                    img.varint(3, chunk["expected_tokens"])
                d.message(1, c.message(2, img))
            elif kind == "dmel":
                d.message(1, c.message(3, Writer().blob(1, base64.b64decode(chunk["dmel"]))))
            else:
                raise ValueError(f"chunk type {kind!r} cannot be sent as protobuf")
        for name, tensor in datum.get("loss_fn_inputs", {}).items():
            arr = np.asarray(tensor["data"], "<i8" if tensor["dtype"] == "int64" else "<f4")
            t = Writer().blob(1, arr.tobytes()).varint(3, _DTYPE_ENUM[tensor["dtype"]])
            t.packed_varints(4, tensor.get("shape") or [arr.size])
            d.message(2, Writer().string(1, name).message(2, t))
        for field, name in _SPAN_FIELDS.items():
            for span in datum.get(name) or ():
                (kind, run), *_ = span.items()
                r = Writer().string(1, run["sequence_id"]).varint(2, run["offset"]).varint(3, run["length"])
                d.message(field, Writer().message(2 if kind == "sampled_tokens" else 1, r))
        w.message(3, d)
    w.string(4, loss_fn)
    for key, value in (loss_fn_config or {}).items():
        if isinstance(value, str):
            w.message(7, Writer().string(1, key).message(2, Writer().string(2, value)))
        else:
            w.message(5, Writer().string(1, key).double(2, float(value)))
            w.message(7, Writer().string(1, key).message(2, Writer().double(1, float(value))))
    if forward_only:
        w.varint(6, 1)
    return w.getvalue()


# ---------------------------------------------------------------------------------------------------
# ForwardBackwardOutput


def _output_array(value: Any) -> tuple[np.ndarray, int]:
    """A loss output to (little-endian array, dtype enum): floats as float32, ints/bools as int64,
    the two dtypes every SDK version reads."""
    arr = np.asarray(value)
    if arr.dtype.kind in "biu":
        return arr.astype("<i8"), DTYPE_INT64
    if arr.dtype.kind == "f":
        return arr.astype("<f4"), DTYPE_FLOAT32
    raise ValueError(f"loss output of dtype {arr.dtype} cannot be sent")


def encode_forward_backward_output(
    loss_fn_outputs: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, float],
    loss_fn_output_type: str = "ArrayRecord",
) -> bytes:
    """`ForwardBackwardOutput` bytes from one {name: array} dict per datum, in request order.

    Each ArrayRecord batches its datums field by field: one BatchedTensor holds the datums' flat
    arrays back to back plus byte offsets (num_datums + 1 of them, from 0), so lengths may differ per
    datum. The SDK rebuilds a datum's shape as [elements / prod(trailing_shape), *trailing_shape], so
    an array of shape [T, K] is sent with trailing_shape [K]. Runs of datums whose fields, dtypes and
    trailing shapes agree share one record; the usual case is a single record. Several records are
    read correctly only by 0.38: 0.22 takes dtype and trailing shape from the first record.

    Metric keys must be `name:reduction` (one colon): the SDK splits every key to combine chunks,
    and crashes on any other form, so that is refused here rather than on the client."""
    bad = [k for k in metrics if k.count(":") != 1]
    if bad:
        raise ValueError(f"metric keys must look like name:reduction, got {bad}")
    datums = [{name: _output_array(v) for name, v in out.items()} for out in loss_fn_outputs]
    names = set(datums[0]) if datums else set()
    if any(set(d) != names for d in datums):
        raise ValueError("every datum's loss outputs must have the same names (the SDK needs it)")

    def signature(datum: dict[str, tuple[np.ndarray, int]]) -> tuple:
        return tuple(sorted((n, dt, a.shape[1:]) for n, (a, dt) in datum.items()))

    w = Writer().string(1, loss_fn_output_type)
    start = 0
    while start < len(datums):
        end = start + 1
        while end < len(datums) and signature(datums[end]) == signature(datums[start]):
            end += 1
        record = Writer().string(1, loss_fn_output_type)
        for name in sorted(names):
            arrays = [datums[i][name][0] for i in range(start, end)]
            offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype="<i8")
            bt = Writer().blob(1, b"".join(a.tobytes() for a in arrays)).blob(2, offsets.tobytes())
            bt.varint(3, datums[start][name][1]).packed_varints(4, arrays[0].shape[1:])
            record.message(2, Writer().string(1, name).message(2, bt))
        record.varint(3, end - start)
        w.message(2, record)
        start = end
    for key, value in metrics.items():
        w.message(3, Writer().string(1, key).double(2, float(value)))
    return w.getvalue()


# ---------------------------------------------------------------------------------------------------
# SampleResponse


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or key: sample results may be dataclasses (the engine's) or plain dicts."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _topk_matrix(rows: Sequence[Sequence[tuple[int, float]] | None], k: int | None) -> Writer:
    """TopkLogprobs {1 token_ids int32 [length, k], 2 logprobs float32 [length, k], 3 k, 4 length},
    rows padded with the empty-slot sentinel; a None row is all sentinels (the SDK reads it back as
    None). With k 0 or no rows the SDK reads the whole matrix as None."""
    width = max((len(r) for r in rows if r), default=0) if k is None else k
    ids = np.full((len(rows), width), TOPK_EMPTY_TOKEN, "<i4")
    lps = np.full((len(rows), width), TOPK_EMPTY_LOGPROB, "<f4")
    for i, row in enumerate(rows):
        if row:
            if len(row) > width:
                raise ValueError(f"top-k row {i} has {len(row)} entries, more than k={width}")
            ids[i, : len(row)] = [t for t, _ in row]
            lps[i, : len(row)] = [lp for _, lp in row]
    return Writer().blob(1, ids.tobytes()).blob(2, lps.tobytes()).varint(3, width).varint(4, len(rows))


def encode_sample_response(
    result: Any, *, topk_k: int | None = None, prompt_cache_hit_tokens: int = 0
) -> bytes:
    """`SampleResponse` bytes from a sample result (attributes or keys): `sequences` (each with
    `tokens`, `logprobs` (None to omit), `stop_reason` "stop"|"length", optional `topk_logprobs`
    rows), `prompt_logprobs` (None entries, e.g. position 0, travel as NaN), `topk_prompt_logprobs`
    (rows of (token_id, logprob) or None). `topk_k`, the k the request asked for, fixes the matrix
    width; by default it is the longest row."""
    w = Writer()
    for seq in _get(result, "sequences", []):
        stop_reason = _get(seq, "stop_reason")
        if stop_reason not in STOP_REASONS:
            raise ValueError(f"stop_reason must be 'stop' or 'length', got {stop_reason!r}")
        s = Writer().varint(1, STOP_REASONS[stop_reason])
        s.blob(2, np.asarray(_get(seq, "tokens"), "<i4").tobytes())
        if (logprobs := _get(seq, "logprobs")) is not None:
            s.blob(3, np.asarray(logprobs, "<f4").tobytes())
        if (topk := _get(seq, "topk_logprobs")) is not None:
            s.message(4, _topk_matrix(topk, topk_k))
        w.message(1, s)
    if (prompt_logprobs := _get(result, "prompt_logprobs")) is not None:
        values = [math.nan if lp is None else lp for lp in prompt_logprobs]
        w.blob(2, np.asarray(values, "<f4").tobytes())
    if (topk_prompt := _get(result, "topk_prompt_logprobs")) is not None:
        w.message(3, _topk_matrix(topk_prompt, topk_k))
    if prompt_cache_hit_tokens:
        w.varint(4, prompt_cache_hit_tokens)
    return w.getvalue()
