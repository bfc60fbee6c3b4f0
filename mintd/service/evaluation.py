"""Evaluation runs: many revisions × one eval set, sampled in shared engine batches, scored, recorded.

A run expands its revision set in the catalog (explicit refs, an adapter's revisions, a name prefix),
tokenizes the eval set once per base model, and submits every (revision, prompt) as a bulk-priority
sample op to the base model's engine worker, revision after revision, keeping a bounded window in
flight. The worker batches them with everyone else's samples and asks residency for each revision's
slot, so any number of revisions runs within the device byte budget (those that do not fit wait for
the next batch). Revisions with identical bytes are sampled once.

When a revision's last prompt is answered it is scored (`mintd.eval`), its rows go to the run's JSONL
results, and its score is recorded as a catalog evaluation (suite, metric, value, with n, the eval
set's fingerprint, the sampling parameters and the scorer in its metadata), which gated promotes read.
A revision that cannot be sampled (a corrupt blob, a base this server does not serve) is reported
with its error and the run goes on. At the end the run tallies the population's majority answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from mintd.catalog import Catalog, Revision
from mintd.catalog import validate as catalog_validate
from mintd.catalog.errors import CatalogNotFound
from mintd.config import MAX_EVAL_REVISIONS
from mintd.engine.adapters import BASE_SLOT
from mintd.engine.sampling import SampleRequest, SampleResult, SamplingParams, validate
from mintd.eval import EvalItem, RevisionScore, Sample, ScorerSpec, Tally, fingerprint
from mintd.service.errors import NotFound, QuotaExceeded
from mintd.service.futures import Future, FutureStore, RequestError
from mintd.service.scheduler import EngineWorker, Priority, SampleOp

log = logging.getLogger(__name__)
EVALUATOR = "mintd eval"
_PAGE = 1000


class _Engine(Protocol):
    tokenizer: Any
    vocab_size: int
    max_len: int


class Base(Protocol):
    """What a run needs of a served base model (the service's model handle has it)."""

    name: str
    engine: _Engine
    worker: EngineWorker


@dataclass(frozen=True, slots=True)
class RevisionSet:
    """Which revisions to evaluate; the parts add up (duplicates count once)."""

    refs: tuple[str, ...] = ()
    adapter: str | None = None  # every live revision of this adapter
    prefix: str | None = None  # every adapter whose name starts with this: its newest revision ...
    alias: str | None = None  # ... or, with an alias, what that alias points at (adapters without it skipped)
    limit: int = MAX_EVAL_REVISIONS


@dataclass(frozen=True, slots=True)
class EvalSpec:
    revisions: RevisionSet
    items: list[EvalItem]
    sampling: SamplingParams
    scorer: ScorerSpec | None  # None: collect outputs only (a client scores them with its own scorer)
    suite: str
    metric: str | None = None  # default: the scorer's kind
    record: bool = True


@dataclass(eq=False)
class _Group:
    """Revisions with the same bytes and base: sampled once, reported per revision."""

    revisions: list[Revision]
    base: Base | None
    tokens: list[list[int] | None]  # per item: the output tokens, once answered
    answered: int = 0
    error: str | None = None
    closed: bool = False  # scored (or failed) and written out


class EvalRun:
    def __init__(self, run_id: str, owner: str, spec: EvalSpec, results: Path, future: Future) -> None:
        self.id = run_id
        self.owner = owner
        self.spec = spec
        self.metric = spec.metric or (spec.scorer.kind if spec.scorer else None)
        self.fingerprint = fingerprint(spec.items)
        self.results = results
        self.future = future
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.status = "running"  # -> done | cancelled | failed
        self.failure: str | None = None  # why the whole run failed (never `error`: a future's error key)
        self.groups: list[_Group] = []
        self.prompts: dict[str, list[list[int]]] = {}  # base model name -> tokens per item
        self.revision_count = 0
        self.samples_done = 0
        self.tally = Tally(spec.items, spec.scorer.build()) if spec.scorer else None
        self.scores: list[dict[str, Any]] = []  # per revision, as they finish
        self.summary: dict[str, Any] | None = None
        self.record_errors: list[str] = []
        self.cancelled = threading.Event()

    @property
    def samples_total(self) -> int:
        return len(self.groups) * len(self.spec.items)

    def view(self) -> dict[str, Any]:
        """The run as JSON: settings, progress, and once finished every revision's score and the summary."""
        finished = self.status != "running"
        failed = sum(1 for s in self.scores if s["error"] is not None)
        return {
            "run_id": self.id,
            "request_id": self.future.request_id,
            "status": self.status,
            "failure": self.failure,
            "suite": self.spec.suite,
            "metric": self.metric,
            "record": self.spec.record,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "eval_set": {"items": len(self.spec.items), "fingerprint": self.fingerprint},
            "sampling_params": self.spec.sampling.model_dump(),
            "scorer": None if self.spec.scorer is None else self.spec.scorer.model_dump(),
            "progress": {
                "samples_done": self.samples_done,
                "samples_total": self.samples_total,
                "revisions_done": len(self.scores),
                "revisions_total": self.revision_count,
                "revisions_failed": failed,
            },
            "revisions": sorted(self.scores, key=_rank) if finished else None,
            "summary": self.summary,
            "record_errors": self.record_errors,
        }


def _rank(score: dict[str, Any]) -> tuple:
    return (score["score"] is None, -(score["score"] or 0.0), score["revision"])


class _Closed(Exception):
    """The server is closing: the run stops waiting for answers that will not come."""


class EvaluationRuns:
    """The evaluation runs of one server process, per owner; finished ones are kept `retention_s`."""

    def __init__(
        self,
        catalog: Catalog,
        futures: FutureStore,
        base_of: Callable[[Revision], Base],
        data_dir: Path,
        *,
        max_sample_rows: int,
        retention_s: float,
        max_running_per_owner: int,
    ) -> None:
        self.catalog = catalog
        self.futures = futures
        self.base_of = base_of
        self.folder = Path(data_dir) / "evaluations"
        self.window = 4 * max_sample_rows  # in flight per run: enough to fill several batches
        self.retention_s = retention_s
        self.max_running = max_running_per_owner
        self._lock = threading.RLock()
        self._runs: dict[str, EvalRun] = {}
        self._closed = threading.Event()

    # requests -------------------------------------------------------------------------------------

    def start(self, owner: str, spec: EvalSpec) -> EvalRun:
        """Check everything, expand and tokenize, then run in the background; bad input raises here."""
        catalog_validate.text(spec.suite, "suite", optional=False, max_len=128)
        if spec.metric is not None:
            catalog_validate.text(spec.metric, "metric", optional=False, max_len=128)
        if spec.scorer is None and spec.record:
            raise ValueError("scorer: required to record evaluations (set record to false to only sample)")
        if spec.scorer is not None:
            spec.scorer.build().check(spec.items)
        self._check_quota(owner)  # before the expensive part, and again when the run is added
        revisions = expand(self.catalog, owner, spec.revisions)
        groups, prompts = _groups(revisions, spec, self.base_of)
        run_id = f"eval-{secrets.token_urlsafe(12)}"
        with self._lock:
            self._check_quota(owner)
            future, _ = self.futures.create("EvaluationRun", owner)
            run = EvalRun(run_id, owner, spec, self.folder / f"{run_id}.jsonl", future)
            run.groups, run.prompts, run.revision_count = groups, prompts, len(revisions)
            self._runs[run_id] = run
        self.folder.mkdir(parents=True, exist_ok=True)
        run.results.touch()  # downloadable (empty) from the first answer on
        threading.Thread(target=self._execute, args=(run,), name=f"mintd-{run_id}", daemon=True).start()
        return run

    def _check_quota(self, owner: str) -> None:
        with self._lock:  # re-entrant: `start` calls it holding the lock too
            self._expire()
            running = sum(1 for r in self._runs.values() if r.owner == owner and r.status == "running")
        if running >= self.max_running:
            raise QuotaExceeded(f"evaluation runs: {owner} already has {running} running (the limit)")

    def get(self, owner: str, run_id: str) -> EvalRun:
        with self._lock:
            self._expire()
            run = self._runs.get(run_id)
        if run is None or run.owner != owner:
            raise NotFound(f"run_id: evaluation run {run_id!r} not found")
        return run

    def list(self, owner: str) -> list[EvalRun]:
        with self._lock:
            self._expire()
            return sorted((r for r in self._runs.values() if r.owner == owner), key=lambda r: r.created_at)

    def cancel(self, owner: str, run_id: str) -> EvalRun:
        """Stop submitting; what is in flight finishes, revisions not complete are reported cancelled."""
        run = self.get(owner, run_id)
        run.cancelled.set()
        return run

    def close(self) -> None:
        self._closed.set()

    def _expire(self) -> None:
        cutoff = time.time() - self.retention_s
        for run_id, run in list(self._runs.items()):
            if run.finished_at is not None and run.finished_at < cutoff:
                del self._runs[run_id]
                run.results.unlink(missing_ok=True)

    # the run (its own thread) ----------------------------------------------------------------------

    def _execute(self, run: EvalRun) -> None:
        try:
            with run.results.open("w", encoding="utf-8") as out:
                self._sample_all(run, out)
                if run.tally is not None:
                    votes = run.tally.votes()
                    for vote in votes:
                        _write(out, {"type": "population", **vote.as_json()})
                    run.summary = run.tally.summary(votes)
                else:
                    failed = sum(1 for s in run.scores if s["error"] is not None)
                    run.summary = {"revisions": run.revision_count, "failed": failed}
                _write(out, {"type": "summary", **run.summary})
            run.status = "cancelled" if run.cancelled.is_set() else "done"
        except _Closed:
            run.status, run.failure = "failed", "the server shut down before the run finished"
        except Exception as exc:  # noqa: BLE001 - a bug fails this run, never the server
            log.exception("evaluation run %s failed", run.id)
            run.status, run.failure = "failed", f"internal error: {type(exc).__name__}"
        run.finished_at = time.time()
        if run.status == "failed":
            self.futures.resolve(run.future, error=RequestError(run.failure or "failed", "server"))
        else:
            self.futures.resolve(run.future, run.view())

    def _sample_all(self, run: EvalRun, out: IO[str]) -> None:
        """Submit revision-major within the window; score each group as its last answer comes in."""
        cv = threading.Condition()
        done: deque[_Group] = deque()
        todo = deque((g, j) for g in run.groups for j in range(len(run.spec.items)))
        in_flight = 0

        def settle(group: _Group, finished: list[_Group] | deque[_Group]) -> None:  # holds cv
            run.samples_done += 1
            group.answered += 1
            if group.answered == len(group.tokens):
                finished.append(group)

        def answered(group: _Group, j: int, fut: Future) -> None:  # on the engine worker's thread
            nonlocal in_flight
            with cv:
                in_flight -= 1
                if fut.error is not None:
                    group.error = group.error or str(fut.error)
                else:
                    group.tokens[j] = fut.result.sequences[0].tokens
                settle(group, done)
                cv.notify()

        while True:
            with cv:
                while not (
                    done
                    or in_flight == 0
                    or (todo and in_flight < self.window and not run.cancelled.is_set())
                    or self._closed.is_set()
                ):
                    cv.wait(1.0)
                finished, submit = list(done), []
                done.clear()
                while todo and in_flight < self.window and not run.cancelled.is_set():
                    group, j = todo.popleft()
                    if group.error is not None:  # a failed revision's remaining prompts are not sent
                        settle(group, finished)
                    else:
                        in_flight += 1
                        submit.append((group, j))
                over = in_flight == 0 and (not todo or run.cancelled.is_set())
            if self._closed.is_set():
                raise _Closed
            for group, j in submit:
                self._submit(run, group, j, answered)
            for group in finished:
                self._finish(run, group, out)
            if over:
                break
        for group in run.groups:
            if not group.closed:
                group.error = group.error or "cancelled before it was evaluated"
                self._finish(run, group, out)

    def _submit(self, run: EvalRun, group: _Group, j: int, answered: Callable) -> None:
        assert group.base is not None
        request = SampleRequest(BASE_SLOT, list(run.prompts[group.base.name][j]), run.spec.sampling)
        fut = Future(f"{run.id}:{j}", "EvaluationSample", run.owner)
        self.futures.on_done(fut, lambda f: answered(group, j, f))
        # a queue per revision: one whose adapter is still loading does not hold up the others' samples
        queue = f"{run.id}/{group.revisions[0].id}"
        op = SampleOp(request, _same, queue, adapter=group.revisions[0], priority=Priority.BULK)
        group.base.worker.submit_sample(fut, op)

    def _finish(self, run: EvalRun, group: _Group, out: IO[str]) -> None:
        """Score a group's revisions (or report their error), write their rows, record evaluations."""
        group.closed = True
        if group.error is not None:
            for rev in group.revisions:
                failed = RevisionScore(rev.ref, None, 0, 0.0, group.error)
                if run.tally is not None:
                    run.tally.fail(rev.ref, group.error)
                run.scores.append(failed.as_json())
                _write(out, {"type": "revision", **failed.as_json()})
            return
        assert group.base is not None
        decode = group.base.engine.tokenizer.decode
        outputs = [decode(t, skip_special_tokens=True) for t in group.tokens]
        for rev in group.revisions:
            if run.tally is None:
                for item, output in zip(run.spec.items, outputs, strict=True):
                    _write(out, Sample(item.id, output, None, None).row(rev.ref))
                score = RevisionScore(rev.ref, None, len(outputs), 0.0).as_json()
            else:
                result, samples = run.tally.add(rev.ref, outputs)
                for s in samples:
                    _write(out, s.row(rev.ref))
                score = result.as_json()
                if run.spec.record:
                    self._record(run, rev, result.score, result.n)
            run.scores.append(score)
            _write(out, {"type": "revision", **score})
        out.flush()

    def _record(self, run: EvalRun, rev: Revision, value: float, n: int) -> None:
        metadata = {
            "n": n,
            "eval_run": run.id,
            "sampling_params": run.spec.sampling.model_dump(),
            "scorer": run.spec.scorer.model_dump() if run.spec.scorer else None,
        }
        try:
            self.catalog.add_evaluation(
                run.owner,
                rev.ref,
                run.spec.suite,
                run.metric,
                value,
                dataset_fingerprint=run.fingerprint,
                evaluator=EVALUATOR,
                metadata=metadata,
            )
        except (ValueError, LookupError) as exc:  # e.g. deleted while it was evaluated
            run.record_errors.append(f"{rev.ref}: {exc}")


def expand(catalog: Catalog, owner: str, revisions: RevisionSet) -> list[Revision]:
    """The live revisions a revision set names, each once, in the order named; ValueError naming the
    field when a ref is bad, nothing matches, or more than `limit` match."""
    limit = catalog_validate.limit(revisions.limit, "revisions.limit", MAX_EVAL_REVISIONS)
    found: dict[int, Revision] = {}

    def add(rev: Revision) -> None:
        found.setdefault(rev.id, rev)
        if len(found) > limit:
            raise ValueError(
                f"revisions: more than {limit} revisions match; narrow the set or raise revisions.limit "
                f"(at most {MAX_EVAL_REVISIONS})"
            )

    for i, ref in enumerate(revisions.refs):
        add(catalog.resolve(owner, ref, field=f"revisions.refs[{i}]"))
    if revisions.adapter is not None:
        catalog_validate.name(revisions.adapter, "revisions.adapter")
        before = None
        while page := catalog.log(owner, revisions.adapter, limit=_PAGE, before=before):
            for rev in page:
                add(rev)
            before = page[-1].number
    if revisions.alias is not None and revisions.prefix is None:
        raise ValueError(
            "revisions.alias: needs revisions.prefix (for one adapter, name adapter:alias in refs)"
        )
    if revisions.prefix is not None:
        if revisions.alias is not None:
            catalog_validate.name(revisions.alias, "revisions.alias")
        after = None
        while adapters := catalog.list_adapters(owner, prefix=revisions.prefix, limit=_PAGE, after=after):
            for adapter in adapters:
                ref = adapter.name if revisions.alias is None else f"{adapter.name}:{revisions.alias}"
                with contextlib.suppress(CatalogNotFound):  # no live revision or no such alias: skipped
                    add(catalog.resolve(owner, ref))
            after = adapters[-1].name
    if not found:
        raise ValueError("revisions: no live revision matches (give refs, an adapter or a prefix)")
    return list(found.values())


def _groups(
    revisions: list[Revision], spec: EvalSpec, base_of: Callable[[Revision], Base]
) -> tuple[list[_Group], dict[str, list[list[int]]]]:
    """One group per content hash (and recorded base); each base's prompts tokenized and checked once
    (bad ones raise)."""
    prompts: dict[str, list[list[int]]] = {}
    groups: dict[tuple[str, str], _Group] = {}
    for rev in revisions:
        key = (rev.content_hash, rev.provenance.base_fingerprint)
        if key in groups:
            groups[key].revisions.append(rev)
            continue
        group = groups[key] = _Group([rev], None, [None] * len(spec.items))
        try:
            group.base = base_of(rev)
        except ValueError as exc:  # trained on a base this server does not serve: reported, not fatal
            group.error = str(exc)
            continue
        if group.base.name not in prompts:
            prompts[group.base.name] = _tokenize(spec.items, spec.sampling, group.base.engine)
    return list(groups.values()), prompts


def _tokenize(items: list[EvalItem], params: SamplingParams, engine: _Engine) -> list[list[int]]:
    out = []
    for i, item in enumerate(items):
        if item.prompt is not None:
            tokens = engine.tokenizer.encode(item.prompt)
        else:
            tokens = engine.tokenizer.apply_chat_template(
                list(item.messages or ()), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        try:
            validate(SampleRequest(BASE_SLOT, tokens, params), engine.vocab_size, engine.max_len)
        except ValueError as exc:
            raise ValueError(f"eval_set[{i}]: {exc}") from None
        out.append(list(tokens))
    return out


def _same(result: SampleResult) -> SampleResult:
    return result


def _write(out: IO[str], row: dict[str, Any]) -> None:
    out.write(json.dumps(row, ensure_ascii=False) + "\n")
