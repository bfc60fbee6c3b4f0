"""The OpenAI-compatible surface: `GET /models`, `POST /completions`, `POST /chat/completions`, mounted at
`/v1` and (for MinT clients) `/oai/api/v1`.

`model` is a base model or any catalog ref the caller may see (see service/serving). Answers follow
OpenAI's shapes (openai_answer), with `system_fingerprint` (and the `x-mintd-revision` header) naming the
exact revision that answered. Errors on these routes use OpenAI's shape (openai_errors); the Tinker
routes keep theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from transformers import PreTrainedTokenizerBase

from mintd.api.auth import Unauthorized
from mintd.api.openai_answer import Job
from mintd.api.openai_errors import ERROR_RESPONSES, error_response, openai_error
from mintd.api.openai_wire import ChatRequest, CompletionRequest
from mintd.service.serving import Serving


class _OpenAIRoute(APIRoute):
    """Errors of these routes (body validation and auth included) in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
                return error_response(exc)

        return guarded


_bearer = HTTPBearer(auto_error=False, description="an API key (or its JWT), as the openai client sends it")
_api_key = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="the Tinker API's header, also accepted"
)
_STREAM = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "the "
        "answer as JSON, or with `stream: true` as server-sent events ending in `data: [DONE]`",
    }
}


def owner(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    x_api_key: str | None = Security(_api_key),
) -> str:
    credential = bearer.credentials if bearer is not None else x_api_key
    if not credential:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` (or `X-API-Key: <key>`)")
    return request.app.state.auth.owner(credential)


def serving(request: Request) -> Serving:
    return request.app.state.serving


# routes ------------------------------------------------------------------------------------------


async def list_models(
    limit: int = Query(100, ge=1, le=1000, description="adapters per page"),
    after: str | None = Query(None, max_length=256, description="the last id of the previous page"),
    who: str = Depends(owner),
    svc: Serving = Depends(serving),
) -> dict[str, Any]:
    """The base models, then the caller's adapters by name: each as `name` (its newest revision) and as
    `name:alias` for each of its aliases. Page with `after`; `has_more` says whether to."""
    data, more = await run_in_threadpool(svc.models, who, limit, after)
    return {"object": "list", "data": data, "has_more": more, "last_id": data[-1]["id"] if data else None}


async def completions(
    body: CompletionRequest, request: Request, who: str = Depends(owner), svc: Serving = Depends(serving)
) -> Response:
    if body.best_of is not None and body.best_of != body.n:
        raise ValueError("best_of: only best_of = n is supported (every sample is returned)")
    target = await run_in_threadpool(svc.resolve, who, body.model)
    tokenizer = svc.tokenizers[target.handle.name]
    prompts = _prompts(body.prompt, tokenizer)
    top = body.logprobs
    job = Job(svc, target, tokenizer, body, prompts, body.max_tokens, top, chat=False, prefix="cmpl")
    return await job.answer(request, who)


async def chat_completions(
    body: ChatRequest, request: Request, who: str = Depends(owner), svc: Serving = Depends(serving)
) -> Response:
    if body.top_logprobs and not body.logprobs:
        raise ValueError("top_logprobs: needs logprobs: true")
    target = await run_in_threadpool(svc.resolve, who, body.model)
    tokenizer = svc.tokenizers[target.handle.name]
    if not tokenizer.chat_template:
        raise ValueError(
            f"messages: base model {target.handle.name!r} has no chat template; use /completions"
        )
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    top = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    job = Job(svc, target, tokenizer, body, [prompt], max_tokens, top, chat=True, prefix="chatcmpl")
    return await job.answer(request, who)


def router(prefix: str, include_in_schema: bool = True) -> APIRouter:
    """The routes under `prefix` (/v1, and /oai/api/v1 for MinT clients): one router per prefix, so
    each route knows its full path (metrics label requests by it)."""
    r = APIRouter(
        prefix=prefix,
        route_class=_OpenAIRoute,
        tags=["openai"],
        responses=ERROR_RESPONSES,
        include_in_schema=include_in_schema,
    )
    r.add_api_route("/models", list_models, methods=["GET"])
    r.add_api_route("/completions", completions, methods=["POST"], responses=_STREAM)
    r.add_api_route("/chat/completions", chat_completions, methods=["POST"], responses=_STREAM)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    r.add_api_route("/{path:path}", _not_served, methods=methods, include_in_schema=False)
    return r


async def _not_served(path: str) -> Response:
    """Any other OpenAI route (embeddings, responses, files, ...): a 404 in OpenAI's shape naming it."""
    return openai_error(
        404,
        f"/{path}: not served by mintd (it serves /models, /completions and /chat/completions)",
        "invalid_request_error",
        code="unknown_url",
    )


def _prompts(prompt: Any, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
