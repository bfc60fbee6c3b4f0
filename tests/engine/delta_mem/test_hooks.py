"""δ-mem hooked into real tiny Llama / Qwen3 / Qwen3-MoE models: the §5.8 invariants this slice reaches."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mintd.engine.delta_mem import (
    DeltaMemContext,
    DeltaMemRun,
    DeltaMemSpec,
    create_adapter,
    install_delta_mem,
    segment_attention,
)
from mintd.engine.engine import Engine
from mintd.engine.forward import padded_forward
from mintd.engine.tiny import make_config, random_adapter
from tests.engine.delta_mem.conftest import hooked, random_state, tokens

ARCHS = ("qwen3", "llama", "qwen3-moe")


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_state_gives_the_base_logits_bit_for_bit(tiny_model_dir, arch):
    model, ctx, adapter = hooked(tiny_model_dir(arch))
    ids = tokens(2, 12, seed=0)
    base = model(input_ids=ids).logits
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2), writes=False)) as run:
        read_only = model(input_ids=ids).logits
    assert torch.equal(read_only, base) and torch.equal(run.state(), adapter.empty_state(2))
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2))) as run:
        writing = model(input_ids=ids).logits
    assert torch.equal(writing[:, 0], base[:, 0])  # the first token reads the empty state
    assert not torch.equal(writing, base) and run.state().abs().sum() > 0  # later ones read its writes
    with ctx.use(DeltaMemRun.start(adapter, random_state(adapter, 2, seed=1), writes=False)):
        assert not torch.equal(model(input_ids=ids).logits, base)


def test_bfloat16_base_keeps_an_fp32_state_and_exact_empty_reads(qwen3_dir):
    model, ctx, adapter = hooked(qwen3_dir)
    model.to(torch.bfloat16)
    ids = tokens(2, 12, seed=0)
    base = model(input_ids=ids).logits
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2), writes=False)):
        assert torch.equal(model(input_ids=ids).logits, base)
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2))) as run:
        model(input_ids=ids)
    assert run.state().dtype == torch.float32 and run.state().abs().sum() > 0


def test_zero_readouts_give_the_base_logits_whatever_the_state(qwen3_dir):
    model, ctx, adapter = hooked(qwen3_dir, readout_init="zero")
    ids = tokens(2, 12, seed=0)
    base = model(input_ids=ids).logits
    with ctx.use(DeltaMemRun.start(adapter, random_state(adapter, 2, seed=1))) as run:
        assert torch.equal(model(input_ids=ids).logits, base)
    assert run.state().abs().sum() > 0


def test_composes_with_lora_on_the_same_projections(qwen3_dir):
    engine = Engine(qwen3_dir)
    ctx = DeltaMemContext()
    install_delta_mem(engine.model, ctx)
    adapter = create_adapter(engine.model, DeltaMemSpec(readout_init="base_slice", seed=0))
    spec, tensors = random_adapter(engine, rank=4, seed=3)
    slot = engine.load_adapter(spec, tensors, trainable=False)
    rows = list(tokens(2, 10, seed=2))

    def logits(slot_id: int) -> torch.Tensor:
        return padded_forward(engine.model, engine.ctx, engine.slots, [slot_id] * 2, rows, engine.pad_id)[0]

    lora = logits(slot)
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2), writes=False)):
        assert torch.equal(logits(slot), lora)
    state = random_state(adapter, 2, seed=4)
    with ctx.use(DeltaMemRun.start(adapter, state, writes=False)):
        both = logits(slot)
    with ctx.use(DeltaMemRun.start(adapter, state, writes=False)):
        memory_only = logits(0)
    base = logits(0)
    assert not torch.equal(both, lora) and not torch.equal(both, memory_only)
    # q_proj and o_proj deltas add: LoRA alone and δ-mem alone each move the logits, together both do
    assert not torch.equal(memory_only, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_ingest_and_decode_steps_equal_one_prefill(tiny_model_dir, arch):
    """A prompt, then a later turn's tokens as one chunk over the cache, then decode steps: each token
    is written once, and state and logits are those of one prefill over all of them."""
    model, ctx, adapter = hooked(tiny_model_dir(arch))
    ids = tokens(2, 20, seed=5)
    start = random_state(adapter, 2, seed=6) * 0.1
    with ctx.use(DeltaMemRun.start(adapter, start)) as run:
        prefill = model(input_ids=ids).logits
        prefill_state = run.state()
    with ctx.use(DeltaMemRun.start(adapter, start)) as run:
        out = model(input_ids=ids[:, :7], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        steps.append(model(input_ids=ids[:, 7:13], cache=cache, use_cache=True).logits)
        for t in range(13, 20):
            out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        decode_state = run.state()
    assert (torch.cat(steps, 1) - prefill).abs().max() < 1e-4
    assert (decode_state - prefill_state).abs().max() < 1e-5


def test_a_rows_state_and_logits_do_not_depend_on_its_neighbours(qwen3_dir):
    model, ctx, adapter = hooked(qwen3_dir)
    lengths = (9, 16, 4)
    ids = tokens(3, 16, seed=7)
    starts = random_state(adapter, 3, seed=8) * 0.1
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with ctx.use(DeltaMemRun.start(adapter, starts, write_mask=mask.bool())) as run:
        batched = model(input_ids=ids, attention_mask=mask).logits
        batched_state = run.state()
    for i, n in enumerate(lengths):
        with ctx.use(DeltaMemRun.start(adapter, starts[i : i + 1])) as run:
            alone = model(input_ids=ids[i : i + 1, :n]).logits
        assert (batched[i, :n] - alone[0]).abs().max() < 1e-5
        assert (batched_state[i] - run.state()[0]).abs().max() < 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_segments_cut_attention_while_the_state_flows(qwen3_dir, attn):
    model, ctx, adapter = hooked(qwen3_dir, attn=attn)
    first, second = tokens(2, 8, seed=9), tokens(1, 6, seed=10).expand(2, 6)  # rows differ in segment 0 only
    ids = torch.cat([first, second], 1)
    segments = torch.tensor([[0] * 8 + [1] * 6] * 2)
    mask, positions = segment_attention(segments, torch.ones_like(ids, dtype=torch.bool), torch.float32)
    assert positions[0].tolist() == list(range(8)) + list(range(6))
    base = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    alone = model(input_ids=second[:1]).logits
    assert (base[:, 8:] - alone).abs().max() < 1e-5  # attention does not see segment 0
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2))):
        memory = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (memory[0, 8:] - memory[1, 8:]).abs().max() > 1e-3  # segment 1 sees segment 0 through the state


def test_segments_with_padding(qwen3_dir):
    model, _, _ = hooked(qwen3_dir)
    ids = tokens(1, 14, seed=15).expand(2, 14)
    segments = torch.tensor([[0] * 8 + [1] * 6, [0] * 5 + [1] * 9])
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, 12:] = False
    mask, positions = segment_attention(segments, valid, torch.float32)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (logits[1, 5:12] - model(input_ids=ids[1:, 5:12]).logits[0]).abs().max() < 1e-5
    assert (logits[1, :5] - model(input_ids=ids[1:, :5]).logits[0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="must not decrease"):
        segment_attention(torch.tensor([[0, 1, 0]]), torch.ones(1, 3, dtype=torch.bool), torch.float32)


def test_refuses_attention_it_has_no_hook_for():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config("deepseek-v3", "test", 1024, 0))
    with pytest.raises(ValueError, match="deepseek_v3"):
        create_adapter(model, DeltaMemSpec())


def test_write_sparsity_is_the_mean_gate_of_the_written_tokens(qwen3_dir):
    model, ctx, adapter = hooked(qwen3_dir)
    ids = tokens(2, 10, seed=11)
    write = torch.ones(2, 10, dtype=torch.bool)
    write[1, 6:] = False
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(2), write_mask=write)) as run:
        model(input_ids=ids)
        penalty = run.write_sparsity(target=0.05)  # per row: row 1 wrote 6 tokens, row 0 all 10
    (gate_grad,) = torch.autograd.grad(penalty.sum(), adapter.layer(0).gate_bias)
    fresh_gate = torch.sigmoid(torch.tensor(-1.5))  # gate weights start at zero: β is the bias alone
    assert penalty.shape == (2,) and torch.allclose(penalty, (fresh_gate - 0.05) ** 2)
    assert (gate_grad > 0).all()  # descending it lowers the write gates


def test_mixed_batch_of_memory_lora_and_base_rows(qwen3_dir):
    """Rows: base, base + δ-mem A, LoRA, LoRA + δ-mem B. Rows without δ-mem are bit-identical to the
    batch without it; every δ-mem row's logits and state are those it has alone."""
    engine = Engine(qwen3_dir)
    ctx = DeltaMemContext()
    install_delta_mem(engine.model, ctx)
    memory_a, memory_b = (
        create_adapter(engine.model, DeltaMemSpec(readout_init="base_slice", seed=s)) for s in (1, 2)
    )
    spec, tensors = random_adapter(engine, rank=4, seed=3)
    lora = engine.load_adapter(spec, tensors, trainable=False)
    slots, rows = [0, 0, lora, lora], list(tokens(4, 12, seed=12))
    start_a, start_b = random_state(memory_a, 1, seed=13) * 0.1, random_state(memory_b, 1, seed=14) * 0.1

    def forward(slot_ids, batch_rows):
        return padded_forward(engine.model, engine.ctx, engine.slots, slot_ids, batch_rows, engine.pad_id)[0]

    without = forward(slots, rows)
    run_a = DeltaMemRun.start(memory_a, start_a, rows=torch.tensor([1]))
    run_b = DeltaMemRun.start(memory_b, start_b, rows=torch.tensor([3]))
    with ctx.use(run_a, run_b):
        mixed = forward(slots, rows)
    assert torch.equal(mixed[0], without[0]) and torch.equal(mixed[2], without[2])
    for run, memory, start, row in ((run_a, memory_a, start_a, 1), (run_b, memory_b, start_b, 3)):
        with ctx.use(DeltaMemRun.start(memory, start)) as alone:
            logits = forward([slots[row]], [rows[row]])
        assert (mixed[row] - logits[0]).abs().max() < 1e-5
        assert (run.state() - alone.state()).abs().max() < 1e-6
    empty = [
        DeltaMemRun.start(m, m.empty_state(1), rows=torch.tensor([r]), writes=False)
        for m, r in ((memory_a, 1), (memory_b, 3))
    ]
    with ctx.use(*empty):
        assert torch.equal(forward(slots, rows), without)
