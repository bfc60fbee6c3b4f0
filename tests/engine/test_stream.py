"""Streaming: tokens reach a reader per step, equal to the final result; a cancelled stream stops."""

from __future__ import annotations

from mintd.engine.adapters import BASE_SLOT
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.stream import TokenStream


def _drain(stream: TokenStream) -> list:
    events = []
    while (event := stream.get(timeout=5)) is not None:
        events.append(event)
    return events


def test_streamed_tokens_equal_the_result(engine) -> None:
    stream = TokenStream()
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    request = SampleRequest(BASE_SLOT, [1, 2, 3], params, num_samples=2, stream=stream)
    (result,) = engine.sample([request])
    events = _drain(stream)
    for i, seq in enumerate(result.sequences):
        mine = [e for e in events if e.sample_index == i]
        assert [e.token for e in mine] == seq.tokens
        assert [e.logprob for e in mine] == seq.logprobs
        assert [e.stop_reason for e in mine] == [None] * 5 + ["length"]


def test_a_cancelled_stream_stops_its_rows_at_the_next_step(engine) -> None:
    stream = TokenStream()
    stream.cancel()
    params = SamplingParams(max_tokens=50, temperature=0.0, stop=[])
    other = SampleRequest(BASE_SLOT, [4, 5], params)
    cancelled = SampleRequest(BASE_SLOT, [1, 2, 3], params, stream=stream)
    result, kept = engine.sample([cancelled, other])
    assert len(result.sequences[0].tokens) == 1 and result.sequences[0].stop_reason == "cancelled"
    assert len(kept.sequences[0].tokens) == 50
    assert len(_drain(stream)) == 1
