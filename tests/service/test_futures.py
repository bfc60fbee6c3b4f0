"""FutureStore on its own: idempotent creation by key, long-poll wake-ups across threads, expiry."""

from __future__ import annotations

import asyncio
import threading
import time

from mintd.service.futures import FutureStore, RequestError


def test_create_is_idempotent_by_key() -> None:
    store = FutureStore(retention_s=60)
    first, created = store.create("ForwardBackward", "alice", ("run", "m", 1))
    again, created_again = store.create("ForwardBackward", "alice", ("run", "m", 1))
    other, created_other = store.create("ForwardBackward", "alice", ("run", "m", 2))
    assert created and not created_again and created_other
    assert again is first and again.request_id == first.request_id
    assert other.request_id != first.request_id
    assert store.get(first.request_id, "alice") is first


def test_create_without_key_is_always_new() -> None:
    store = FutureStore(retention_s=60)
    ids = {store.create("Call", "alice")[0].request_id for _ in range(5)}
    assert len(ids) == 5


def test_duplicate_key_after_resolve_still_gets_the_first_result() -> None:
    store = FutureStore(retention_s=60)
    fut, _ = store.create("OptimStep", "alice", ("run", "m", 3))
    store.resolve(fut, {"metrics": {"grad_norm": 1.0}})
    again, created = store.create("OptimStep", "alice", ("run", "m", 3))
    assert not created and again is fut and again.result == {"metrics": {"grad_norm": 1.0}}


def test_wait_wakes_on_resolve_from_another_thread() -> None:
    store = FutureStore(retention_s=60)
    fut, _ = store.create("Sample", "alice")
    timer = threading.Timer(0.2, store.resolve, args=(fut, {"ok": True}))

    async def poll() -> tuple[bool, float]:
        started = time.monotonic()
        timer.start()
        done = await store.wait(fut, timeout=10.0)
        return done, time.monotonic() - started

    done, elapsed = asyncio.run(poll())
    assert done and fut.result == {"ok": True}
    assert 0.1 < elapsed < 5.0, f"woke after {elapsed:.2f}s: the resolve did not wake the long-poll"


def test_wait_wakes_every_waiter() -> None:
    store = FutureStore(retention_s=60)
    fut, _ = store.create("Sample", "alice")

    async def polls() -> list[bool]:
        waiters = [asyncio.create_task(store.wait(fut, timeout=10.0)) for _ in range(4)]
        await asyncio.sleep(0.05)
        threading.Thread(target=store.resolve, args=(fut, "done")).start()
        return await asyncio.wait_for(asyncio.gather(*waiters), timeout=5.0)

    assert asyncio.run(polls()) == [True] * 4


def test_wait_on_a_done_future_returns_at_once() -> None:
    store = FutureStore(retention_s=60)
    fut, _ = store.create("Call", "alice")
    store.resolve(fut, error=RequestError("bad input", "user"))
    started = time.monotonic()
    assert asyncio.run(store.wait(fut, timeout=10.0))
    assert time.monotonic() - started < 1.0
    assert str(fut.error) == "bad input" and fut.error.category == "user"


def test_wait_times_out_and_leaves_no_waiter_behind() -> None:
    store = FutureStore(retention_s=60)
    fut, _ = store.create("Call", "alice")
    for _ in range(3):  # each try_again poll of a pending future
        assert asyncio.run(store.wait(fut, timeout=0.05)) is False
    assert fut._waiters == []
    store.resolve(fut, "late")  # the polls' event loops are closed by now: this must not raise
    assert fut.done and fut.result == "late"


def test_completed_futures_expire_after_retention() -> None:
    store = FutureStore(retention_s=0.2)
    done, _ = store.create("OptimStep", "alice", ("run", "m", 1))
    pending, _ = store.create("OptimStep", "alice", ("run", "m", 2))
    store.resolve(done, {"ok": True})
    assert store.get(done.request_id, "alice") is done
    time.sleep(0.35)
    assert store.get(done.request_id, "alice") is None
    assert store.get(pending.request_id, "alice") is pending, "a future still running must never expire"
    fresh, created = store.create("OptimStep", "alice", ("run", "m", 1))
    assert created and fresh.request_id != done.request_id
    again, created = store.create("OptimStep", "alice", ("run", "m", 2))
    assert not created and again is pending


def test_futures_expire_in_the_order_they_completed() -> None:
    store = FutureStore(retention_s=0.3)
    first, _ = store.create("Sample", "alice", ("s", 1))
    second, _ = store.create("Sample", "alice", ("s", 2))
    store.resolve(second, "early")
    store.resolve(second, "twice")  # resolved twice: still forgotten once, without error
    time.sleep(0.2)
    store.resolve(first, "late")
    time.sleep(0.15)  # `second` completed 0.35 s ago, `first` 0.15 s ago
    assert store.get(second.request_id, "alice") is None and not store.known(("s", 2))
    assert store.get(first.request_id, "alice") is first and store.known(("s", 1))
    time.sleep(0.2)
    assert store.get(first.request_id, "alice") is None and not store.known(("s", 1))


def test_ids_are_unguessable_and_owned() -> None:
    store = FutureStore(retention_s=60)
    fut, _ = store.create("Sample", "alice", session_id="s-1")
    ids = {store.create("Sample", "alice")[0].request_id for _ in range(100)} | {fut.request_id}
    assert len(ids) == 101 and all(len(i) >= len("req-") + 22 for i in ids)  # 128 random bits each
    assert store.get(fut.request_id, "bob") is None, "another owner's future must look unknown"
    assert store.get(fut.request_id, "alice") is fut


def test_busy_sessions_track_unfinished_work() -> None:
    store = FutureStore(retention_s=60)
    a1, _ = store.create("Sample", "alice", session_id="s-a")
    a2, _ = store.create("Sample", "alice", session_id="s-a")
    store.create("Call", "bob")  # no session: never counted
    assert store.busy_sessions() == {"s-a"}
    store.resolve(a1, "x")
    store.resolve(a1, "again")  # resolving twice must not count twice
    assert store.busy_sessions() == {"s-a"}
    store.resolve(a2, "y")
    assert store.busy_sessions() == set()


def test_on_done_runs_once_resolved_or_at_once_when_already_done() -> None:
    store = FutureStore(retention_s=60)
    seen: list[tuple[str, object]] = []
    pending, _ = store.create("Sample", "alice")
    store.on_done(pending, lambda f: seen.append(("pending", f.result)))
    assert seen == []
    store.resolve(pending, 7)
    store.resolve(pending, 8)  # a second resolve does not call it again
    done, _ = store.create("Sample", "alice")
    store.resolve(done, error=RequestError("boom"))
    store.on_done(done, lambda f: seen.append(("done", str(f.error))))
    assert seen == [("pending", 7), ("done", "boom")]
