"""Shared by the residency benchmarks: an in-process mintd service over a tiny model, a catalog
filled with many distinct saved adapters, and a way to sample them through the service."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout


from mintd.catalog import NewRevision, Provenance  # noqa: E402
from mintd.config import ServeSettings  # noqa: E402
from mintd.engine.sampling import SamplingParams  # noqa: E402
from mintd.engine.tiny import make_tiny_model, random_adapter  # noqa: E402
from mintd.server import build_app, freeze_startup_heap  # noqa: E402
from mintd.service.futures import Future, FutureStore  # noqa: E402
from mintd.service.tinker import TinkerService  # noqa: E402
from mintd.store.packed import pack  # noqa: E402

OWNER = "local"
PROMPT = [5, 17, 33, 2]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def wait_for(futures: FutureStore, fut: Future, timeout: float = 600.0) -> Any:
    """`fut`'s result once it is resolved; raises its error. Woken by the resolving thread, never
    polling: a benchmark's pollers would take the GIL, and the cores, from the engine they measure."""
    done = threading.Event()
    futures.on_done(fut, lambda _: done.set())
    if not done.wait(timeout):
        raise TimeoutError(f"{fut.request_id} did not finish in {timeout}s")
    if fut.error is not None:
        raise RuntimeError(str(fut.error))
    return fut.result


def rss_mb() -> float:
    """Resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def start(work: Path, size: str = "test", **settings: object) -> TinkerService:
    model_dir = work / f"model-{size}"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, "qwen3", seed=0, size=size)
    limits = {"max_samplers_per_owner": 10**7, "max_sessions_per_owner": 10**6}
    _, service = build_app({"tiny": model_dir}, ServeSettings(data_dir=work / "data", **limits, **settings))
    freeze_startup_heap()  # as `mintd serve` does
    return service


def add_adapters(
    service: TinkerService, count: int, prefix: str, ranks: tuple[int, ...], seed: int
) -> list[str]:
    """`count` distinct random adapters (ranks cycling through `ranks`) as catalog revisions; their refs."""
    engine = service.models["tiny"].engine
    rows, refs = [], []
    for i in range(count):
        spec, tensors = random_adapter(engine, ranks[i % len(ranks)], seed * 10**7 + i)
        data = pack(spec, tensors, engine.fingerprint)
        provenance = Provenance(engine.fingerprint, "tiny", engine.lora_provenance(spec))
        name = f"{prefix}{i}"
        rows.append(
            NewRevision(
                name, service.checkpoints.blobs.put(data), "sampler", provenance, size_bytes=len(data)
            )
        )
        refs.append(f"{name}@1")
        if len(rows) == 10_000:
            service.catalog.register_revisions_bulk(OWNER, rows)
            rows = []
            log(f"{i + 1:,} adapters in the catalog")
    if rows:
        service.catalog.register_revisions_bulk(OWNER, rows)
    return refs


class Client:
    """Samples adapters through the service's Tinker sampling path (sessions, samplers, futures)."""

    def __init__(self, service: TinkerService, max_tokens: int = 1) -> None:
        self.service = service
        self.session = service.create_session(OWNER, [], {})
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        self._samplers: dict[str, str] = {}
        self._seq = 0

    def submit(self, ref: str) -> Future:
        sampler = self._samplers.get(ref)
        if sampler is None:
            self._seq += 1
            sampler = self.service.create_sampling_session(OWNER, self.session, self._seq, None, ref)
            self._samplers[ref] = sampler
        self._seq += 1
        fut, _ = self.service.sample(OWNER, sampler, self._seq, PROMPT, 1, self.params, False, 0, None)
        return fut

    def wait(self, fut: Future, timeout: float = 600.0) -> None:
        wait_for(self.service.futures, fut, timeout)

    def sample(self, ref: str) -> float:
        """Seconds from submitting a sample of `ref` to its answer."""
        started = time.perf_counter()
        self.wait(self.submit(ref))
        return time.perf_counter() - started

    def forget(self, ref: str) -> None:
        """Drop the sampler kept for `ref` (a sweep samples each adapter once)."""
        sampler = self._samplers.pop(ref, None)
        if sampler is not None:
            self.service.registry.drop_sampler(sampler)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
