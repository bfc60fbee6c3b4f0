"""Sequence records: session ownership and the sliding TTL, on a fake clock."""

import pytest

from mintd.engine.sampling import SampledSequence
from mintd.service.provenance import SequenceRecords


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(clock: Clock, **kwargs) -> SequenceRecords:
    store = SequenceRecords(ttl_s=100.0, clock=clock, **kwargs)
    seqs = [SampledSequence([5, 6], [-0.5, -1.5], "length"), SampledSequence([7], [-0.25], "length")]
    store.record("session-a", ["a:1:0", "a:1:1"], [1, 2, 3], seqs)
    return store


def test_records_keep_tokens_and_sampler_logprobs_for_their_session():
    store = records(Clock())
    rec = store.use("session-a", "a:1:0", "where")
    assert rec.prompt.tolist() == [1, 2, 3] and rec.tokens.tolist() == [5, 6]
    assert rec.logprobs.tolist() == [-0.5, -1.5]
    with pytest.raises(ValueError, match="where: sequence_id 'a:1:0' is unknown or expired"):
        store.use("session-b", "a:1:0", "where")  # another session's sequence reads as unknown


def test_ttl_slides_with_each_use_and_expiry_forgets():
    clock = Clock()
    store = records(clock)
    clock.now += 90
    store.use("session-a", "a:1:0", "x")  # used at 90 s: its day (here 100 s) restarts
    clock.now += 90
    store.use("session-a", "a:1:0", "x")
    with pytest.raises(ValueError, match="unknown or expired"):
        store.use("session-a", "a:1:1", "x")  # unused for 180 s: gone
    clock.now += 101
    with pytest.raises(ValueError, match="unknown or expired"):
        store.use("session-a", "a:1:0", "x")
    assert len(store) == 0


def test_the_least_recently_used_go_beyond_the_cap():
    clock = Clock()
    store = records(clock, max_sequences=2)
    store.use("session-a", "a:1:0", "x")
    store.record("session-a", ["a:2:0"], [1], [SampledSequence([9], [-1.0], "length")])
    assert len(store) == 2
    store.use("session-a", "a:1:0", "x")
    with pytest.raises(ValueError):
        store.use("session-a", "a:1:1", "x")
