"""The Tinker HTTP surface (/api/v1): validate, translate, call the service. No tensors here.

Status codes follow what the SDKs do with them: permanent problems are 400/404/410/422 (never 409,
402 or 5xx, which the SDK retries for minutes), and every error body is JSON with a `detail` message.
Ids, names and integers are bounded here (`Id`, `SeqId`), once, so nothing unbounded reaches the
service, the catalog or the file system.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from mintd.api import proto, wire
from mintd.api.auth import Authenticator
from mintd.api.errors import ERROR_RESPONSES
from mintd.catalog import validate as catalog_validate
from mintd.config import MAX_ID_CHARS, MAX_INT, MAX_TAGS, ServeSettings
from mintd.engine.distill import KLOutput
from mintd.engine.sampling import SampleResult, SamplingParams
from mintd.engine.train import TrainOutput
from mintd.lora_config import delta_mem_from_metadata
from mintd.service.futures import Future
from mintd.service.tinker import TinkerService

T = TypeVar("T")

router = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)
api_key = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="an API key, or the JWT it was exchanged for"
)

Id = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
SeqId = Annotated[int, Field(ge=0, le=MAX_INT)]
Metadata = dict[str, Any] | None


class Body(BaseModel):
    """Request bodies: unknown fields are ignored (every SDK release adds some)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @field_validator("user_metadata", check_fields=False)
    @classmethod
    def _bounded_metadata(cls, value: Metadata) -> Metadata:
        catalog_validate.json_object(value, "user_metadata", optional=True)
        return value


def service(request: Request) -> TinkerService:
    return request.app.state.service


def settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def owner(request: Request, x_api_key: str | None = Security(api_key)) -> str:
    auth: Authenticator = request.app.state.auth
    return auth.owner(x_api_key)


def _future(fut: Future, **extra: Any) -> dict[str, Any]:
    return {"request_id": fut.request_id, **extra}


# bootstrap, sessions, health -------------------------------------------------------------------


@router.post("/client/config")
def client_config(limits: ServeSettings = Depends(settings)) -> dict[str, Any]:
    # use_pyqwest_transport=False: the SDKs' pyqwest transport follows redirects even when a request
    # asks it not to, which breaks the archive download (a 302 the SDK must see); httpx's does not.
    # fwdbwd chunks: the SDK's estimate runs up to ~2x under real JSON size, so a quarter of the cap.
    return {
        "pjwt_auth_enabled": True,
        "sample_max_concurrent_requests": 256,
        "use_pyqwest_transport": False,
        "fwdbwd_max_chunk_bytes_count": min(5_000_000, limits.max_body_bytes // 4),
    }


@router.post("/client/dynamic_config")
def dynamic_config() -> dict[str, Any]:
    return {}


@router.post("/auth/token")
def auth_token(request: Request, x_api_key: str | None = Security(api_key)) -> dict[str, Any]:
    auth: Authenticator = request.app.state.auth
    return {"jwt": auth.issue(auth.owner_of_key(x_api_key))}


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
def capabilities(svc: TinkerService = Depends(service)) -> dict[str, Any]:
    return {"supported_models": svc.capabilities()}


@router.get("/residency")
def residency(_: str = Depends(owner), svc: TinkerService = Depends(service)) -> dict[str, Any]:
    """Per base model: the adapter byte budget and use, hits, misses, evictions, load times (aggregates
    only: which adapters are resident is not shown, since they belong to many owners)."""
    return {"models": svc.residency()}


@router.post("/telemetry")
def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


class CreateSession(Body):
    tags: Annotated[list[Id], Field(max_length=MAX_TAGS)] = []
    user_metadata: Metadata = None


@router.post("/create_session")
def create_session(body: CreateSession, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return {
        "type": "create_session",
        "session_id": svc.create_session(who, body.tags, body.user_metadata or {}),
    }


class SessionRef(Body):
    session_id: Id


@router.post("/session_heartbeat")
def heartbeat(body: SessionRef, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    svc.heartbeat(body.session_id, who)
    return {"type": "session_heartbeat"}


class FinishSession(Body):
    reason: dict[str, Any] | None = None


@router.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: Id, body: FinishSession, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    svc.finish_session(session_id, who, (body.reason or {}).get("type", "success"))
    return {}


@router.get("/sessions/{session_id}")
def get_session(session_id: Id, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return svc.session_view(who, session_id)


@router.get("/sessions")
def list_sessions(who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return {"sessions": svc.session_ids(who)}


# training ---------------------------------------------------------------------------------------


class CreateModel(Body):
    session_id: Id
    model_seq_id: SeqId
    base_model: Id
    lora_config: dict[str, Any] = {}
    user_metadata: Metadata = None


@router.post("/create_model")
def create_model(body: CreateModel, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    metadata = body.user_metadata or {}
    fut = svc.create_model(
        who,
        body.session_id,
        body.model_seq_id,
        body.base_model,
        body.lora_config,
        metadata,
        delta_mem_from_metadata(metadata),
    )
    return _future(fut, model_id=f"{body.session_id}:train:{body.model_seq_id}")


class ModelRef(Body):
    model_id: Id


@router.post("/get_info")
def get_info(body: ModelRef, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return svc.get_info(body.model_id, who)


@router.post("/unload_model")
def unload_model(body: ModelRef, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return _future(svc.unload_model(who, body.model_id), model_id=body.model_id)


class FwdBwdInput(Body):
    data: list[dict[str, Any]]
    loss_fn: Id = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None


class FwdBwdJson(Body):
    """The JSON body (tinker 0.22); tinker 0.38 sends the same fields as a protobuf
    `ForwardBackwardRequest` (Content-Type: application/x-protobuf)."""

    model_id: Id
    seq_id: SeqId
    forward_backward_input: FwdBwdInput | None = None
    forward_input: FwdBwdInput | None = None


# The training routes read their body by hand (two encodings), so its schema is declared here.
_FWD_BWD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/FwdBwdJson"}},
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def decode_or_refuse(
    svc: TinkerService, who: str, model_id: str, seq_id: int | None, decode: Callable[[], T]
) -> T:
    """`decode()` of a run op's data; when it fails, the op's seq_id is taken all the same (so the run
    goes on) and the error is raised for a 4xx."""
    try:
        return decode()
    except ValueError as exc:
        if seq_id is not None:
            svc.refuse(who, model_id, seq_id, exc)
        raise


def _fwd_bwd(fields: dict[str, Any], forward_only: bool, who: str, svc: TinkerService) -> dict[str, Any]:
    model_id, seq_id = fields["model_id"], fields["seq_id"]
    cap = svc.settings.max_tensor_elements
    datums, spans = decode_or_refuse(
        svc, who, model_id, seq_id, lambda: wire.training_data(fields["data"], cap)
    )
    fut = svc.forward_backward(
        who,
        model_id,
        seq_id,
        datums,
        spans,
        fields.get("loss_fn") or "cross_entropy",
        fields.get("loss_fn_config"),
        forward_only,
    )
    return _future(fut, model_id=model_id)


async def _fwd_bwd_fields(
    request: Request, key: str, who: str, svc: TinkerService
) -> tuple[dict[str, Any], bool]:
    """Both body encodings to one dict: 0.38 protobuf, or 0.22 JSON under `key`."""
    if "application/x-protobuf" in request.headers.get("content-type", ""):
        if request.headers.get("content-encoding", "identity") not in ("identity", ""):
            raise ValueError("content-encoding: compressed protobuf bodies are not enabled on this server")
        body = await request.body()
        try:
            fields = proto.decode_forward_backward_request(body, svc.settings.max_tensor_elements)
        except proto.ProtoDecodeError as exc:
            if (named := proto.run_and_seq(body)) is not None:
                svc.refuse(who, *named, exc)
            raise
        FwdBwdJson.model_validate({"model_id": fields["model_id"], "seq_id": fields["seq_id"]})
        return fields, bool(fields.get("forward_only"))
    try:
        payload_json = await request.json()
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError("body: not valid JSON") from None
    parsed = FwdBwdJson.model_validate(payload_json)
    payload = getattr(parsed, key) or parsed.forward_backward_input or parsed.forward_input
    if payload is None:
        raise ValueError(f"{key}: missing")
    fields = {"model_id": parsed.model_id, "seq_id": parsed.seq_id, **payload.model_dump()}
    return fields, key == "forward_input"


@router.post("/forward_backward", openapi_extra=_FWD_BWD_BODY)
async def forward_backward(
    request: Request, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    fields, forward_only = await _fwd_bwd_fields(request, "forward_backward_input", who, svc)
    return _fwd_bwd(fields, forward_only, who, svc)


@router.post("/forward", openapi_extra=_FWD_BWD_BODY)
async def forward(request: Request, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    fields, _ = await _fwd_bwd_fields(request, "forward_input", who, svc)
    return _fwd_bwd(fields, True, who, svc)


class OptimStep(Body):
    model_id: Id
    seq_id: SeqId
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None
    optim_params: dict[str, Any] | None = None


@router.post("/optim_step")
def optim_step(body: OptimStep, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    params = dict(body.adam_params or body.optimizer_params or body.optim_params or {})
    return _future(svc.optim_step(who, body.model_id, body.seq_id, params), model_id=body.model_id)


class SaveWeights(Body):
    model_id: Id
    seq_id: SeqId
    path: Id | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    sampling_session_seq_id: SeqId | None = None
    user_metadata: Metadata = None  # kept as the revision's metadata
    age_encryption_recipients: list[Id] | None = None  # save_weights_external only


def _checkpoint_name(body: SaveWeights) -> str:
    if body.path is None:
        raise ValueError("path: a checkpoint name is required")
    return body.path


@router.post("/save_weights")
def save_weights(body: SaveWeights, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    fut = svc.save_weights(
        who,
        body.model_id,
        body.seq_id,
        _checkpoint_name(body),
        body.ttl_seconds,
        body.overwrite,
        body.user_metadata,
    )
    return _future(fut, model_id=body.model_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: SaveWeights, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    fut = svc.save_weights_for_sampler(
        who,
        body.model_id,
        body.seq_id,
        body.path,
        body.ttl_seconds,
        body.sampling_session_seq_id,
        body.user_metadata,
    )
    return _future(fut, model_id=body.model_id)


@router.post("/save_weights_external")
def save_weights_external(
    body: SaveWeights, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    if body.age_encryption_recipients:
        raise ValueError("age_encryption_recipients: encrypted exports are not supported by this server")
    fut = svc.save_weights_external(who, body.model_id, body.seq_id, _checkpoint_name(body), body.ttl_seconds)
    return _future(fut, model_id=body.model_id)


class LoadWeights(Body):
    path: Id
    optimizer: bool = False
    model_id: Id | None = None
    seq_id: SeqId | None = None
    session_id: Id | None = None
    model_seq_id: SeqId | None = None
    user_metadata: Metadata = None


@router.post("/load_weights")
def load_weights(body: LoadWeights, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    if body.model_id is not None:
        if body.seq_id is None:
            raise ValueError("seq_id: required when loading into model_id")
        fut = svc.load_weights(who, body.model_id, body.seq_id, body.path, body.optimizer)
        return _future(fut, model_id=body.model_id)
    if body.session_id is None or body.model_seq_id is None:
        raise ValueError("load_weights: needs model_id + seq_id, or session_id + model_seq_id")
    fut = svc.create_model_from_state(
        who, body.session_id, body.model_seq_id, body.path, body.optimizer, body.user_metadata or {}
    )
    return _future(fut, model_id=f"{body.session_id}:train:{body.model_seq_id}")


class WeightsInfo(Body):
    tinker_path: Id


@router.post("/weights_info")
def weights_info(body: WeightsInfo, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return svc.weights_info(who, body.tinker_path)


# sampling ---------------------------------------------------------------------------------------


class CreateSamplingSession(Body):
    session_id: Id
    sampling_session_seq_id: SeqId
    base_model: Id | None = None
    model_path: Id | None = None


@router.post("/create_sampling_session")
def create_sampling_session(
    body: CreateSamplingSession, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    sampler_id = svc.create_sampling_session(
        who, body.session_id, body.sampling_session_seq_id, body.base_model, body.model_path
    )
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: Id, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return svc.get_sampler(who, sampler_id)


class SampleBody(Body):
    sampling_session_id: Id
    seq_id: SeqId
    prompt: dict[str, Any]
    num_samples: int = Field(1, ge=1, le=1024)
    sampling_params: dict[str, Any] = {}
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = Field(0, ge=0, le=1024)
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_logprobs_last_n: int | None = Field(None, ge=0)
    record_stability_info: bool = False  # 0.38: record the sequences for stable_reinforce


@router.post("/asample")
def asample(body: SampleBody, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    for name in ("topk_sample_logprobs", "prompt_alt_tokens_k"):
        if getattr(body, name):
            raise ValueError(f"{name}: not supported by this server (use 0)")
    if body.target_prompt_logprobs is not None:
        raise ValueError("target_prompt_logprobs: not supported by this server")
    fut, sequence_ids = svc.sample(
        who,
        body.sampling_session_id,
        body.seq_id,
        wire.tokens(body.prompt, "prompt").tolist(),
        body.num_samples,
        SamplingParams(**{k: v for k, v in body.sampling_params.items() if v is not None or k == "stop"}),
        body.prompt_logprobs or body.prompt_logprobs_last_n is not None,
        body.topk_prompt_logprobs,
        body.prompt_logprobs_last_n,
        body.record_stability_info,
    )
    return _future(fut, sample_sequence_ids=sequence_ids)


# futures ----------------------------------------------------------------------------------------


class RetrieveFuture(Body):
    request_id: Id
    allow_metadata_only: bool = False


@router.post(
    "/retrieve_future",
    responses={200: {"content": {"application/json": {}, "application/x-protobuf": {}}}},
)
async def retrieve_future(
    body: RetrieveFuture, request: Request, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    fut = svc.futures.get(body.request_id, who)  # another owner's id answers like an unknown one
    if fut is None:
        return JSONResponse({"detail": f"request {body.request_id} is unknown or its result expired"}, 410)
    svc.registry.touch(fut.session_id)  # a client waiting on results is alive
    if not await svc.futures.wait(fut, request.app.state.settings.long_poll_s):
        return {"type": "try_again", "request_id": fut.request_id, "queue_state": "active"}
    if fut.error is not None:
        return {"error": str(fut.error), "category": fut.error.category}
    wants_proto = "application/x-protobuf" in request.headers.get("accept", "")
    return _result_response(fut.result, wants_proto)


def _result_response(result: Any, wants_proto: bool) -> Any:
    if isinstance(result, SampleResult):
        if wants_proto:
            return Response(proto.encode_sample_response(result), media_type="application/x-protobuf")
        return {"type": "sample", **_sample_json(result)}
    if isinstance(result, TrainOutput):
        outputs = [{"logprobs": lp.numpy()} for lp in result.logprobs]
        metrics = {"loss:sum": result.loss}
        if wants_proto:
            body = proto.encode_forward_backward_output(outputs, metrics)
            return Response(body, media_type="application/x-protobuf")
        return {
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": [{k: _tensor_json(v) for k, v in o.items()} for o in outputs],
            "metrics": metrics,
        }
    if isinstance(result, KLOutput):
        return _reverse_kl_json(result)
    return result


def _reverse_kl_json(out: KLOutput) -> dict[str, Any]:
    weight = out.weight or 1.0
    return {
        "type": "mint_forward_backward_reverse_kl",
        "outputs": [
            {"loss": {"data": lp.tolist(), "shape": [len(lp)], "dtype": "float32"}} for lp in out.losses
        ],
        "metrics": {
            "loss:sum": out.loss,
            "reverse_kl:mean": out.loss / weight,  # exact, per unit of weight
            "sampled_kl:sum": out.sampled_kl,  # log π_student(y) − log π_reference(y) at the targets
            "sampled_kl:mean": out.sampled_kl / weight,
            "weight:sum": out.weight,
        },
    }


def _tensor_json(a: np.ndarray) -> dict[str, Any]:
    return {"data": a.flatten().tolist(), "dtype": "float32", "shape": list(a.shape)}


def _sample_json(result: SampleResult) -> dict[str, Any]:
    out = dataclasses.asdict(result)
    if result.topk_prompt_logprobs is not None:
        out["topk_prompt_logprobs"] = [
            None if row is None else [list(pair) for pair in row] for row in result.topk_prompt_logprobs
        ]
    return out


# REST: training runs and checkpoints -------------------------------------------------------------


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(run_id: Id, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    checkpoints = svc.list_checkpoints(who, run_id)
    return {
        "checkpoints": checkpoints,
        "cursor": {"offset": 0, "limit": len(checkpoints), "total_count": len(checkpoints)},
    }


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(
    run_id: Id, checkpoint_id: Id, who: str = Depends(owner), svc: TinkerService = Depends(service)
):
    svc.delete_checkpoint(who, run_id, checkpoint_id)
    return {}


class Ttl(Body):
    ttl_seconds: int | None = None


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
def set_ttl(
    run_id: Id,
    checkpoint_id: Id,
    body: Ttl,
    who: str = Depends(owner),
    svc: TinkerService = Depends(service),
):
    svc.set_checkpoint_ttl(who, run_id, checkpoint_id, body.ttl_seconds)
    return {}


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: Id, who: str = Depends(owner), svc: TinkerService = Depends(service)):
    return svc.training_run(who, run_id)


@router.get("/training_runs")
def list_training_runs(
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT),
    who: str = Depends(owner),
    svc: TinkerService = Depends(service),
):
    runs = svc.training_runs(who)
    return {
        "training_runs": runs[offset : offset + limit],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
    }
