"""One completions or chat request: its prompts admitted (n choices each), their tokens turned into
text as they come, and the OpenAI answer shaped from them: a whole JSON answer, or server-sent events,
one chunk per token that adds text. With `logprobs`, every token comes scored from the step that made
it (its logprob at temperature 1 and the top alternatives: what Tinker's `compute_logprobs` reports for
that revision), so logprobs stream with their tokens.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from mintd.api.openai_errors import error_response
from mintd.api.openai_wire import ChatRequest, CompletionRequest, usage
from mintd.engine.sampling import SamplingParams
from mintd.engine.stream import TokenEvent
from mintd.service.memory import is_delta_mem
from mintd.service.serving import Generation, Serving, Target
from mintd.service.text import TextAssembler


@dataclass
class _Choice:
    index: int
    prompt: list[int]
    text: TextAssembler
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # the text each token released
    finish: str | None = None
    scores: list[tuple[float | None, tuple[tuple[int, float], ...]]] = field(default_factory=list)

    def add(self, event: TokenEvent) -> str:
        self.tokens.append(event.token)
        self.scores.append((event.score, event.alternatives))
        piece = self.text.add(event.token)
        if event.stop_reason is not None or self.text.stopped:
            piece += self.text.finish()
            self.finish = "stop" if self.text.stopped or event.stop_reason == "stop" else "length"
        self.pieces.append(piece)
        return piece


class Job:
    """One completions or chat request: its prompts (each n choices), run, and shaped as OpenAI answers."""

    def __init__(
        self,
        svc: Serving,
        target: Target,
        tokenizer: PreTrainedTokenizerBase,
        body: CompletionRequest | ChatRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        top: int | None,
        chat: bool,
        prefix: str,
    ) -> None:
        self.svc, self.target, self.tokenizer, self.body = svc, target, tokenizer, body
        self.prompts, self.max_tokens, self.top, self.chat = prompts, max_tokens, top, chat
        self.id = f"{prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.choices = [
            _Choice(i * body.n + j, p, TextAssembler(tokenizer, body.stops()))
            for i, p in enumerate(prompts)
            for j in range(body.n)
        ]
        self.gens: list[Generation] = []

    def _params(self, prompt: list[int]) -> SamplingParams:
        engine = self.target.handle.engine
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(self.svc.settings.default_max_tokens, engine.max_len - len(prompt)))
        stop: list[str | int] | None = list(self.body.stops())
        if not self.body.ignore_eos:
            stop = [*stop, *sorted(engine.eos_ids)] if stop else None  # None: the engine stops on EOS
        b = self.body
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=b.temperature,
            top_p=b.top_p,
            top_k=b.top_k,
            stop=stop,
            seed=b.seed,
        )

    async def answer(self, request: Request, who: str) -> Response:
        loop = asyncio.get_running_loop()
        user, read_only = self.body.user, _read_only(request)
        if user is not None and not read_only and len(self.prompts) > 1:
            raise ValueError("prompt: with `user`, one prompt per request (a δ-mem instance has one writer)")
        submit = functools.partial(self.svc.submit, who, self.target)
        try:
            for prompt in self.prompts:
                args = (prompt, self._params(prompt), self.body.n, loop, self.top, user, read_only)
                if self.target.revision is not None and is_delta_mem(self.target.revision):
                    self.gens.append(await asyncio.to_thread(submit, *args))  # binding: catalog, blob
                else:
                    self.gens.append(submit(*args))
        except Exception:
            self._cancel()
            raise
        headers = {"x-mintd-revision": self.target.served}
        if not self.body.stream:
            watcher = asyncio.ensure_future(_cancel_on_disconnect(request, self._cancel))
            try:
                await self._collect()
                for gen in self.gens:
                    committed = await gen.commit()
                    if committed is not None:
                        headers["x-mintd-memory"] = committed.ref
            finally:
                watcher.cancel()
                self._cancel()
            return JSONResponse(self._whole(), headers=headers)
        events = self._sse()
        try:
            first = await anext(events)  # a request that fails before its first token gets an HTTP error
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(_prepend(first, events), media_type="text/event-stream", headers=headers)

    def _cancel(self) -> None:
        for gen in self.gens:
            gen.cancel()

    def _choice(self, gen_index: int, sample_index: int) -> _Choice:
        return self.choices[gen_index * self.body.n + sample_index]

    async def _collect(self) -> None:
        async for g, event in _merge(self.gens):
            self._choice(g, event.sample_index).add(event)

    # shaping -------------------------------------------------------------------------------------

    def _usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.prompts), sum(len(c.tokens) for c in self.choices))

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": self.target.served,
        }

    def _whole(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            text = "".join(c.pieces)
            lp = self._logprobs(c, 0, len(c.tokens))
            if self.chat:
                choices.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": c.finish,
                    }
                )
            else:
                choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish})
        return {**self._head(self.object), "choices": choices, "usage": self._usage()}

    def _logprobs(self, c: _Choice, start: int, end: int) -> dict[str, Any] | None:
        """OpenAI's logprobs of the choice's tokens [start, end), as the steps that made them scored them."""
        if self.top is None:
            return None
        if self.body.return_tokens_as_token_ids:
            decode: Callable[[list[int]], str] = lambda ids: f"token_id:{ids[0]}"  # noqa: E731
        else:
            decode = self.tokenizer.decode
        rows = []
        for j in range(start, end):
            score, alternatives = c.scores[j]
            rows.append((decode([c.tokens[j]]), score, [(decode([t]), lp) for t, lp in alternatives]))
        if self.chat:
            return {
                "content": [
                    {
                        "token": tok,
                        "logprob": lp,
                        "bytes": list(tok.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alts
                        ],
                    }
                    for tok, lp, alts in rows
                ]
            }
        offset = sum(len(p) for p in c.pieces[:start])
        offsets = []
        for p in c.pieces[start:end]:
            offsets.append(offset)
            offset += len(p)
        return {
            "tokens": [tok for tok, _, _ in rows],
            "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [dict(alts) for _, _, alts in rows],
            "text_offset": offsets,
        }

    async def _sse(self) -> AsyncIterator[bytes]:
        """The stream: one chunk per token that releases text (or ends a choice), then usage, then DONE.
        A failure before the first chunk is raised (an HTTP error); after it, it is an `error` event.
        Cancelled (the client went away) or not, its rows are given back when it ends."""
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        role = {"role": "assistant", "content": ""}
        started = False
        try:
            try:
                async for g, event in _merge(self.gens):
                    if not started:
                        started = True
                        for c in self.choices if self.chat else ():
                            yield self._chunk(obj, c.index, role, None, None, include_usage)
                    c = self._choice(g, event.sample_index)
                    piece = c.add(event)
                    if self.top is not None:  # every token carries its logprobs, text or not
                        j = len(c.tokens) - 1
                        yield self._delta(obj, c, piece, self._logprobs(c, j, j + 1), c.finish, include_usage)
                    elif piece or c.finish:
                        yield self._delta(obj, c, piece, None, c.finish, include_usage)
                for gen in self.gens:
                    await gen.commit()
            except Exception as exc:
                if not started:
                    raise
                yield _event(json.loads(error_response(exc).body))
                yield b"data: [DONE]\n\n"
                return
            if include_usage:
                yield _event({**self._head(obj), "choices": [], "usage": self._usage()})
            yield b"data: [DONE]\n\n"
        finally:
            self._cancel()

    def _delta(
        self,
        obj: str,
        c: _Choice,
        piece: str,
        lp: dict[str, Any] | None,
        finish: str | None,
        include_usage: bool,
    ) -> bytes:
        content = ({"content": piece} if piece or not finish else {}) if self.chat else piece
        return self._chunk(obj, c.index, content, lp, finish, include_usage)

    def _chunk(
        self,
        obj: str,
        index: int,
        content: Any,
        lp: dict[str, Any] | None,
        finish: str | None,
        include_usage: bool,
    ) -> bytes:
        choice: dict[str, Any] = {"index": index}
        choice["delta" if self.chat else "text"] = content
        choice |= {"logprobs": lp, "finish_reason": finish}
        chunk = {**self._head(obj), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return _event(chunk)


def _read_only(request: Request) -> bool:
    """`x-mintd-memory: read-only`: a δ-mem instance named by `user` is read, not written."""
    mode = request.headers.get("x-mintd-memory")
    if mode not in (None, "read-only"):
        raise ValueError(f"x-mintd-memory: {mode!r}; the one value is 'read-only'")
    return mode == "read-only"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for item in rest:
        yield item


async def _merge(gens: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """The token events of several generations as they come: (generation index, event). Raises the first
    failure."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for event in gen.events():
                queue.put_nowait((i, event, None))
            await gen.result()
            queue.put_nowait((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, event, exc = await queue.get()
            if exc is not None:
                raise exc
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for t in tasks:
            t.cancel()


async def _cancel_on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    """A client that hangs up on a whole (non-streamed) answer frees its rows too."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()
