"""mintd.api.proto against the SDKs' own protobuf code: the SDK encodes what we decode, and the SDK
decodes what we encode (through the same functions its futures use). Our codec is never its own
judge, except in the small malformed-input checks at the end."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import pytest

from mintd.api import proto
from mintd.engine.sampling import SampledSequence, SampleResult
from tests.sdk import run_sdk_json

# --------------------------------------------------------------------------------------------------
# requests: the SDK encodes, we decode

# Runs in an SDK venv: `encode` serializes a request the way TrainingClient does (0.38 sets
# forward_only on the message for forward()), `expected` is what the server must decode, computed
# from the SDK's own objects (sparse tensors densified by TensorData.to_numpy, i.e. by the SDK).
SDK_REQUEST_HELPERS = r"""
import base64, json
import numpy as np
import torch
import tinker
from tinker import types as T
from tinker.proto.request_conv import forward_backward_request_to_proto
V038 = hasattr(T, "DmelChunk")

def case(model_id, seq_id, data, loss_fn, config=None, forward_only=False):
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    if forward_only:
        msg.forward_only = True
    datums = []
    for d in data:
        inputs = {}
        for name, td in d.loss_fn_inputs.items():
            arr = td.to_numpy()
            inputs[name] = {"data": arr.ravel().tolist(), "dtype": td.dtype, "shape": list(arr.shape)}
        chunks = [c.model_dump(mode="json", exclude_none=True) for c in d.model_input.chunks]
        datum = {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs}
        for name in ("model_input_spans", "loss_fn_input_spans"):
            if getattr(d, name, None):
                datum[name] = [
                    {"sampled_tokens" if isinstance(sp, T.SampledProvenanceSpan) else "prompt_tokens":
                     {"sequence_id": sp.sequence_id, "offset": sp.offset, "length": sp.length}}
                    for sp in getattr(d, name)
                ]
        datums.append(datum)
    expected = {
        "model_id": model_id, "seq_id": seq_id, "data": datums, "loss_fn": loss_fn,
        "loss_fn_config": dict(config) if config else None, "forward_only": forward_only,
    }
    return {"b64": base64.b64encode(msg.SerializeToString()).decode(), "expected": expected}
"""

SDK_FIXED_REQUESTS = r"""
text = T.EncodedTextChunk
image = T.ImageChunk(data=bytes(range(256)) * 3, format="png", expected_tokens=4)
d1 = T.Datum(
    model_input=T.ModelInput(chunks=[text(tokens=[1, 2, 151643, 2**31 - 1]), image, text(tokens=[0])]),
    loss_fn_inputs={
        "target_tokens": T.TensorData(data=[2, 151643, 7, 8, 9, 10, 11, 12, 13], dtype="int64"),
        "weights": T.TensorData(data=[0, 0, 0, 0, 1, 1, 0.5, 0.25, 1], dtype="float32", shape=[9]),
        "advantages": np.array([-1.5, 0, 2.75, 3e-8, -1e6, 0, 1, 2, 3], dtype=np.float32),
    },
)
# 2-D [T, K] targets (distillation-style): dense int64 targets, explicit CSR weights, and a target
# the SDK sparsifies itself from a torch tensor (padding 0).
sparse_target = T.TensorData.from_torch_sparse(torch.tensor([[0, 0, 5, 0, 0], [0, 0, 0, 0, 0],
                                                             [9, 0, 0, 0, 0], [0, 0, 0, 0, 11]]))
assert sparse_target.sparse_crow_indices is not None, "expected the SDK to choose CSR"
d2 = T.Datum(
    model_input=T.ModelInput(chunks=[text(tokens=[3, 4, 5])]),
    loss_fn_inputs={
        "target_tokens": T.TensorData.from_numpy(np.array([[4, 40, 400, 4000], [5, 50, 500, 5000],
                                                          [6, 60, 600, 6000]], dtype=np.int64)),
        "weights": T.TensorData(data=[1.0, 0.5, 0.25], dtype="float32", shape=[3, 4],
                                sparse_crow_indices=[0, 1, 1, 3], sparse_col_indices=[2, 0, 3]),
    },
)
d3 = T.Datum(model_input=T.ModelInput(chunks=[text(tokens=[1, 2, 3, 4])]),
             loss_fn_inputs={"target_tokens": sparse_target})
cases = [
    case("model-1", 1, [d1, d2, d3], "cross_entropy"),
    case("model-2", 2**31 - 1, [d2], "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.25}),
    case("m", 3, [], "cross_entropy"),
]
if V038:  # 0.38-only wire features: forward_only, provenance spans, dmel chunks, text config
    spanned = T.Datum(
        model_input=T.ModelInput(chunks=[text(tokens=[1, 2]), T.DmelChunk(dmel=b"\x00\x01dmel")]),
        loss_fn_inputs={"target_tokens": T.TensorData(data=[2, 3], dtype="int64")},
        model_input_spans=[T.PromptProvenanceSpan(sequence_id="s1", offset=0, length=2),
                           T.SampledProvenanceSpan(sequence_id="s1:é", offset=0, length=0)],
        loss_fn_input_spans=[T.PromptProvenanceSpan(sequence_id="s1", offset=1, length=1),
                             T.SampledProvenanceSpan(sequence_id="s1", offset=3, length=2**40)],
    )
    cases.append(case("model-3", 5, [spanned, d1], "importance_sampling", {"mode": "token", "beta": 0.5},
                      forward_only=True))
print(json.dumps(cases))
"""

# Deterministic random requests, generated by the SDK side from a seed.
SDK_RANDOM_REQUESTS = r"""
rng = np.random.default_rng(20240517)
cases, n_sparse = [], 0
for n in range(30):
    data = []
    for _ in range(int(rng.integers(1, 5))):
        length = int(rng.integers(1, 40))
        tokens = rng.integers(0, 2**20, size=length).tolist()
        cut = sorted(rng.integers(0, length + 1, size=int(rng.integers(0, 3))).tolist())
        pieces = [tokens[a:b] for a, b in zip([0, *cut], [*cut, length])]
        chunks = [T.EncodedTextChunk(tokens=p) for p in pieces if p]
        if rng.random() < 0.5:  # 2-D targets [T, K], often sparse
            k = int(rng.integers(1, 6))
            target = rng.integers(0, 2**20, size=(length, k)) * (rng.random((length, k)) < 0.3)
            weights = (rng.random((length, k)) < 0.3) * rng.random((length, k))
            inputs = {"target_tokens": T.TensorData.from_torch_sparse(torch.from_numpy(target)),
                      "weights": T.TensorData.from_torch_sparse(torch.from_numpy(weights.astype(np.float32)))}
        else:
            inputs = {"target_tokens": T.TensorData(data=tokens[1:] + [0], dtype="int64"),
                      "weights": T.TensorData(data=rng.random(length).astype(np.float32), dtype="float32")}
            if rng.random() < 0.5:
                scale = 10.0 ** rng.integers(-6, 6)
                inputs["advantages"] = (rng.standard_normal(length) * scale).astype(np.float32)
            if rng.random() < 0.3:
                big = rng.integers(-2**62, 2**62, size=length)
                inputs["big_ints"] = T.TensorData(data=big, dtype="int64")
        data.append(T.Datum(model_input=T.ModelInput(chunks=chunks), loss_fn_inputs=inputs))
        n_sparse += sum(td.sparse_crow_indices is not None for td in data[-1].loss_fn_inputs.values())
    config = {f"k{i}": float(rng.standard_normal()) for i in range(int(rng.integers(0, 3)))} or None
    cases.append(case(f"model-{n}-é", int(rng.integers(1, 2**31)), data, "cross_entropy", config,
                      forward_only=V038 and bool(rng.random() < 0.5)))
assert n_sparse >= 10, f"only {n_sparse} CSR tensors: the random cases no longer exercise CSR"
print(json.dumps(cases))
"""


def _plain(value: Any) -> Any:
    """numpy arrays (what the decoder hands the service) as lists, to compare with JSON shapes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def decode(body: bytes, max_elements: int = 2**24) -> dict[str, Any]:
    return _plain(proto.decode_forward_backward_request(body, max_elements))


def _check_requests(cases: list[dict[str, Any]]) -> None:
    for i, c in enumerate(cases):
        got = decode(base64.b64decode(c["b64"]))
        assert got == c["expected"], f"case {i}"


@pytest.mark.parametrize("env", ["tinker-0.38", "tinker-0.22"])
def test_sdk_requests_decode(env: str) -> None:
    """Text and image chunks, 1-D and 2-D tensors, dense and CSR, loss configs, and (0.38) dmel,
    provenance spans and forward_only."""
    cases = run_sdk_json(env, SDK_REQUEST_HELPERS + SDK_FIXED_REQUESTS)
    assert len(cases) == (4 if env == "tinker-0.38" else 3)
    _check_requests(cases)
    decoded = decode(base64.b64decode(cases[0]["b64"]))
    weights = decoded["data"][1]["loss_fn_inputs"]["weights"]
    assert weights["shape"] == [3, 4]
    assert weights["data"] == [0, 0, 1.0, 0, 0, 0, 0, 0, 0.5, 0, 0, 0.25]


@pytest.mark.parametrize("env", ["tinker-0.38", "tinker-0.22"])
def test_sdk_random_requests_decode(env: str) -> None:
    _check_requests(run_sdk_json(env, SDK_REQUEST_HELPERS + SDK_RANDOM_REQUESTS))


def test_our_request_encoding_is_understood_by_the_sdk() -> None:
    """encode_forward_backward_request (for tests and tools) writes only fields the SDK's schema
    knows, with the right wire types: the SDK parses it, drops anything it did not recognise,
    re-serializes, and we must read back the very same request."""
    data = [
        {
            "model_input": {
                "chunks": [
                    {"type": "encoded_text", "tokens": [1, 2, 3]},
                    {"type": "image", "data": base64.b64encode(b"png!").decode(), "format": "png"},
                ]
            },
            "loss_fn_inputs": {
                "target_tokens": {"data": [2, 3, 4, 5, 6, 7], "dtype": "int64", "shape": [3, 2]},
                "weights": {"data": [1.0, 0.5, 0.0], "dtype": "float32", "shape": [3]},
            },
            "model_input_spans": [{"prompt_tokens": {"sequence_id": "a:1:0", "offset": 0, "length": 3}}],
            "loss_fn_input_spans": [
                {"prompt_tokens": {"sequence_id": "a:1:0", "offset": 1, "length": 2}},
                {"sampled_tokens": {"sequence_id": "a:1:0", "offset": 0, "length": 1}},
            ],
        }
    ]
    request = {
        "model_id": "m-1",
        "seq_id": 9,
        "data": data,
        "loss_fn": "ppo",
        "loss_fn_config": {"clip_low_threshold": 0.75, "mode": "seq"},
        "forward_only": True,
    }
    body = proto.encode_forward_backward_request(**request)
    script = f"""
import base64, json
from tinker.proto import tinker_public_pb2 as pb
msg = pb.ForwardBackwardRequest()
msg.ParseFromString(base64.b64decode({base64.b64encode(body).decode()!r}))
msg.DiscardUnknownFields()
print(json.dumps(base64.b64encode(msg.SerializeToString()).decode()))
"""
    reserialized = base64.b64decode(run_sdk_json("tinker-0.38", script))
    assert decode(reserialized) == request


# --------------------------------------------------------------------------------------------------
# responses: we encode, the SDK decodes

# Runs in an SDK venv: decodes each (kind, base64) case with the dispatcher the SDK's futures call on
# an application/x-protobuf payload, and reports what a user of the SDK would see.
SDK_DECODE_RESPONSES = r"""
import base64, json
from tinker.proto.response_conv import deserialize_proto_response
from tinker.types import ForwardBackwardOutput, SampleResponse
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results

def tensor(td):
    return {"data": td.data, "dtype": td.dtype, "shape": td.shape}

results = []
for kind, b64 in json.loads(CASES):
    raw = base64.b64decode(b64)
    try:
        if kind == "fwdbwd":
            out = deserialize_proto_response(raw, ForwardBackwardOutput)
            results.append({
                "type": out.loss_fn_output_type,
                "outputs": [{k: tensor(v) for k, v in o.items()} for o in out.loss_fn_outputs],
                "metrics": out.metrics,
                "combined_metrics": combine_fwd_bwd_output_results([out]).metrics,
            })
        else:
            r = deserialize_proto_response(raw, SampleResponse)
            results.append({
                "sequences": [
                    {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason,
                     "topk_logprobs": getattr(s, "topk_logprobs", "absent")}
                    for s in r.sequences
                ],
                "prompt_logprobs": r.prompt_logprobs,
                "topk_prompt_logprobs": r.topk_prompt_logprobs,
                "prompt_cache_hit_tokens": getattr(r, "prompt_cache_hit_tokens", "absent"),
            })
    except Exception as e:
        results.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(results))
"""


def _sdk_decode(env: str, cases: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    payload = json.dumps([(kind, base64.b64encode(body).decode()) for kind, body in cases])
    return run_sdk_json(env, f"CASES = {payload!r}\n" + SDK_DECODE_RESPONSES)


def _f32(x: float) -> float:
    return float(np.float32(x))


def _expected_fwdbwd(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> dict[str, Any]:
    def tensor(a: np.ndarray) -> dict[str, Any]:
        a = np.asarray(a)
        dtype = "int64" if a.dtype.kind in "biu" else "float32"
        data = a.astype(np.int64 if dtype == "int64" else np.float32).ravel().tolist()
        return {"data": data, "dtype": dtype, "shape": list(a.shape) if a.ndim else [1]}

    return {
        "type": "ArrayRecord",
        "outputs": [{k: tensor(v) for k, v in o.items()} for o in outputs],
        "metrics": metrics,
        "combined_metrics": metrics,
    }


def _expected_sample(result: Any, cache_hits: int, v038: bool) -> dict[str, Any]:
    def rows(topk: list | None) -> list | None:
        if topk is None:
            return None
        return [None if not row else [[t, _f32(lp)] for t, lp in row] for row in topk]

    def get(obj: Any, name: str) -> Any:
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    prompt = get(result, "prompt_logprobs")
    return {
        "sequences": [
            {
                "tokens": list(get(s, "tokens")),
                "logprobs": [_f32(x) for x in get(s, "logprobs")] if get(s, "logprobs") else None,
                "stop_reason": get(s, "stop_reason"),
                "topk_logprobs": rows(get(s, "topk_logprobs")) if v038 else "absent",
            }
            for s in get(result, "sequences")
        ],
        "prompt_logprobs": None if prompt is None else [None if x is None else _f32(x) for x in prompt],
        "topk_prompt_logprobs": rows(get(result, "topk_prompt_logprobs")),
        "prompt_cache_hit_tokens": cache_hits if v038 else "absent",
    }


FIXED_METRICS = {"loss:sum": 4.5, "lr:mean": 1e-4, "tokens:sum": 12.0}
FIXED_OUTPUTS: list[list[dict[str, np.ndarray]]] = [
    # ragged 1-D logprobs, including an empty datum, plus an int64 field
    [
        {"logprobs": np.array([-0.5, -1.25, -3.0]), "n": np.array([3])},
        {"logprobs": np.array([-0.125], dtype=np.float32), "n": np.array([1])},
        {"logprobs": np.zeros(0), "n": np.array([0])},
    ],
    # 2-D [T, K] logprobs with ragged T
    [
        {"logprobs": np.arange(6, dtype=np.float32).reshape(2, 3) - 10},
        {"logprobs": np.arange(15, dtype=np.float32).reshape(5, 3) / -4},
    ],
    # no fields at all: num_datums alone says how many datums there were
    [{}, {}, {}],
]
FIXED_SAMPLES: list[tuple[Any, dict[str, Any]]] = [
    (  # the engine's own result types, as the server hands them over
        SampleResult(
            sequences=[
                SampledSequence(tokens=[5, 6, 7], logprobs=[-0.5, -1.0, -0.25], stop_reason="stop"),
                SampledSequence(tokens=[2**31 - 1], logprobs=[-2.0], stop_reason="length"),
            ],
            prompt_logprobs=[None, -1.5, -0.75, -3.0],
            topk_prompt_logprobs=[None, [(3, -0.125), (4, -2.5)], [(7, -0.25)], [(1, -0.375), (0, -0.5)]],
        ),
        {"topk_k": 2, "prompt_cache_hit_tokens": 7},
    ),
    (  # nothing prompt-side asked for
        SampleResult(sequences=[SampledSequence(tokens=[1, 2], logprobs=[-0.1, -0.2], stop_reason="stop")]),
        {},
    ),
    (  # a 1-token prompt: every row is None, yet k keeps the matrix alive
        SampleResult(sequences=[], prompt_logprobs=[None], topk_prompt_logprobs=[None]),
        {"topk_k": 3},
    ),
    (  # plain dicts work too, and 0.38 reads top-k logprobs of sampled tokens
        {
            "sequences": [
                {
                    "tokens": [8, 9],
                    "logprobs": [-0.5, -0.75],
                    "stop_reason": "length",
                    "topk_logprobs": [[(8, -0.5), (1, -2.0)], [(9, -0.75)]],
                }
            ],
        },
        {},
    ),
]


@pytest.mark.parametrize("env", ["tinker-0.38", "tinker-0.22", "mint-0.2"])
def test_responses_decode_in_sdk(env: str) -> None:
    """Our ForwardBackwardOutput and SampleResponse bytes, read by the SDK as its futures do."""
    cases = [("fwdbwd", proto.encode_forward_backward_output(o, FIXED_METRICS)) for o in FIXED_OUTPUTS]
    cases += [("sample", proto.encode_sample_response(r, **kw)) for r, kw in FIXED_SAMPLES]
    # No datums at all. (Only `:sum`-like metrics here: the SDK's chunk combiner weights `:mean`
    # by datum count and raises ZeroDivisionError on a chunk of 0 datums.)
    cases.append(("fwdbwd", proto.encode_forward_backward_output([], {"loss:sum": 0.0})))
    got = _sdk_decode(env, cases)
    v038 = env == "tinker-0.38"
    for i, outputs in enumerate(FIXED_OUTPUTS):
        assert got[i] == _expected_fwdbwd(outputs, FIXED_METRICS), f"fwdbwd case {i}"
    assert got[-1] == _expected_fwdbwd([], {"loss:sum": 0.0})
    for j, (result, kw) in enumerate(FIXED_SAMPLES):
        want = _expected_sample(result, kw.get("prompt_cache_hit_tokens", 0), v038)
        assert got[len(FIXED_OUTPUTS) + j] == want, f"sample case {j}"
    # spelled out, the facts the cookbook leans on
    sample = got[len(FIXED_OUTPUTS)]
    assert sample["prompt_logprobs"][0] is None
    assert sample["topk_prompt_logprobs"][0] is None and sample["topk_prompt_logprobs"][2] == [[7, -0.25]]
    assert got[1]["outputs"][1]["logprobs"]["shape"] == [5, 3]
    assert got[len(FIXED_OUTPUTS) + 2]["topk_prompt_logprobs"] == [None]


def test_ragged_trailing_shapes_need_0_38() -> None:
    """Datums whose trailing shapes differ go out as several ArrayRecords. 0.38 reads those; 0.22
    takes dtype and trailing shape from the first record only and fails, so a server must answer a
    0.22 client with JSON (or uniform shapes) in that case."""
    outputs = [
        {"logprobs": np.ones((2, 3), np.float32)},
        {"logprobs": np.full((4, 2), -1.0, np.float32)},
        {"logprobs": np.full((1, 2), -2.0, np.float32)},
    ]
    body = proto.encode_forward_backward_output(outputs, {"loss:sum": 1.0})
    assert _sdk_decode("tinker-0.38", [("fwdbwd", body)])[0] == _expected_fwdbwd(outputs, {"loss:sum": 1.0})
    assert "error" in _sdk_decode("tinker-0.22", [("fwdbwd", body)])[0]


def _random_cases(seed: int) -> tuple[list[tuple[str, bytes]], list[Any]]:
    """Random ragged outputs and sample results, each with what the SDK should show for it (0.38)."""
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, bytes]] = []
    sources: list[Any] = []
    for _ in range(15):
        k = int(rng.integers(1, 5))
        two_d = bool(rng.random() < 0.5)
        outputs = []
        for _ in range(int(rng.integers(1, 8))):
            t = int(rng.integers(0, 30))
            shape = (t, k) if two_d else (t,)
            outputs.append(
                {
                    "logprobs": -rng.exponential(3.0, size=shape).astype(np.float32),
                    "elementwise_loss": rng.standard_normal(shape),
                }
            )
        metrics = {"loss:sum": float(rng.standard_normal()), "ratio:mean": float(rng.random())}
        cases.append(("fwdbwd", proto.encode_forward_backward_output(outputs, metrics)))
        sources.append((outputs, metrics))
    for _ in range(15):
        k = int(rng.integers(1, 6))

        def topk_rows(n: int, k: int = k) -> list:
            rows: list = []
            for _ in range(n):
                width = int(rng.integers(0, k + 1))
                ids = rng.integers(1, 2**17, size=width).tolist()
                rows.append([(t, float(-rng.exponential())) for t in ids] or None)
            return rows

        sequences = []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(1, 20))
            sequences.append(
                {
                    "tokens": rng.integers(0, 2**17, size=n).tolist(),
                    "logprobs": (-rng.exponential(2.0, size=n)).tolist(),
                    "stop_reason": "stop" if rng.random() < 0.5 else "length",
                    "topk_logprobs": topk_rows(n) if rng.random() < 0.5 else None,
                }
            )
        plen = int(rng.integers(1, 25))
        result = {
            "sequences": sequences,
            "prompt_logprobs": [None] + (-rng.exponential(2.0, size=plen - 1)).tolist(),
            "topk_prompt_logprobs": [None, *topk_rows(plen - 1)] if rng.random() < 0.7 else None,
        }
        hits = int(rng.integers(0, 100))
        cases.append(("sample", proto.encode_sample_response(result, topk_k=k, prompt_cache_hit_tokens=hits)))
        sources.append((result, hits))
    return cases, sources


@pytest.mark.parametrize("env", ["tinker-0.38", "tinker-0.22"])
def test_random_responses_decode_in_sdk(env: str) -> None:
    cases, sources = _random_cases(seed=7)
    got = _sdk_decode(env, cases)
    for i, ((kind, _), source, result) in enumerate(zip(cases, sources, got, strict=True)):
        if kind == "fwdbwd":
            expected = _expected_fwdbwd(*source)
            # the SDK averages/sums one chunk in float64: equal up to rounding
            assert result.pop("combined_metrics") == pytest.approx(expected.pop("combined_metrics"))
        else:
            expected = _expected_sample(source[0], source[1], env == "tinker-0.38")
        assert result == expected, f"case {i} ({kind})"


# --------------------------------------------------------------------------------------------------
# decoder robustness (no SDK needed: these bytes are ours on purpose)


def _w() -> proto.Writer:
    return proto.Writer()


def _with_unknowns(w: proto.Writer) -> proto.Writer:
    """Appends one unknown field of each wire type: varint, fixed64, length-delimited, fixed32."""
    w.varint(1000, 2**63 + 5).double(1001, 1.5).blob(1002, b"\xff" * 300)
    w.buf += b"\xed\x3e" + b"\x01\x02\x03\x04"  # field 1005, wire type 5
    return w


def test_unknown_fields_of_every_wire_type_are_skipped_at_every_level() -> None:
    u = _with_unknowns
    tensor = u(_w().blob(1, np.array([1.0, 2.0], "<f4").tobytes())).varint(3, proto.DTYPE_FLOAT32)
    tensor.blob(4, b"\x02")  # packed shape [2]
    chunk = u(_w()).message(1, u(_w().blob(1, np.array([7, 8], "<i4").tobytes())))
    datum = u(_w().message(1, chunk)).message(2, u(_w().string(1, "weights")).message(2, tensor))
    span = u(_w()).message(1, u(_w().string(1, "seq").varint(3, 2)))  # a provenance span
    datum.message(3, span)
    body = u(_w()).string(1, "m").varint(2, 4).message(3, datum).string(4, "cross_entropy")
    body.message(7, u(_w().string(1, "x")).message(2, u(_w().string(2, "y"))))
    assert decode(u(body).getvalue()) == {
        "model_id": "m",
        "seq_id": 4,
        "data": [
            {
                "model_input": {"chunks": [{"type": "encoded_text", "tokens": [7, 8]}]},
                "loss_fn_inputs": {"weights": {"data": [1.0, 2.0], "dtype": "float32", "shape": [2]}},
                "model_input_spans": [{"prompt_tokens": {"sequence_id": "seq", "offset": 0, "length": 2}}],
            }
        ],
        "loss_fn": "cross_entropy",
        "loss_fn_config": {"x": "y"},
        "forward_only": False,
    }


def test_narrow_dtypes_widen_and_unpacked_shapes_are_read() -> None:
    bf16 = np.array([1.5, -2.0, 0.0], np.float32).view(np.uint32) >> 16
    int32 = _w().blob(1, np.array([-1, 5], "<i4").tobytes()).varint(3, proto.DTYPE_INT32)
    bf = _w().blob(1, bf16.astype("<u2").tobytes()).varint(3, proto.DTYPE_BFLOAT16)
    bf.varint(4, 3)  # one unpacked shape element
    datum = (
        _w().message(2, _w().string(1, "a").message(2, int32)).message(2, _w().string(1, "b").message(2, bf))
    )
    inputs = decode(_w().message(3, datum).getvalue())["data"][0]["loss_fn_inputs"]
    assert inputs["a"] == {"data": [-1, 5], "dtype": "int64", "shape": [2]}
    assert inputs["b"] == {"data": [1.5, -2.0, 0.0], "dtype": "float32", "shape": [3]}


@pytest.mark.parametrize(
    "body",
    [
        b"\x0a\x05ab",  # truncated string
        b"\x08\xff\xff",  # truncated varint
        b"\x0b",  # wire type 3 (group)
        b"\x1a\x04\x0a\x02\x50\x01",  # a chunk of no kind
        _w()
        .message(3, _w().message(2, _w().string(1, "t").message(2, _w().blob(1, b"abc").varint(3, 1))))
        .getvalue(),  # 3 bytes of float32
        _w()
        .message(
            3,
            _w().message(
                2,
                _w()
                .string(1, "t")
                .message(
                    2,
                    _w()
                    .message(2, _w().blob(1, b"\0" * 4).blob(2, np.array([0, 2], "<i8").tobytes()))
                    .varint(3, 1)
                    .blob(4, b"\x01\x02"),
                ),
            ),
        )
        .getvalue(),  # CSR whose indices do not match its values
    ],
)
def test_malformed_bodies_raise_decode_errors(body: bytes) -> None:
    with pytest.raises(proto.ProtoDecodeError):
        decode(body)


def test_encoder_refuses_what_the_sdk_would_choke_on() -> None:
    with pytest.raises(ValueError, match="name:reduction"):
        proto.encode_forward_backward_output([], {"loss": 1.0})
    with pytest.raises(ValueError, match="same names"):
        proto.encode_forward_backward_output([{"logprobs": np.zeros(2)}, {}], {})
    with pytest.raises(ValueError, match="stop_reason"):
        proto.encode_sample_response(
            {"sequences": [{"tokens": [1], "logprobs": [0.0], "stop_reason": "eos"}]}
        )
    assert math.isnan(np.frombuffer(proto.encode_sample_response({"prompt_logprobs": [None]})[2:], "<f4")[0])
