"""Sampling behaviour: stops, seeds, n samples, filters, and request validation."""

import pytest
import torch

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.sampling import SampleRequest, SamplingParams, choose, draw


def sample_one(engine, prompt, slot=BASE_SLOT, **params):
    request = SampleRequest(slot, prompt, SamplingParams(**params))
    return engine.sample([request])[0].sequences[0]


def test_stop_empty_list_runs_to_max_tokens(engine):
    seq = sample_one(engine, [5, 6, 7], max_tokens=9, stop=[], seed=1)
    assert len(seq.tokens) == len(seq.logprobs) == 9
    assert seq.stop_reason == "length"


def test_stop_token_is_included_and_ends_the_sequence(engine):
    free = sample_one(engine, [5, 6, 7], max_tokens=12, stop=[], seed=4)
    stop_token = free.tokens[3]
    seq = sample_one(engine, [5, 6, 7], max_tokens=12, stop=[stop_token], seed=4)
    assert seq.stop_reason == "stop"
    assert seq.tokens == free.tokens[: free.tokens.index(stop_token) + 1]


def test_stop_string_keeps_the_tokens_that_complete_it(engine):
    free = sample_one(engine, [5, 6, 7], max_tokens=12, stop=[], temperature=0)
    text = engine.tokenizer.decode(free.tokens[2:4])
    seq = sample_one(engine, [5, 6, 7], max_tokens=12, stop=text, temperature=0)
    assert seq.stop_reason == "stop"
    assert text in engine.tokenizer.decode(seq.tokens)
    assert text not in engine.tokenizer.decode(seq.tokens[:-1])


def test_eos_stops_when_stop_is_omitted(engine):
    free = sample_one(engine, [5, 6, 7], max_tokens=6, stop=[], temperature=0)
    # a random model rarely emits the real EOS, so declare its second greedy token the EOS
    engine.eos_ids = frozenset({free.tokens[1]})
    seq = sample_one(engine, [5, 6, 7], max_tokens=6, temperature=0)
    assert seq.tokens == free.tokens[: free.tokens.index(free.tokens[1]) + 1]
    assert seq.stop_reason == "stop"
    assert len(sample_one(engine, [5, 6, 7], max_tokens=6, temperature=0, stop=[]).tokens) == 6


def test_seed_reproduces_and_n_samples_differ(engine):
    request = SampleRequest(
        BASE_SLOT, [5, 6, 7], SamplingParams(max_tokens=8, seed=11, stop=[]), num_samples=3
    )
    first, again = engine.sample([request])[0], engine.sample([request])[0]
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1


def test_top_k_one_is_greedy(engine):
    slot = engine.create_adapter(LoraSpec(rank=4, seed=0))
    greedy = sample_one(engine, [9, 10], slot, max_tokens=6, temperature=0, stop=[])
    top1 = sample_one(engine, [9, 10], slot, max_tokens=6, temperature=1.0, top_k=1, seed=3, stop=[])
    tiny_p = sample_one(engine, [9, 10], slot, max_tokens=6, temperature=1.0, top_p=1e-6, seed=3, stop=[])
    assert greedy.tokens == top1.tokens == tiny_p.tokens


def test_prompt_logprobs_shapes(engine):
    request = SampleRequest(
        BASE_SLOT, [5, 6, 7, 8], SamplingParams(max_tokens=1), prompt_logprobs=True, topk_prompt_logprobs=3
    )
    result = engine.sample([request])[0]
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == 4
    assert result.topk_prompt_logprobs[0] is None
    assert all(len(row) == 3 for row in result.topk_prompt_logprobs[1:])
    # the chosen token's logprob is at most the best candidate's
    pairs = zip(result.prompt_logprobs[1:], result.topk_prompt_logprobs[1:], strict=True)
    assert all(lp <= row[0][1] + 1e-6 for lp, row in pairs)


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"prompt": []}, "prompt: must hold"),
        ({"prompt": [10**7]}, "prompt: token ids"),
        ({"params": SamplingParams(max_tokens=10**6)}, "max_tokens: prompt"),
        ({"params": SamplingParams(stop=[10**7])}, "sampling_params.stop"),
        ({"slot": 999}, "sampler: no adapter in slot 999"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_requests_name_the_field(engine, request_kwargs, message):
    base = {"slot": BASE_SLOT, "prompt": [1, 2], "params": SamplingParams(max_tokens=2)}
    with pytest.raises(ValueError, match=message):
        engine.sample([SampleRequest(**{**base, **request_kwargs})])


def test_top_k_zero_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=0)


def _first_token_logprobs(engine, temperature: float) -> dict[int, float]:
    """token -> returned logprob of the first sampled token, over many samples of one prompt."""
    params = SamplingParams(max_tokens=1, temperature=temperature, seed=5, stop=[])
    result = engine.sample([SampleRequest(BASE_SLOT, [5, 6, 7], params, num_samples=64)])[0]
    return {s.tokens[0]: s.logprobs[0] for s in result.sequences}


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_sampled_logprobs_are_those_of_the_tempered_distribution(engine, temperature):
    base = _first_token_logprobs(engine, 1.0)
    tempered = _first_token_logprobs(engine, temperature)
    common = sorted(set(base) & set(tempered))
    assert len(common) >= 3, common
    for i, j in zip(
        common[:-1], common[1:], strict=True
    ):  # same prompt, same position: differences scale by 1/τ
        expected = (base[i] - base[j]) / temperature
        assert abs((tempered[i] - tempered[j]) - expected) < 1e-4
    # exactly log softmax(z/τ): the model's full next-token distribution, tempered here by hand
    request = SampleRequest(
        BASE_SLOT, [5, 6, 7, 0], SamplingParams(max_tokens=1), topk_prompt_logprobs=engine.vocab_size
    )
    full = dict(engine.sample([request])[0].topk_prompt_logprobs[-1])
    logp1 = torch.tensor([full[t] for t in range(engine.vocab_size)])
    reference = torch.log_softmax(logp1 / temperature, dim=-1)
    assert all(abs(base[t] - full[t]) < 1e-4 for t in base)
    assert all(abs(tempered[t] - float(reference[t])) < 1e-4 for t in tempered)


def test_greedy_reports_the_models_own_logprobs(engine):
    greedy = sample_one(engine, [5, 6, 7], max_tokens=1, temperature=0, stop=[])
    request = SampleRequest(
        BASE_SLOT, [5, 6, 7, *greedy.tokens], SamplingParams(max_tokens=1), prompt_logprobs=True
    )
    assert abs(engine.sample([request])[0].prompt_logprobs[-1] - greedy.logprobs[0]) < 1e-4


def test_draws_follow_each_rows_distribution_and_never_take_a_token_without_mass():
    """`choose`'s draw: frequencies match the softmax of each row (top-k's masked tail, of zero mass, is
    never drawn, even by a uniform that rounds up to the whole mass), and a seed reproduces the draws."""

    class Row:
        def __init__(self, top_k: int, seed: int) -> None:
            self.params = SamplingParams(temperature=1.0, top_k=top_k)
            self.generator = torch.Generator().manual_seed(seed)

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]]))
    rows = [Row(-1, 0), Row(3, 1)]
    draws = torch.stack([choose(logits, rows) for _ in range(20_000)])
    first = torch.bincount(draws[:, 0], minlength=4) / len(draws)
    second = torch.bincount(draws[:, 1], minlength=4) / len(draws)
    assert first[3] == 0 and torch.allclose(first[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
    assert second[0] == 0  # the least likely token is outside the top 3
    assert torch.allclose(second[1:], torch.tensor([2, 3, 4]) / 9, atol=0.015)

    again = [Row(-1, 0), Row(3, 1)]
    assert torch.equal(torch.stack([choose(logits, again) for _ in range(20_000)]), draws)


def test_a_draw_that_rounds_up_to_the_whole_mass_takes_the_last_token_with_mass():
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert draw(probs, torch.tensor([1.0, 1.0])).tolist() == [1, 1]
    assert draw(probs, torch.tensor([0.0, 0.0])).tolist() == [0, 1]
    assert draw(probs, torch.tensor([0.25, 0.5])).tolist() == [1, 1]
