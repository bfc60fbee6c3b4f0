"""The engine worker: the only thread that touches an engine.

Policy lives here, mechanics in the engine. Each training run's requests execute strictly in seq_id
order (early arrivals wait in a buffer). Sampling is iteration-level: the engine's step loop decodes one
token of every running sample per step, and new samples join at the next step.

Each turn of the loop runs, in this order: calls outside any run; each run's ready calls (optim_step,
save, load); one merged forward_backward of ready work of *all* runs (round-robin, at most
`max_train_ops_per_run` ops per run and `max_train_tokens` tokens); then admits waiting samples that fit
(`max_sample_rows` rows and the KV cache; higher priority first, sampling sessions round-robin) and runs
one sampling step. So training and decoding alternate turn by turn: no policy's rollout blocks another's
training, and a training batch delays decoding by one bounded forward_backward at most.

A run whose next seq_id never arrives is failed after `seq_gap_timeout_s` with an error naming the
missing id.

Ops name adapter keys, never slots: residency gives a sample its adapter's slot when it is admitted
and takes the reference back when it finishes (or fails); a training op holds its run's slot for its
turn. A sample whose saved adapter is not loaded yet is not taken at all: its cold load runs on the
loader thread while resident work goes on, and the loader wakes the worker when it is done; one that
finds no room waits at the head of its queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest
from mintd.engine.step.sequence import RequestState
from mintd.engine.train import TrainGroup, TrainOutput
from mintd.residency import AdapterKey, Residency, RunKey, Wait
from mintd.service.futures import Future, FutureStore, RequestError
from mintd.service.heap import HeapUpkeep

log = logging.getLogger(__name__)


@dataclass
class TrainOp:
    """forward or forward_backward: batchable with other runs' ops."""

    run: RunKey  # whose adapter: residency gives `group` its slot when the op runs
    group: TrainGroup
    forward_only: bool
    finish: Callable[[TrainOutput], Any]


@dataclass
class CallOp:
    """Anything else on a run (optim_step, save, load): runs alone, in order."""

    fn: Callable[[Engine], Any]


@dataclass
class _Queued:
    future: Future
    op: TrainOp | CallOp


@dataclass
class _RunQueue:
    next_seq: int = 1
    waiting: dict[int, _Queued] = field(default_factory=dict)
    waiting_since: float = field(default_factory=time.monotonic)
    failed: str | None = None
    # ops without a seq_id: (last seq_id submitted before them, op); each runs once all of those ran
    unsequenced: deque[tuple[int, _Queued]] = field(default_factory=deque)

    def head(self) -> _Queued | None:
        if self.unsequenced and self.unsequenced[0][0] < self.next_seq:
            return self.unsequenced[0][1]
        return self.waiting.get(self.next_seq)

    def pop_head(self) -> None:
        if self.unsequenced and self.unsequenced[0][0] < self.next_seq:
            self.unsequenced.popleft()
        else:
            del self.waiting[self.next_seq]
            self.next_seq += 1
        self.waiting_since = time.monotonic()


class Priority(IntEnum):
    """Who goes first when adapters wait for loads or room: training, then people, then bulk work."""

    TRAINING = 0
    INTERACTIVE = 1
    BULK = 2  # evaluation runs and other background sampling


@dataclass
class SampleOp:
    """A sample: its request, and the adapter whose slot the request needs (None: the base)."""

    request: SampleRequest
    finish: Callable[[Any], Any]
    sampler_id: str  # its queue: samples of one sampling session run in order, sessions round-robin
    adapter: AdapterKey | None = None
    priority: Priority = Priority.INTERACTIVE


@dataclass
class _Round:
    direct: list[tuple[Future | None, CallOp]]
    calls: list[tuple[Future, CallOp]]
    train: list[tuple[Future, TrainOp]]
    samples: list[tuple[Future, SampleOp]]  # to admit into the step engine this turn

    @property
    def empty(self) -> bool:
        return not (self.direct or self.calls or self.train or self.samples)


@dataclass
class SchedulerLimits:
    max_train_ops_per_run: int = 4  # per round: fair share between runs
    max_train_tokens: int = 65536  # per merged forward_backward call
    max_sample_rows: int = 128  # samples decoding together in the step engine
    seq_gap_timeout_s: float = 300.0
    heap_trim_interval_s: float = 10.0  # how often freed heap memory goes back to the OS (0: never)
    full_gc_interval_s: float = 60.0  # how often Python's full collection runs (0: when Python decides)


class EngineWorker:
    def __init__(
        self,
        engine: Engine,
        futures: FutureStore,
        limits: SchedulerLimits,
        name: str,
        residency: Residency,
    ) -> None:
        self.engine = engine
        self.futures = futures
        self.limits = limits
        self.residency = residency
        self._cv = threading.Condition()
        self._runs: dict[str, _RunQueue] = {}
        self._rr = 0
        self._samples: dict[str, deque[tuple[Future, SampleOp]]] = {}  # by sampler id
        # queues whose head waits on a cold load: out of every turn's scan until the loader says so
        self._on_load: dict[str, deque[tuple[Future, SampleOp]]] = {}  # by sampler id
        self._waiters: dict[str, list[str]] = {}  # content hash -> sampler ids in _on_load
        self._loaded: list[str] = []  # content hashes the loader finished, not yet looked at
        self._direct: deque[tuple[Future, CallOp]] = deque()
        self._live: dict[RequestState, tuple[Future, SampleOp]] = {}  # admitted, not finished
        self._stop = False
        self.heap = HeapUpkeep(limits.heap_trim_interval_s, limits.full_gc_interval_s)
        residency.set_wake(self._wake)
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # submission (any thread) ---------------------------------------------------------------------

    def add_run(self, model_id: str, next_seq: int = 1) -> None:
        with self._cv:
            self._runs.setdefault(model_id, _RunQueue(next_seq=next_seq))

    def remove_run(self, model_id: str) -> None:
        with self._cv:
            queue = self._runs.pop(model_id, None)
        for item in _queued(queue) if queue else ():
            self.futures.resolve(item.future, error=RequestError(f"model {model_id} was unloaded"))

    def _open_queue(self, model_id: str, future: Future) -> _RunQueue | None:
        """The run's queue, or None after failing `future` (an unknown or failed run). Holds `_cv`."""
        queue = self._runs.get(model_id)
        if queue is None or queue.failed:
            reason = queue.failed if queue else f"unknown model_id {model_id}"
            self.futures.resolve(future, error=RequestError(reason))
            return None
        return queue

    def submit_run_op(self, model_id: str, seq_id: int, future: Future, op: TrainOp | CallOp) -> None:
        with self._cv:
            if (queue := self._open_queue(model_id, future)) is None:
                return
            if seq_id < queue.next_seq or seq_id in queue.waiting:
                self.futures.resolve(future, error=RequestError(f"seq_id {seq_id} was already used"))
                return
            if not queue.waiting:
                queue.waiting_since = time.monotonic()
            queue.waiting[seq_id] = _Queued(future, op)
            self._cv.notify()

    def submit_after_run(self, model_id: str, future: Future, op: TrainOp | CallOp) -> None:
        """An op without a seq_id: it runs after every op of the run already submitted (including
        seq_ids still awaited), before any submitted later, and consumes no seq_id."""
        with self._cv:
            if (queue := self._open_queue(model_id, future)) is None:
                return
            last = max([queue.next_seq - 1, *queue.waiting, *(after for after, _ in queue.unsequenced)])
            queue.unsequenced.append((last, _Queued(future, op)))
            self._cv.notify()

    def submit_sample(self, future: Future, op: SampleOp) -> None:
        if op.adapter is not None:
            self.residency.prefetch(op.adapter, op.priority)  # its cold load starts now, if it needs one
        with self._cv:
            self._queue(op.sampler_id).append((future, op))
            self._cv.notify()

    def _queue(self, sampler_id: str) -> deque[tuple[Future, SampleOp]]:
        """A sampling session's queue, wherever it is (waiting on a load, or in the scan). Holds `_cv`."""
        queue = self._on_load.get(sampler_id)
        return queue if queue is not None else self._samples.setdefault(sampler_id, deque())

    def submit_call(self, future: Future, op: CallOp) -> None:
        """Work outside any run's order (creating a run, loading a sampler)."""
        with self._cv:
            self._direct.append((future, op))
            self._cv.notify()

    def post(self, fn: Callable[[Engine], Any]) -> None:
        """Run `fn(engine)` on the worker thread soon, answering no one (freeing slots)."""
        with self._cv:
            self._direct.append((None, CallOp(fn)))
            self._cv.notify()

    def call(self, fn: Callable[[Engine], Any], timeout: float = 600.0) -> Any:
        """Run `fn(engine)` on the worker thread and wait for it (for short synchronous requests)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def wrapped(engine: Engine) -> None:
            try:
                box["result"] = fn(engine)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc
            finally:
                done.set()

        self.post(wrapped)
        if not done.wait(timeout):
            raise TimeoutError("engine worker did not answer")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _wake(self, loaded: str) -> None:
        with self._cv:
            self._loaded.append(loaded)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.residency.close()
        self.heap.close()

    # the loop (worker thread) ----------------------------------------------------------------------

    def _loop(self) -> None:
        """The worker never dies: a bug in one round fails that round's requests, not the server."""
        while (work := self._take()) is not None:
            try:
                self._execute(work)
            except Exception as exc:  # noqa: BLE001
                log.exception("engine worker round failed", exc_info=exc)
                error = RequestError(f"internal error: {type(exc).__name__}", "server")
                for fut, *_ in (*work.direct, *work.calls, *work.train, *work.samples):
                    if fut is not None and not fut.done:
                        self.futures.resolve(fut, error=error)
        self._abort_samples(RequestError("the engine worker stopped", "server"))

    def _take(self) -> _Round | None:
        """Wait (a second at most) for ready work and take one round of it, empty if none came, so an
        idle worker still parks idle runs and keeps the heap; None once stopped."""
        with self._cv:
            self._fail_stalled_runs()  # every round: other runs' work must not hide a stalled run
            if not self._stop and not self._has_work():
                self._cv.wait(timeout=1.0)
                self._fail_stalled_runs()
            if self._stop:
                return None
            direct = list(self._direct)
            self._direct.clear()
            calls, train = self._take_run_ops()
            return _Round(direct, calls, train, self._take_samples())

    def _execute(self, work: _Round) -> None:
        self.residency.park_idle()
        for fut, op in (*work.direct, *work.calls):
            self._run_call(fut, op)
        if work.train:
            self._run_train(work.train)
        self._admit(work.samples)
        if self._live:
            self._step()
        # idle: the worker waited and no work came (a step engine that just emptied may have requests
        # queued behind it, which a pause would delay)
        self.heap.between_rounds(idle=work.empty and not self._live)

    def _has_work(self) -> bool:
        return (
            bool(self._direct)
            or bool(self._live)
            or bool(self._ready_queues())
            or any(q.head() is not None for q in self._runs.values())
        )

    def _fail_stalled_runs(self) -> None:
        now = time.monotonic()
        for model_id, queue in self._runs.items():
            if (
                queue.waiting
                and queue.head() is None
                and now - queue.waiting_since > self.limits.seq_gap_timeout_s
            ):
                queue.failed = (
                    f"model {model_id}: seq_id {queue.next_seq} never arrived within "
                    f"{self.limits.seq_gap_timeout_s:g}s; the training run is stopped"
                )
                for item in _queued(queue):
                    self.futures.resolve(item.future, error=RequestError(queue.failed))
                queue.waiting.clear()
                queue.unsequenced.clear()

    def _take_run_ops(self) -> tuple[list[tuple[Future, CallOp]], list[tuple[Future, TrainOp]]]:
        """Round-robin over runs: each gives its in-order head ops (up to the fair-share cap)."""
        calls: list[tuple[Future, CallOp]] = []
        train: list[tuple[Future, TrainOp]] = []
        ids = list(self._runs)
        if not ids:
            return calls, train
        self._rr = (self._rr + 1) % len(ids)
        tokens = 0
        for model_id in ids[self._rr :] + ids[: self._rr]:
            queue = self._runs[model_id]
            took_train = False
            for _ in range(self.limits.max_train_ops_per_run):
                item = queue.head()
                if item is None:
                    break
                if isinstance(item.op, TrainOp):
                    size = sum(len(d.tokens) for d in item.op.group.data)
                    if train and tokens + size > self.limits.max_train_tokens:
                        break
                    tokens += size
                    train.append((item.future, item.op))
                    took_train = True
                elif took_train:  # calls run before the batch, so this one waits for the next round
                    break
                else:
                    calls.append((item.future, item.op))
                queue.pop_head()
        return calls, train

    def _ready(self, op: SampleOp) -> bool:
        return op.adapter is None or self.residency.ready(op.adapter, op.priority)

    def _ready_queues(self) -> list[deque[tuple[Future, SampleOp]]]:
        """Sample queues whose head can be placed now. A queue whose head waits on a cold load leaves
        the scan until the loader reports that load, so a turn costs the same however many requests
        wait on loads (a wave of a thousand cold adapters must not slow the resident traffic's steps).
        Holds `_cv`, which the loader's report also takes: none is lost between a look and a wait."""
        for content_hash in self._loaded:
            for sampler_id in self._waiters.pop(content_hash, ()):
                self._samples[sampler_id] = self._on_load.pop(sampler_id)
        self._loaded.clear()
        ready = []
        for sampler_id, queue in list(self._samples.items()):
            if not queue:
                del self._samples[sampler_id]
            elif self._ready(queue[0][1]):
                ready.append(queue)
            else:  # only a saved revision is ever not ready
                self._on_load[sampler_id] = self._samples.pop(sampler_id)
                self._waiters.setdefault(queue[0][1].adapter.content_hash, []).append(sampler_id)
        return ready

    def _take_samples(self) -> list[tuple[Future, SampleOp]]:
        """Samples whose adapter is at hand and that fit the step engine now: `max_sample_rows` rows (a
        request with n samples is n rows; one larger than the cap runs alone) and free KV cache. Higher
        priority first; within a priority, sampling sessions round-robin. The first that does not fit
        stops the taking (no overtaking)."""
        steps = self.engine.steps
        rows = steps.running_rows
        blocks = steps.pool.free_blocks - steps.pool.reserved
        taken: list[tuple[Future, SampleOp]] = []
        queues = self._ready_queues()
        while queues:
            q = min(queues, key=lambda q: q[0][1].priority)  # min keeps the first of equals: round-robin
            fut, op = q[0]
            need = steps.blocks_for(op.request)
            never_fits = need > steps.pool.num_blocks  # taken at once: admitting it answers its 400
            busy = bool(taken or self._live) and not never_fits
            if busy and (rows + op.request.num_samples > self.limits.max_sample_rows or need > blocks):
                break
            q.popleft()
            taken.append((fut, op))
            if not never_fits:
                rows += op.request.num_samples
                blocks -= need
            queues.remove(q)
            if q and self._ready(q[0][1]):
                queues.append(q)
        return taken

    def _run_call(self, fut: Future | None, op: CallOp) -> None:
        try:
            result = op.fn(self.engine)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the future's error
            if fut is not None:
                self.futures.resolve(fut, error=_as_request_error(exc))
            return
        if fut is not None:
            self.futures.resolve(fut, result)

    def _run_train(self, items: list[tuple[Future, TrainOp]]) -> None:
        held = []
        for fut, op in items:
            try:
                op.group.slot = self.residency.acquire(op.run)
                held.append((fut, op))
            except Exception as exc:  # noqa: BLE001 - a run unloaded meanwhile, or no room at all
                self.futures.resolve(fut, error=_as_request_error(exc))
        try:
            self._train_batches(held)
        finally:
            for _, op in held:
                self.residency.release(op.run)

    def _train_batches(self, items: list[tuple[Future, TrainOp]]) -> None:
        for forward_only in (False, True):
            batch = [
                (f, op)
                for f, op in items
                if op.forward_only == forward_only
                and self._valid(f, lambda op=op, fo=forward_only: self.engine.check_train(op.group, fo))
            ]
            if not batch:
                continue
            try:
                outputs = self.engine.forward_backward(
                    [op.group for _, op in batch], forward_only=forward_only
                )
            except Exception as exc:  # noqa: BLE001 - checked already, so this is the server's fault
                for fut, _ in batch:
                    self.futures.resolve(fut, error=_as_request_error(exc, "server"))
                continue
            for (fut, op), out in zip(batch, outputs, strict=True):
                self.futures.resolve(fut, op.finish(out))

    def _admit(self, items: list[tuple[Future, SampleOp]]) -> None:
        """Into the step engine (they join at the next step), each holding its adapter from now until it
        finishes; one whose adapter must wait goes back to the head of its queue."""
        deferred: list[tuple[Future, SampleOp]] = []
        for fut, op in items:
            try:
                self._place(op)
            except Wait:  # no room yet, or its cold load is still running
                deferred.append((fut, op))
                continue
            except Exception as exc:  # noqa: BLE001
                self.futures.resolve(fut, error=_as_request_error(exc))
                continue
            self._live[self.engine.submit(op.request, int(op.priority))] = (fut, op)
        self._defer(deferred)

    def _step(self) -> None:
        """One sampling step; finished samples release their adapters and resolve their futures."""
        try:
            self.engine.step()
        except Exception as exc:  # noqa: BLE001 - checked already, so this is the server's fault
            self.engine.steps.abort()
            self._abort_samples(_as_request_error(exc, "server"))
            return
        for state in [s for s in self._live if s.done]:
            fut, op = self._live.pop(state)
            self._release(op)
            self.futures.resolve(fut, op.finish(state.result))

    def _abort_samples(self, error: RequestError) -> None:
        for fut, op in list(self._live.values()):
            self._release(op)
            if not fut.done:
                self.futures.resolve(fut, error=error)
        self._live.clear()

    def _release(self, op: SampleOp) -> None:
        if op.adapter is not None:
            self.residency.release(op.adapter)

    def _place(self, op: SampleOp) -> None:
        """Give the request its adapter's slot and check it; on failure the adapter is not left
        referenced."""
        if op.adapter is not None:
            op.request.slot = self.residency.acquire(op.adapter)
        try:
            self.engine.check_sample(op.request)
        except Exception:
            if op.adapter is not None:
                self.residency.release(op.adapter)
            raise

    def _defer(self, items: list[tuple[Future, SampleOp]]) -> None:
        """Back to the head of their queues, to ask again at the next turn."""
        with self._cv:
            for fut, op in reversed(items):
                self._queue(op.sampler_id).appendleft((fut, op))

    def _valid(self, fut: Future, check: Callable[[], None]) -> bool:
        try:
            check()
        except Exception as exc:  # noqa: BLE001
            self.futures.resolve(fut, error=_as_request_error(exc))
            return False
        return True


def _queued(queue: _RunQueue) -> list[_Queued]:
    return [*queue.waiting.values(), *(item for _, item in queue.unsequenced)]


def _as_request_error(exc: Exception, blame: str = "user") -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if blame == "user" and isinstance(exc, (ValueError, LookupError, FileNotFoundError)):
        return RequestError(str(exc).strip("'\""), "user")
    log.exception("engine work failed", exc_info=exc)
    return RequestError(f"internal error: {type(exc).__name__}", "server")
