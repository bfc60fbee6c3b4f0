"""Evaluation runs over HTTP (/api/v1/evaluations): start one, follow its progress, download its results.

`POST /runs` checks the body, expands the revision set and tokenizes the eval set before answering (so
bad input is an immediate 4xx naming the field), then runs in the background. It answers the run's
view, whose `request_id` is a future: `retrieve_future` long-polls it like any Tinker future and
answers the finished run's view. `GET /runs/{run_id}` is the progress; `GET /runs/{run_id}/results`
the JSONL rows so far (every sample, every revision's score, then the population's answers and the
summary); `POST /runs/{run_id}/cancel` stops submitting.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import Field

from mintd.api.errors import ERROR_RESPONSES
from mintd.api.tinker import Body, Id, owner, service
from mintd.config import MAX_EVAL_ITEMS, MAX_EVAL_REVISIONS
from mintd.engine.sampling import SamplingParams
from mintd.eval import ScorerSpec, parse_items
from mintd.service.evaluation import EvalSpec, EvaluationRuns, RevisionSet
from mintd.service.tinker import TinkerService

router = APIRouter(prefix="/api/v1/evaluations", tags=["evaluations"], responses=ERROR_RESPONSES)


def runs(svc: TinkerService = Depends(service)) -> EvaluationRuns:
    return svc.evaluations


class Revisions(Body):
    """Which revisions: the parts add up, each revision counts once."""

    refs: list[Id] = Field(
        [], max_length=MAX_EVAL_REVISIONS, description="any refs (name@N, name:alias, ...)"
    )
    adapter: Id | None = Field(None, description="every live revision of this adapter")
    prefix: Id | None = Field(None, description="adapters whose names start with this: each one's newest")
    alias: Id | None = Field(None, description="with prefix: each adapter's revision under this alias")
    limit: int = Field(MAX_EVAL_REVISIONS, ge=1, le=MAX_EVAL_REVISIONS, description="refuse larger sets")


class EvalSampling(SamplingParams):
    """Tinker's sampling parameters, greedy unless a temperature is given."""

    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)


class StartRun(Body):
    revisions: Revisions
    eval_set: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_EVAL_ITEMS,
        description='items: {"id"?, "prompt" | "messages", "expected", ...}, one per JSONL line of a file',
    )
    suite: Id = Field(description="the catalog evaluation suite, e.g. 'gsm8k'")
    metric: Id | None = Field(None, description="the catalog metric; default: the scorer's kind")
    scorer: ScorerSpec | None = Field(
        default_factory=ScorerSpec, description="null: only sample (score elsewhere; record must be false)"
    )
    sampling_params: EvalSampling = Field(default_factory=EvalSampling)
    record: bool = Field(True, description="record each revision's score as a catalog evaluation")


@router.post("/runs")
def start_run(
    body: StartRun, who: str = Depends(owner), evals: EvaluationRuns = Depends(runs)
) -> dict[str, Any]:
    r = body.revisions
    spec = EvalSpec(
        revisions=RevisionSet(tuple(r.refs), r.adapter, r.prefix, r.alias, r.limit),
        items=parse_items(body.eval_set),
        sampling=SamplingParams(**body.sampling_params.model_dump()),
        scorer=body.scorer,
        suite=body.suite,
        metric=body.metric,
        record=body.record,
    )
    return evals.start(who, spec).view()


@router.get("/runs")
def list_runs(who: str = Depends(owner), evals: EvaluationRuns = Depends(runs)) -> dict[str, Any]:
    """The caller's runs on this server (running, and finished ones until their results expire)."""
    return {"runs": [run.view() | {"revisions": None} for run in evals.list(who)]}


@router.get("/runs/{run_id}")
def get_run(run_id: Id, who: str = Depends(owner), evals: EvaluationRuns = Depends(runs)) -> dict[str, Any]:
    return evals.get(who, run_id).view()


@router.post("/runs/{run_id}/cancel")
def cancel_run(
    run_id: Id, who: str = Depends(owner), evals: EvaluationRuns = Depends(runs)
) -> dict[str, Any]:
    return evals.cancel(who, run_id).view()


@router.get(
    "/runs/{run_id}/results",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "JSONL rows"}},
)
def run_results(run_id: Id, who: str = Depends(owner), evals: EvaluationRuns = Depends(runs)) -> FileResponse:
    run = evals.get(who, run_id)
    return FileResponse(run.results, media_type="application/x-ndjson", filename=f"{run.id}.jsonl")
