"""δ-mem rows in the step engine: each sequence carries its state through prefill (chunked, write-once)
and decode, beside base and LoRA rows of the same flat batch, and hands it back at the end."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from mintd.config import EngineSettings
from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.delta_mem import DeltaMemRun, DeltaMemSpec
from mintd.engine.delta_mem.state import state_bytes, state_from_bytes
from mintd.engine.engine import Engine
from mintd.engine.sampling import MemoryInput, SampledSequence, SampleRequest, SamplingParams
from mintd.engine.stream import TokenStream
from mintd.engine.tiny import frozen_random
from tests.engine.delta_mem.conftest import hooked

SPEC = DeltaMemSpec(readout_init="base_slice", seed=1)
PROMPT = [5, 17, 230, 41, 9, 77, 300, 12, 8, 64, 101, 3, 44]


def delta_slot(engine: Engine, seed: int = 1, lora: bool = False) -> int:
    """A frozen δ-mem adapter (with the LoRA of `lora_slot(engine, seed)` when `lora`): base_slice
    readouts, random gate weights, so writes and reads both move the logits."""
    spec = LoraSpec(rank=4, seed=seed)
    slot = engine.create_adapter(spec, DeltaMemSpec(readout_init="base_slice", seed=seed, lora=lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in engine.slots[slot].delta_mem.layers.values():
            layer.gate_weight.copy_(torch.randn(layer.gate_weight.shape, generator=gen) * 0.1)
            layer.read_q.mul_(20)
            layer.read_o.mul_(20)
    return frozen_random(engine, slot, seed)


def lora_slot(engine: Engine, seed: int) -> int:
    return frozen_random(engine, engine.create_adapter(LoraSpec(rank=4, seed=seed)), seed)


def empty(engine: Engine, slot: int) -> torch.Tensor:
    return engine.slots[slot].delta_mem.empty_state(1)[0].cpu()


def random_state(engine: Engine, slot: int, seed: int) -> torch.Tensor:
    return torch.randn(empty(engine, slot).shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def request(
    slot: int,
    prompt: list[int],
    max_tokens: int,
    memory: MemoryInput | None = None,
    n: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
) -> SampleRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=[], seed=seed)
    return SampleRequest(slot, prompt, params, num_samples=n, memory=memory)


def direct_state(engine: Engine, slot: int, model_dir, state: torch.Tensor, tokens, writes) -> torch.Tensor:
    """The state after `tokens` from `state` straight through a plain hooked HF model: one prefill,
    `writes` saying which tokens write."""
    model, ctx, adapter = hooked(model_dir)
    adapter.load_state_dict(engine.slots[slot].delta_mem.state_dict())
    mask = torch.tensor([writes])
    with torch.no_grad(), ctx.use(DeltaMemRun.start(adapter, state[None], write_mask=mask)) as run:
        model(input_ids=torch.tensor([tokens]))
    return run.state()[0]


def fed(prompt: list[int], sample: SampledSequence) -> list[int]:
    """The tokens that went through the model: the prompt, then each generated token but the last."""
    return prompt + sample.tokens[:-1]


@pytest.fixture
def engine(qwen3_dir) -> Engine:
    return Engine(qwen3_dir)


def test_an_empty_read_only_state_samples_the_base_bit_for_bit(engine: Engine) -> None:
    slot, both, lora = delta_slot(engine), delta_slot(engine, seed=2, lora=True), lora_slot(engine, 2)
    for memory_slot, plain in ((slot, BASE_SLOT), (both, lora)):
        read_only = MemoryInput(empty(engine, memory_slot), written=len(PROMPT), write_generated=False)
        (got,) = engine.sample([request(memory_slot, PROMPT, 8, read_only)])
        (want,) = engine.sample([request(plain, PROMPT, 8)])
        assert got.sequences[0].tokens == want.sequences[0].tokens
        assert got.sequences[0].logprobs == want.sequences[0].logprobs, "bit for bit"
        assert torch.equal(got.sequences[0].memory, empty(engine, memory_slot)), "nothing written"
    # the same adapter with writes on moves the tokens: the state is doing something
    (written,) = engine.sample([request(slot, PROMPT, 8, MemoryInput(empty(engine, slot)))])
    assert written.sequences[0].logprobs != got.sequences[0].logprobs


@pytest.mark.parametrize(
    ("arch", "step_tokens"), [("qwen3", 256), ("qwen3", 5), ("llama", 5), ("qwen3-moe", 5)]
)
def test_the_end_state_is_a_direct_run_over_what_was_fed(tiny_model_dir, arch: str, step_tokens: int) -> None:
    """Greedy, n = 3 sampled children (each its own state) and a one-token prompt (a prefill span that
    takes the decode step); step_tokens 5 splits the prompt over steps, beside others decoding."""
    model_dir = tiny_model_dir(arch)
    engine = Engine(model_dir, EngineSettings(step_tokens=step_tokens))
    slot = delta_slot(engine)
    start = random_state(engine, slot, 0)
    greedy = request(slot, PROMPT, 6, MemoryInput(start))
    sampled = request(slot, PROMPT[:7], 5, MemoryInput(start), n=3, temperature=1.0, seed=4)
    single = request(slot, PROMPT[3:4], 4, MemoryInput(start))
    results = engine.sample([greedy, sampled, single])
    assert len({tuple(s.tokens) for s in results[1].sequences}) > 1, "the children differ"
    for req, result in zip((greedy, sampled, single), results, strict=True):
        for sample in result.sequences:
            tokens = fed(req.prompt, sample)
            want = direct_state(engine, slot, model_dir, start, tokens, [True] * len(tokens))
            torch.testing.assert_close(sample.memory, want, rtol=1e-5, atol=1e-5)
            assert sample.memory.device.type == "cpu" and sample.memory.dtype == torch.float32


def test_write_once_and_write_generated(engine: Engine, qwen3_dir) -> None:
    """`written` = j: the prompt's first j tokens read the state they entered with, the rest write on
    top of it, i.e. the state of a direct run from the given state with writes off for tokens < j.
    With the state after the first j tokens, that is the state as if they had been written earlier and
    only the rest now; writing them again (written = 0) would give another state."""
    slot, j = delta_slot(engine), 6
    (first,) = engine.sample([request(slot, PROMPT[:j], 1, MemoryInput(empty(engine, slot)))])
    after_j = first.sequences[0].memory  # max_tokens 1: only the prompt went through the model
    want_j = direct_state(engine, slot, qwen3_dir, empty(engine, slot), PROMPT[:j], [True] * j)
    torch.testing.assert_close(after_j, want_j, rtol=1e-5, atol=1e-5)

    memory = MemoryInput(after_j, written=j, write_generated=False)
    (resent,) = engine.sample([request(slot, PROMPT, 4, memory)])
    writes = [p >= j for p in range(len(PROMPT))] + [False] * 3
    want = direct_state(engine, slot, qwen3_dir, after_j, fed(PROMPT, resent.sequences[0]), writes)
    torch.testing.assert_close(resent.sequences[0].memory, want, rtol=1e-5, atol=1e-5)
    rewritten = engine.sample([request(slot, PROMPT, 4, MemoryInput(after_j, write_generated=False))])[0]
    assert not torch.allclose(rewritten.sequences[0].memory, resent.sequences[0].memory, atol=1e-4)
    # generated tokens write by default; here they did not, so one more token leaves the state alone
    (longer,) = engine.sample([request(slot, PROMPT, 6, memory)])
    assert torch.equal(longer.sequences[0].memory, resent.sequences[0].memory)


def test_batch_independence(engine: Engine, qwen3_dir) -> None:
    """δ-mem rows of two adapters (one with a LoRA) beside base and LoRA rows, joining at different
    steps: each δ-mem row's tokens and state equal its run alone; the base and LoRA rows are bit for
    bit what they are when the δ-mem rows of the same batch hold empty read-only states."""
    a, b, both, lora = (
        delta_slot(engine, 1),
        delta_slot(engine, 3),
        delta_slot(engine, 2, True),
        lora_slot(engine, 5),
    )

    def batch(live: bool) -> list[SampleRequest]:
        def memory(slot: int, seed: int) -> MemoryInput:
            if live:
                return MemoryInput(random_state(engine, slot, seed), written=2)
            return MemoryInput(empty(engine, slot), written=len(PROMPT), write_generated=False)

        return [
            request(BASE_SLOT, PROMPT, 9),
            request(a, PROMPT, 7, memory(a, 1)),
            request(lora, PROMPT[:5], 8, n=2, temperature=1.0, seed=1),
            request(both, PROMPT[2:], 6, memory(both, 2)),
            request(b, PROMPT[:9], 5, memory(b, 3), n=2, temperature=1.0, seed=2),
            request(a, PROMPT[4:], 6, memory(a, 4)),
        ]

    def joined(requests: list[SampleRequest]) -> list:
        states = [engine.submit(r) for r in requests[:3]]
        engine.step()
        states += [engine.submit(r) for r in requests[3:]]
        while not all(s.done for s in states):
            engine.step()
        return [s.result for s in states]

    live, quiet = batch(True), batch(False)
    mixed, reference = joined(live), joined(quiet)
    alone = [engine.sample([r])[0] for r in live]
    for i, (got, solo) in enumerate(zip(mixed, alone, strict=True)):
        assert [s.tokens for s in got.sequences] == [s.tokens for s in solo.sequences], i
        for g, s in zip(got.sequences, solo.sequences, strict=True):
            assert g.logprobs == pytest.approx(s.logprobs, abs=1e-5)
            if s.memory is not None:
                torch.testing.assert_close(g.memory, s.memory, rtol=1e-5, atol=1e-5)
    for i in (0, 2):  # base and LoRA rows
        assert mixed[i].sequences == reference[i].sequences, "bit for bit"
    pool = engine.steps.pool
    assert pool.free_blocks == pool.num_blocks and pool.reserved == 0


def test_a_state_from_bytes_continues_bit_for_bit(engine: Engine, qwen3_dir) -> None:
    """Two turns in one engine, and the same two turns with the state carried as bytes into a new
    engine between them (a restart): the second turn's tokens, logprobs and state are identical."""
    slot = delta_slot(engine)
    tensors = engine.export_adapter(slot)[1]

    def second_turn(eng: Engine, slot: int, state: torch.Tensor, first: SampledSequence):
        history = PROMPT + first.tokens
        memory = MemoryInput(state, written=len(history) - 1)
        return eng.sample([request(slot, history + [70, 71, 72], 5, memory)])[0].sequences[0]

    (first,) = engine.sample([request(slot, PROMPT, 4, MemoryInput(empty(engine, slot)))])
    first = first.sequences[0]
    uninterrupted = second_turn(engine, slot, first.memory, first)

    restarted = Engine(qwen3_dir)
    loaded = restarted.load_adapter(LoraSpec(rank=4, seed=1), tensors, trainable=False, delta_mem=SPEC)
    state = state_from_bytes(state_bytes(first.memory), layers=2, rank=8)
    again = second_turn(restarted, loaded, state, first)
    assert again.tokens == uninterrupted.tokens
    assert again.logprobs == uninterrupted.logprobs
    assert torch.equal(again.memory, uninterrupted.memory)


def test_memory_is_required_for_delta_mem_slots_and_refused_for_others(engine: Engine) -> None:
    slot = delta_slot(engine)
    state = empty(engine, slot)
    cases = [
        (request(slot, PROMPT, 2), "memory: slot .* is a delta_mem adapter"),
        (request(BASE_SLOT, PROMPT, 2, MemoryInput(state)), "memory: slot 0 is not a delta_mem adapter"),
        (request(slot, PROMPT, 2, MemoryInput(state[:1])), r"memory.state: .*expected torch.float32"),
        (request(slot, PROMPT, 2, MemoryInput(state.double())), r"memory.state: torch.float64"),
        (request(slot, PROMPT, 2, MemoryInput(state + float("nan"))), "memory.state: must be finite"),
        (request(slot, PROMPT, 2, MemoryInput(state, written=len(PROMPT) + 1)), "memory.written: 14"),
    ]
    for req, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.check_sample(req)


def test_a_cancelled_or_aborted_request_leaves_nothing_behind(engine: Engine) -> None:
    slot = delta_slot(engine)
    stream = TokenStream()
    state = engine.submit(
        SampleRequest(
            slot,
            PROMPT,
            SamplingParams(max_tokens=50, stop=[]),
            memory=MemoryInput(empty(engine, slot)),
            stream=stream,
        )
    )
    engine.step()
    stream.cancel()
    while not state.done:
        engine.step()
    assert state.result.sequences[0].stop_reason == "cancelled"
    other = engine.submit(request(slot, PROMPT, 50, MemoryInput(empty(engine, slot))))
    engine.step()
    engine.steps.abort()
    assert not other.sequences and not engine.steps.running
    pool = engine.steps.pool
    assert pool.free_blocks == pool.num_blocks and pool.reserved == 0


def test_a_batch_without_delta_mem_rows_runs_no_hook(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks are on the model only while δ-mem rows run: a base or LoRA batch pays nothing for them."""
    slot, lora = delta_slot(engine), lora_slot(engine, 2)
    entered: list[int] = []
    real = engine.delta_ctx.use

    @contextmanager
    def spy(*runs):
        entered.append(len(runs))
        with real(*runs) as run:
            assert all(m._forward_hooks for m, _ in engine.delta_ctx._hooks), "hooked while in use"
            yield run

    monkeypatch.setattr(engine.delta_ctx, "use", spy)
    engine.sample([request(BASE_SLOT, PROMPT, 4), request(lora, PROMPT, 4)])
    assert entered == []
    engine.sample([request(slot, PROMPT, 4, MemoryInput(empty(engine, slot))), request(lora, PROMPT, 4)])
    assert entered == [1] * 4, "one run in each of the four steps"
    assert not any(m._forward_hooks for m in engine.model.modules())
