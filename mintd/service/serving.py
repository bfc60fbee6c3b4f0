"""Serving behind the OpenAI endpoint: `model` names a base model or any catalog ref, resolved per request.

An alias is resolved when a request is admitted, to an immutable revision whose content hash is its
residency key: `promote` and `rollback` change what the next request gets, a request in flight finishes
on the revision it started with, and a revision already resident is not loaded again. Tenancy is the
Tinker API's: a ref resolves in the caller's catalog only, and another owner's adapter is as unknown
as a missing one.

A request is one engine sample request (n rows) with a `TokenStream`: tokens reach the HTTP side as
the engine makes them, step by step, and a reader that goes away cancels the stream, which frees its
rows at the engine's next step. The rows a base model holds (waiting or decoding) are bounded by
`max_pending_rows`; beyond it a request is refused (`Busy`, HTTP 429 with Retry-After) rather than
queued without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mintd.catalog import Revision
from mintd.config import ServeSettings
from mintd.engine import sampling
from mintd.engine.adapters import BASE_SLOT
from mintd.engine.sampling import SampleRequest, SampleResult, SamplingParams
from mintd.engine.stream import TokenEvent, TokenStream
from mintd.service.errors import Busy
from mintd.service.futures import Future, FutureStore
from mintd.service.memory import Binding, is_delta_mem, refuse_state
from mintd.service.metrics import Metrics
from mintd.service.sampling import admit_cold
from mintd.service.scheduler import SampleOp
from mintd.service.tinker import BaseModelHandle, TinkerService

MAX_LIST = 1000  # adapters per page of GET /v1/models


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to: a base model, and the revision of an adapter over it."""

    handle: BaseModelHandle
    revision: Revision | None

    @property
    def served(self) -> str:
        """The exact thing that answers: the base model's name, or the revision's permanent ref."""
        return self.revision.ref if self.revision is not None else self.handle.name


class _Stream(TokenStream):
    """A TokenStream that wakes an asyncio reader on every event and keeps the serving figures: time to
    first token, inter-token latency, tokens out, and each row's waiting -> running -> done state."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rows: int,
        model: str,
        serving: Serving,
        score_top: int | None,
    ) -> None:
        super().__init__(score_top)
        self.wake = asyncio.Event()
        self._loop = loop
        self._serving = serving
        self._model = model
        self._lock = threading.Lock()
        self._admitted = time.perf_counter()
        self._last: dict[int, float] = {}  # row -> when its latest token came
        self._done: set[int] = set()
        self._rows = rows
        self._settled = False
        self.pushed = 0
        m = serving.metrics
        m.waiting.labels(model).inc(rows)

    def push(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        m = self._serving.metrics
        with self._lock:
            self.pushed += 1
            if self._settled or event.sample_index in self._done:
                pass
            elif event.sample_index not in self._last:
                if not self._last:
                    m.ttft.labels(self._model).observe(now - self._admitted)
                m.waiting.labels(self._model).dec()
                m.running.labels(self._model).inc()
            else:
                m.itl.labels(self._model).observe(now - self._last[event.sample_index])
            self._last[event.sample_index] = now
            if event.stop_reason is not None and event.sample_index not in self._done and not self._settled:
                self._done.add(event.sample_index)
                m.running.labels(self._model).dec()
        m.generation_tokens.labels(self._model).inc()
        super().push(event)
        self._wake()

    def close(self) -> None:
        super().close()
        self.settle()
        self._wake()

    def settle(self) -> None:
        """The request is over (done, failed or abandoned): its rows leave the gauges and the bound."""
        m = self._serving.metrics
        with self._lock:
            if self._settled:
                return
            self._settled = True
            started = set(self._last)
            m.waiting.labels(self._model).dec(self._rows - len(started))
            m.running.labels(self._model).dec(len(started - self._done))
        self._serving._release(self._model, self._rows)

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self._loop.call_soon_threadsafe(self.wake.set)


class Generation:
    """One admitted request: its tokens as they come (`events`), and its end (`result`)."""

    def __init__(
        self, future: Future, stream: _Stream, futures: FutureStore, memory: Binding | None = None
    ) -> None:
        self.future = future
        self.stream = stream
        self._futures = futures
        self.memory = memory  # a δ-mem request's instance binding: committed after the result

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Each token event, in the order the engine made them; raises RequestError if the request fails
        (for instance its adapter could not be loaded)."""
        watcher = asyncio.ensure_future(self._watch())
        try:
            while True:
                self.stream.wake.clear()
                try:
                    event = self.stream.get(timeout=0)
                except queue.Empty:
                    if self.future.done:  # failed before its first step: no stream was ever closed
                        if self.future.error is not None:
                            raise self.future.error from None
                        return
                    await self.stream.wake.wait()
                    continue
                if event is None:
                    return
                yield event
        finally:
            watcher.cancel()

    async def result(self) -> SampleResult:
        while not await self._futures.wait(self.future, 3600):
            pass
        if self.future.error is not None:
            raise self.future.error
        return self.future.result

    def cancel(self) -> None:
        """The reader is gone: the engine drops the rows at its next step (an instance it was writing
        keeps its last committed state)."""
        self.stream.cancel()
        self.stream.settle()
        if self.memory is not None:
            self.memory.release()

    async def commit(self) -> Revision | None:
        """After the result: a δ-mem instance's new state as its `live` revision (None: nothing to commit)."""
        if self.memory is None or not self.memory.writes:
            return None
        result = await self.result()
        return await asyncio.to_thread(self.memory.commit, result)

    async def _watch(self) -> None:
        await self._futures.wait(self.future, 86400)
        self.stream.wake.set()


class Serving:
    def __init__(self, service: TinkerService, settings: ServeSettings, metrics: Metrics) -> None:
        self.service = service
        self.settings = settings
        self.metrics = metrics
        # Its own tokenizer per base model: the engine thread decodes with the engine's at the same time.
        self.tokenizers: dict[str, PreTrainedTokenizerBase] = {
            name: AutoTokenizer.from_pretrained(h.model_dir) for name, h in service.models.items()
        }
        self._pending = dict.fromkeys(service.models, 0)
        self._lock = threading.Lock()
        self.memories = service.memories

    # models -------------------------------------------------------------------------------------

    def resolve(self, owner: str, model: str) -> Target:
        """A base model by name, else the caller's revision the ref names (404 if none)."""
        if model in self.service.models:
            return Target(self.service.models[model], None)
        rev = self.service.revision(owner, model, "model")
        refuse_state(rev, "model")
        return Target(self.service.base_of(rev, "model"), rev)

    def models(self, owner: str, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """One page of `GET /v1/models`: the base models (first page), then the caller's adapters by name,
        each as `name` (its newest revision) and `name:alias` for each alias. `after` is the last id of
        the previous page; `limit` counts adapters. (entries, whether more pages follow)."""
        entries: list[dict[str, Any]] = []
        if after is None:
            entries += [_model(name, "mintd", 0, None) for name in self.service.models]
        catalog = self.service.catalog
        start = None if after is None else after.split(":", 1)[0].split("@", 1)[0]
        if start in self.service.models:
            start = None
        adapters = catalog.list_adapters(owner, limit=limit + 1, after=start)
        more = len(adapters) > limit
        adapters = adapters[:limit]
        by_adapter: dict[str, list[Any]] = {}
        for alias in catalog.aliases(owner, [a.name for a in adapters]):
            by_adapter.setdefault(alias.adapter, []).append(alias)
        for a in adapters:
            entries.append(_model(a.name, owner, int(a.created_at), None))
            for alias in by_adapter.get(a.name, []):
                ref = f"{owner}/{a.name}@{alias.number}"
                entries.append(_model(f"{a.name}:{alias.name}", owner, int(alias.updated_at), ref))
        return entries, more

    # requests -----------------------------------------------------------------------------------

    def submit(
        self,
        owner: str,
        target: Target,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        loop: asyncio.AbstractEventLoop,
        score_top: int | None = None,
        user: str | None = None,
        read_only: bool = False,
    ) -> Generation:
        """Admit one prompt (n rows) on the target's base model, or raise ValueError naming the bad
        field, or Busy when the base model holds `max_pending_rows` already. With `score_top`, every
        token comes scored (its logprob at temperature 1 and that many alternatives). For a δ-mem
        target, `user` names the instance it reads and writes (none: read-only on an empty state);
        `read_only` reads the instance's state without writing it. The binding reads the catalog and a
        blob: call it off the event loop."""
        handle = target.handle
        request = SampleRequest(BASE_SLOT, prompt, params, n)
        sampling.validate(request, handle.engine.vocab_size, handle.engine.max_len)
        if target.revision is not None:
            admit_cold(handle, target.revision, self.settings.max_load_queue, "model")
        memory = None
        if target.revision is not None and is_delta_mem(target.revision):
            if user is not None and not read_only and n != 1:
                raise ValueError("n: a δ-mem instance (`user`) writes one continuation; use n = 1")
            memory = self.memories.bind(owner, target.revision, handle.engine, user, prompt, read_only)
            request.memory = memory.input()
        try:
            self._admit(handle.name, n)
        except Exception:
            if memory is not None:
                memory.release()
            raise
        request.stream = stream = _Stream(loop, n, handle.name, self, score_top)
        self.metrics.prompt_tokens.labels(handle.name).inc(len(prompt))
        future = Future(f"oai-{secrets.token_urlsafe(12)}", "OpenAI", owner)
        # One queue per owner and served revision, like a Tinker sampling session: requests for one
        # adapter keep their order, and one waiting on a cold load or on room holds up no other adapter's.
        queue = f"openai:{owner}:{target.served}"
        handle.worker.submit_sample(future, SampleOp(request, _same, queue, target.revision))
        return Generation(future, stream, self.service.futures, memory)

    def _admit(self, model: str, rows: int) -> None:
        cap = self.settings.max_pending_rows
        with self._lock:
            if self._pending[model] and self._pending[model] + rows > cap:
                self.metrics.rejected.labels(model).inc()
                raise Busy(
                    f"model: base model {model!r} holds {self._pending[model]} sequences, the most allowed "
                    f"is {cap} (MINTD_MAX_PENDING_ROWS); retry shortly"
                )
            self._pending[model] += rows

    def _release(self, model: str, rows: int) -> None:
        with self._lock:
            self._pending[model] -= rows


def _same(result: SampleResult) -> SampleResult:
    return result


def _model(model_id: str, owner: str, created: int, revision: str | None) -> dict[str, Any]:
    """A model card; `revision` (an extension): the revision an alias points at now (else None)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner, "revision": revision}
