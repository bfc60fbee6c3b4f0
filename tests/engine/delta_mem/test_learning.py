"""Training δ-mem weights on a frozen base: an answer reachable only through the state gets learned."""

import math

import torch
import torch.nn.functional as F

from mintd.engine.delta_mem import DeltaMemRun, segment_attention
from tests.engine.delta_mem.conftest import hooked

VALUES = torch.tensor([101, 202, 303, 404])  # the fact: one of these tokens
FACT_SESSION, QUERY_SESSION = 4, 4


def episodes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Session 0 tells the fact (at a random place among filler); session 1 asks for it: the answer is
    the fact, which session 1's attention cannot see."""
    g = torch.Generator().manual_seed(seed)
    facts = VALUES[torch.randint(len(VALUES), (count,), generator=g)]
    tell = torch.randint(500, 900, (count, FACT_SESSION), generator=g)
    tell[torch.arange(count), torch.randint(FACT_SESSION, (count,), generator=g)] = facts
    ask = torch.tensor([7, 8, 9, 10]).expand(count, QUERY_SESSION)
    return torch.cat([tell, ask], 1), facts


def answer_logits(model, ctx, adapter, ids: torch.Tensor, sessions: bool) -> torch.Tensor:
    """The last position's logits over the values [episodes, 4]; `sessions` False runs the query session
    alone (from an empty state), so nothing of session 0 can reach it.

    Over the values, not the vocabulary: the tiny random base's unembedding (std 0.02 rows after a final
    RMSNorm) keeps every logit within about ±1.3, so a full-vocabulary cross-entropy cannot go much below
    log(vocab) whatever q/o corrections do; a trained backbone is the benchmark's business (§6 stage 0)."""
    if not sessions:
        ids = ids[:, FACT_SESSION:]
    segments = (torch.arange(ids.shape[1]) >= (FACT_SESSION if sessions else 0)).long().expand_as(ids)
    mask, positions = segment_attention(segments, torch.ones_like(ids, dtype=torch.bool), torch.float32)
    with ctx.use(DeltaMemRun.start(adapter, adapter.empty_state(len(ids)))):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return logits[:, -1, VALUES]


def test_loss_falls_when_the_answer_is_only_reachable_through_the_state(qwen3_dir):
    torch.manual_seed(0)
    model, ctx, adapter = hooked(qwen3_dir)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=2e-2)
    held_out = episodes(256, seed=1)
    ids, facts = held_out
    labels = torch.searchsorted(VALUES, facts)

    def evaluate(sessions: bool) -> tuple[float, float]:
        with torch.no_grad():
            logits = answer_logits(model, ctx, adapter, ids, sessions)
        return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()

    chance = math.log(len(VALUES))
    before, _ = evaluate(sessions=True)
    for step in range(60):
        batch, batch_facts = episodes(32, seed=100 + step)
        logits = answer_logits(model, ctx, adapter, batch, sessions=True)
        loss = F.cross_entropy(logits, torch.searchsorted(VALUES, batch_facts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (trained, accuracy), (query_only, query_accuracy) = evaluate(sessions=True), evaluate(sessions=False)
    assert before > 0.9 * chance
    assert trained < 0.5 * chance and accuracy > 0.9  # below log 4: the fact arrived through the state
    assert query_only > 0.9 * chance and query_accuracy < 0.5  # without session 0 it is a guess
