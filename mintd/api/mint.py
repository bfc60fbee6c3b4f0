"""MinT's extensions to the Tinker API (/api/v1/mint), as the `mint` SDK sends them: checkpoint
interpolation and reverse-KL distillation. Validation and shaping only; the service does the work."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import Field

from mintd.api import wire
from mintd.api.errors import ERROR_RESPONSES
from mintd.api.tinker import Body, Id, SeqId, _future, decode_or_refuse, owner, service
from mintd.service.tinker import TinkerService

router = APIRouter(prefix="/api/v1/mint", responses=ERROR_RESPONSES)
MAX_SOURCES = 256  # checkpoints one interpolation may combine


class InterpolateCheckpoints(Body):
    source_paths: list[Id] = Field(min_length=1, max_length=MAX_SOURCES)
    coefficients: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(max_length=MAX_SOURCES)
    output_path: Id | None = None
    output_checkpoint_type: Literal["sampler"] = "sampler"
    rank: int | None = Field(None, ge=1, le=1024)  # mintd extension: compress to this rank by SVD


@router.post("/checkpoints/interpolate")
def interpolate_checkpoints(
    body: InterpolateCheckpoints, who: str = Depends(owner), svc: TinkerService = Depends(service)
) -> dict[str, Any]:
    fut = svc.interpolate_checkpoints(who, body.source_paths, body.coefficients, body.output_path, body.rank)
    return _future(fut)


class ReverseKL(Body):
    model_id: Id
    reference_model_path: Id
    data: list[dict[str, Any]]
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    seq_id: SeqId | None = None


@router.post("/forward_backward_reverse_kl")
def forward_backward_reverse_kl(
    body: ReverseKL, who: str = Depends(owner), svc: TinkerService = Depends(service)
) -> dict[str, Any]:
    cap = svc.settings.max_tensor_elements
    data = decode_or_refuse(svc, who, body.model_id, body.seq_id, lambda: wire.kl_data(body.data, cap))
    fut = svc.forward_backward_reverse_kl(
        who, body.model_id, body.seq_id, body.reference_model_path, data, body.temperature
    )
    return _future(fut, model_id=body.model_id)
