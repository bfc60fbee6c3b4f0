"""The step loop: requests join a running batch and get exactly what they get alone; a short request
overtakes a long one; n samples share one prefill; the paged cache gives every block back."""

from __future__ import annotations

import pytest

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.step.sequence import RequestState
from mintd.engine.tiny import frozen_random


def _adapter(engine: Engine, rank: int, seed: int) -> int:
    """A frozen adapter with non-zero B (a fresh one would equal the base)."""
    return frozen_random(engine, engine.create_adapter(LoraSpec(rank=rank, seed=seed)), seed)


def _greedy(slot: int, prompt: list[int], max_tokens: int, n: int = 1, **kw) -> SampleRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[])
    return SampleRequest(slot, prompt, params, num_samples=n, **kw)


def _run_until(engine: Engine, states: list[RequestState], steps: int) -> None:
    for _ in range(steps):
        engine.step()
        assert not all(s.done for s in states)


@pytest.fixture(params=["qwen3", "qwen3-moe"])
def engine(request: pytest.FixtureRequest, tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir(request.param))


def test_a_joining_request_gets_exactly_what_it_gets_alone(engine: Engine) -> None:
    """Rows of different adapters (two of one rank, so they share a group), ranks, prompt lengths and
    sample counts, joining at different steps, each equal to its solo run (greedy tokens exactly)."""
    assert engine.steps.flat, "the tiny Qwen3 and Qwen3-MoE models take the flat path"
    a, b, c = _adapter(engine, 4, 1), _adapter(engine, 4, 2), _adapter(engine, 16, 3)
    requests = [
        _greedy(a, [5, 6, 7, 8, 9, 10, 11], 40),
        _greedy(b, [12, 13], 12, prompt_logprobs=True, topk_prompt_logprobs=3),
        _greedy(c, list(range(20, 57)), 9, n=3),  # a longer prompt than a block, three samples
        _greedy(BASE_SLOT, [3, 4, 5], 7, n=2, prompt_logprobs=True),
        _greedy(a, [40, 41, 42, 43], 6),
    ]
    solo = [engine.sample([r])[0] for r in requests]
    # a starts; b joins after 3 steps; c and the base request after 2 more; a second a-row after 1
    states = [engine.submit(requests[0])]
    _run_until(engine, states, 3)
    states.append(engine.submit(requests[1]))
    _run_until(engine, states, 2)
    states += [engine.submit(requests[2]), engine.submit(requests[3])]
    _run_until(engine, states, 1)
    states.append(engine.submit(requests[4]))
    while not all(s.done for s in states):
        engine.step()
    for alone, state in zip(solo, states, strict=True):
        joined = state.result
        assert [s.tokens for s in joined.sequences] == [s.tokens for s in alone.sequences]
        for got, want in zip(joined.sequences, alone.sequences, strict=True):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
        if alone.prompt_logprobs is not None:
            assert joined.prompt_logprobs[0] is None
            assert joined.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[1:], abs=1e-5)
        assert (joined.topk_prompt_logprobs is None) == (alone.topk_prompt_logprobs is None)
    # greedy samples of one shared prefill are all the same sequence
    assert len({tuple(s.tokens) for s in states[2].result.sequences}) == 1
    pool = engine.steps.pool
    assert pool.free_blocks == pool.num_blocks and pool.reserved == 0, "every block came back"


def test_a_short_request_finishes_long_before_a_long_one(engine: Engine) -> None:
    a, b = _adapter(engine, 8, 1), _adapter(engine, 4, 2)
    long = engine.submit(_greedy(a, [5, 6, 7], 200))
    _run_until(engine, [long], 10)
    short = engine.submit(_greedy(b, [9, 10, 11, 12], 4))
    steps = 0
    while not short.done:
        engine.step()
        steps += 1
    assert steps == 4, "one step prefills and samples the first token, then one step per token"
    assert not long.done and len(long.sequences[0].generated) == 14
    while not long.done:
        engine.step()


def test_n_samples_share_one_prefill(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt runs once for all samples: the step that prefills it feeds each prompt token once."""
    fed: list[int] = []
    real = engine.steps.runner.run

    def spy(work):
        fed.append(sum(w.num_tokens for w in work))
        return real(work)

    monkeypatch.setattr(engine.steps.runner, "run", spy)
    prompt = list(range(30, 70))
    params = SamplingParams(max_tokens=3, seed=0, stop=[])
    (result,) = engine.sample([SampleRequest(BASE_SLOT, prompt, params, num_samples=8)])
    assert len(result.sequences) == 8
    assert fed == [len(prompt), 8, 8], "one prefill of the prompt, then 8 decode tokens per step"


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(tiny_model_dir) -> None:
    from mintd.config import EngineSettings

    engine = Engine(tiny_model_dir("qwen3"), EngineSettings(step_tokens=16))
    running = engine.submit(_greedy(BASE_SLOT, [1, 2, 3], 30))
    engine.step()
    prompt = list(range(100, 160))  # 60 tokens: 15 per step beside the one decode token
    alone = Engine(tiny_model_dir("qwen3")).sample([_greedy(BASE_SLOT, prompt, 5, prompt_logprobs=True)])[0]
    joined = engine.submit(_greedy(BASE_SLOT, prompt, 5, prompt_logprobs=True))
    tokens_before = len(running.sequences[0].generated)
    for _ in range(4):
        engine.step()
    assert len(running.sequences[0].generated) == tokens_before + 4, "decoding went on during the prefill"
    assert joined.sequences[0].prefill is False, "60 prompt tokens took four 15-token chunks"
    while not joined.done:
        engine.step()
    assert joined.result.sequences[0].tokens == alone.sequences[0].tokens
    assert joined.result.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[1:], abs=1e-5)


def test_the_fallback_runner_joins_requests_too(tiny_model_dir) -> None:
    """A family off the flat path (gpt-oss: sliding windows and sinks) still batches at step level."""
    engine = Engine(tiny_model_dir("gpt-oss"))
    assert not engine.steps.flat
    first, second = _greedy(BASE_SLOT, [5, 6, 7], 12), _greedy(BASE_SLOT, [8, 9], 5, n=2)
    solo = [engine.sample([r])[0] for r in (first, second)]
    states = [engine.submit(first)]
    _run_until(engine, states, 3)
    states.append(engine.submit(second))
    while not all(s.done for s in states):
        engine.step()
    for alone, state in zip(solo, states, strict=True):
        assert [s.tokens for s in state.result.sequences] == [s.tokens for s in alone.sequences]


def test_a_dropped_slot_is_freed_when_its_last_sample_finishes(engine: Engine) -> None:
    slot = _adapter(engine, 4, 1)
    state = engine.submit(_greedy(slot, [5, 6], 5))
    engine.step()
    engine.drop(slot)
    assert slot in engine.slots, "running samples still read it"
    with pytest.raises(ValueError, match="no adapter in slot"):
        engine.check_sample(_greedy(slot, [5, 6], 5))
    while not state.done:
        engine.step()
    assert slot not in engine.slots


def test_a_request_larger_than_the_cache_is_refused_naming_the_field(tiny_model_dir) -> None:
    from mintd.config import EngineSettings

    engine = Engine(tiny_model_dir("qwen3"), EngineSettings(kv_cache_tokens=64))
    with pytest.raises(ValueError, match="max_tokens: .*KV cache"):
        engine.sample([_greedy(BASE_SLOT, [1, 2, 3], 40, n=4)])


def test_a_step_that_needs_no_logits_runs(tiny_model_dir) -> None:
    """A long prompt alone, chunked, without prompt logprobs: its first chunks keep no position."""
    from mintd.config import EngineSettings

    prompt = list(range(100, 150))
    alone = Engine(tiny_model_dir("qwen3")).sample([_greedy(BASE_SLOT, prompt, 3)])[0]
    chunked = Engine(tiny_model_dir("qwen3"), EngineSettings(step_tokens=16)).sample(
        [_greedy(BASE_SLOT, prompt, 3)]
    )[0]
    assert chunked.sequences[0].tokens == alone.sequences[0].tokens
    assert chunked.sequences[0].logprobs == pytest.approx(alone.sequences[0].logprobs, abs=1e-5)
