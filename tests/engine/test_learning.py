"""Learning is real: supervised memorisation, and an importance-sampling RL loop that raises a reward."""

import torch

from mintd.engine.adapters import LoraSpec
from mintd.engine.optim import AdamParams
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.train import Datum, TrainGroup
from tests.engine.conftest import next_token_datum

SETS = {
    "colors": ["Red, green and blue.", "The sky is blue."],
    "sums": ["3 + 4 = 7", "10 + 5 = 15"],
}


def test_two_adapters_memorise_their_own_sets_in_shared_batches(engine):
    slots = {name: engine.create_adapter(LoraSpec(rank=16, seed=i)) for i, name in enumerate(SETS)}
    encoded = {name: [engine.tokenizer.encode(t) for t in texts] for name, texts in SETS.items()}
    for _ in range(60):
        groups = [TrainGroup(slots[n], [next_token_datum(t) for t in encoded[n]]) for n in SETS]
        engine.forward_backward(groups)
        for slot in slots.values():
            engine.optim_step(slot, AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))
    for name, texts in encoded.items():
        for tokens in texts:
            params = SamplingParams(max_tokens=len(tokens) - 2, temperature=0, stop=[])
            out = engine.sample([SampleRequest(slots[name], tokens[:2], params)])[0].sequences[0].tokens
            assert engine.tokenizer.decode(tokens[:2] + out) == engine.tokenizer.decode(tokens)


def reward(tokens: list[int]) -> float:
    """Toy goal: the share of even token ids in the completion."""
    return sum(t % 2 == 0 for t in tokens) / len(tokens)


def test_importance_sampling_rl_raises_reward(engine):
    slot = engine.create_adapter(LoraSpec(rank=8, seed=0))
    prompt = engine.tokenizer.encode("User: count")
    history = []
    for it in range(14):
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=it, stop=[])
        seqs = engine.sample([SampleRequest(engine.snapshot(slot), prompt, params, num_samples=16)])[
            0
        ].sequences
        rewards = torch.tensor([reward(s.tokens) for s in seqs])
        history.append(float(rewards.mean()))
        advantages = rewards - rewards.mean()  # group-relative
        data = []
        for seq, adv in zip(seqs, advantages, strict=True):
            full = prompt + seq.tokens
            n_prompt = len(prompt) - 1  # target positions that predict prompt tokens
            data.append(
                Datum(
                    torch.tensor(full[:-1]),
                    {
                        "target_tokens": torch.tensor(full[1:]),
                        "logprobs": torch.tensor([0.0] * n_prompt + seq.logprobs),
                        "advantages": torch.tensor([0.0] * n_prompt + [float(adv)] * len(seq.tokens)),
                    },
                )
            )
        engine.forward_backward([TrainGroup(slot, data, "importance_sampling")])
        engine.optim_step(slot, AdamParams(learning_rate=3e-2))
    assert sum(history[-3:]) / 3 > history[0] + 0.2, history
