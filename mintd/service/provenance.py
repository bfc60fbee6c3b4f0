"""Sampled-sequence records and the provenance spans that name them (tinker 0.38).

Every sample answer carries one `sequence_id` per sequence. A sampling client made with
`record_stability_info=True` also has each sequence recorded here: its prompt, its sampled tokens and
the logprob the sampler drew each with. A training datum may carry provenance spans, two lists that
tile its `model_input` and its loss rows with runs of "prompt positions [o, o+n) of sequence σ" or
"sampled tokens [o, o+n) of σ".

- Every loss accepts spans; their structure and tiling are checked, the ids are not looked up (the
  cookbook sends spans on all RL losses, naming sequences that were never recorded).
- `gspo` without a `sequence_ratio_mask` takes its ratio over the rows under sampled spans.
- `stable_reinforce` needs spans on every datum, and every id must be a recorded sequence of the
  training run's own session that has not expired: its tokens must match the record, and the loss reads
  the recorded sampler logprobs (not the client's) and the sampled-row mask from here.

Records live in memory, belong to the session that sampled them, and expire `ttl_s` after their last
use (sampling, or a training request naming them): a sliding window, as the hosted service documents.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mintd.engine.sampling import SampledSequence
from mintd.engine.train import Datum


@dataclass(frozen=True)
class Span:
    sampled: bool  # False: prompt positions of the sequence's request
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class DatumSpans:
    """A training datum's provenance: spans tiling its model_input and its loss rows."""

    model_input: list[Span]
    loss: list[Span]


@dataclass
class SequenceRecord:
    session_id: str
    prompt: torch.Tensor  # int64, shared by the request's sequences
    tokens: torch.Tensor  # int64 sampled tokens
    logprobs: torch.Tensor  # float32: the sampler's logprob of each, under the distribution sampled
    last_used: float


class SequenceRecords:
    """sequence_id -> record, owned by a session, expiring `ttl_s` after last use; at most
    `max_sequences` are kept (the least recently used go first)."""

    def __init__(
        self, ttl_s: float = 86400.0, max_sequences: int = 1_000_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sequences = max_sequences
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[str, SequenceRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def record(
        self, session_id: str, ids: Sequence[str], prompt: list[int], sequences: Sequence[SampledSequence]
    ) -> None:
        now = self._clock()
        shared_prompt = torch.tensor(prompt, dtype=torch.long)
        with self._lock:
            for sequence_id, seq in zip(ids, sequences, strict=True):
                self._records[sequence_id] = SequenceRecord(
                    session_id,
                    shared_prompt,
                    torch.tensor(seq.tokens, dtype=torch.long),
                    torch.tensor(seq.logprobs, dtype=torch.float32),
                    now,
                )
                self._records.move_to_end(sequence_id)
            self._expire(now)

    def use(self, session_id: str, sequence_id: str, where: str) -> SequenceRecord:
        """The live record (its TTL restarts), or ValueError naming `where`. Another session's record
        answers exactly like an unknown one, so ids do not leak across sessions."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            rec = self._records.get(sequence_id)
            if rec is None or rec.session_id != session_id:
                raise ValueError(
                    f"{where}: sequence_id {sequence_id!r} is unknown or expired (stable_reinforce needs "
                    f"sequences sampled in this training run's session with record_stability_info=True, "
                    f"used within {self.ttl_s:g} s)"
                )
            rec.last_used = now
            self._records.move_to_end(sequence_id)
            return rec

    def _expire(self, now: float) -> None:
        while self._records:
            oldest_id, oldest = next(iter(self._records.items()))
            if now - oldest.last_used <= self.ttl_s and len(self._records) <= self.max_sequences:
                return
            del self._records[oldest_id]


def sampled_rows(prov: DatumSpans, n: int) -> torch.Tensor:
    """1.0 on the loss rows under sampled spans."""
    mask = torch.zeros(n)
    pos = 0
    for span in prov.loss:
        if span.sampled:
            mask[pos : pos + span.length] = 1.0
        pos += span.length
    return mask


def _check_run(
    values: torch.Tensor, rec: SequenceRecord, span: Span, pos: int, where: str, field: str, compare: bool
) -> None:
    source = rec.tokens if span.sampled else rec.prompt
    kind = "sampled tokens" if span.sampled else "prompt tokens"
    end = span.offset + span.length
    if end > len(source):
        raise ValueError(
            f"{where}: positions [{span.offset}, {end}) exceed the {len(source)} {kind} of sequence "
            f"{span.sequence_id!r}"
        )
    if not compare:
        return
    mismatch = (values[pos : pos + span.length] != source[span.offset : end]).nonzero()
    if len(mismatch):
        k = int(mismatch[0])
        raise ValueError(
            f"{where}: {field} position {pos + k} is token {int(values[pos + k])}, but "
            f"{kind}[{span.offset + k}] of sequence {span.sequence_id!r} is {int(source[span.offset + k])}"
        )


def stable_reinforce_inputs(
    datum: Datum, prov: DatumSpans | None, records: SequenceRecords, session_id: str, index: int
) -> None:
    """Check a datum against its recorded sequences, then set its `logprobs` (the recorded sampler
    logprobs on sampled rows) and `sampled_mask`. The targets under prompt spans are not compared
    (the cookbook puts 0 there)."""
    where = f"data[{index}]"
    if prov is None:
        raise ValueError(
            f"{where}: stable_reinforce needs model_input_spans and loss_fn_input_spans (train on "
            "sequences sampled with record_stability_info=True, e.g. via Datum.with_provenance)"
        )
    target = datum.inputs.get("target_tokens")
    if target is None or target.dim() != 1:
        raise ValueError(f"{where}.target_tokens: stable_reinforce needs one target token per position")
    pos = 0
    for k, span in enumerate(prov.model_input):
        rec = records.use(session_id, span.sequence_id, f"{where}.model_input_spans[{k}]")
        _check_run(datum.tokens, rec, span, pos, f"{where}.model_input_spans[{k}]", "model_input", True)
        pos += span.length
    n = len(target)
    client = datum.inputs.get("logprobs")  # kept on prompt rows, replaced by the record on sampled ones
    if client is not None and tuple(client.shape) != (n,):
        raise ValueError(
            f"{where}.loss_fn_inputs.logprobs: shape {tuple(client.shape)} does not match {n} rows"
        )
    logprobs = torch.zeros(n) if client is None else client.clone()
    pos = 0
    for k, span in enumerate(prov.loss):
        rec = records.use(session_id, span.sequence_id, f"{where}.loss_fn_input_spans[{k}]")
        field = f"{where}.loss_fn_input_spans[{k}]"
        _check_run(target, rec, span, pos, field, "target_tokens", span.sampled)
        if span.sampled:
            logprobs[pos : pos + span.length] = rec.logprobs[span.offset : span.offset + span.length]
        pos += span.length
    mask = sampled_rows(prov, n)
    if not bool(mask.any()):
        raise ValueError(f"{where}.loss_fn_input_spans: no row is a sampled token; nothing to reinforce")
    advantages = datum.inputs.get("advantages")
    if advantages is not None and advantages.shape == mask.shape:
        outside = ((mask == 0) & (advantages != 0)).nonzero()
        if len(outside):
            raise ValueError(
                f"{where}.advantages: position {int(outside[0])} is not a sampled token; stable_reinforce "
                "accepts nonzero advantages only on sampled tokens"
            )
    datum.inputs["logprobs"] = logprobs
    datum.inputs["sampled_mask"] = mask


def apply(
    loss_fn: str,
    data: list[Datum],
    spans: list[DatumSpans | None],
    records: SequenceRecords,
    session_id: str,
) -> None:
    """Derive what `loss_fn` needs from every datum's spans (in place; the edge checked their shape)."""
    for i, (datum, prov) in enumerate(zip(data, spans, strict=True)):
        if loss_fn == "stable_reinforce":
            stable_reinforce_inputs(datum, prov, records, session_id, i)
        elif loss_fn == "gspo" and "sequence_ratio_mask" not in datum.inputs:
            datum.inputs["sequence_ratio_mask"] = _default_ratio_mask(datum, prov)


def _default_ratio_mask(datum: Datum, prov: DatumSpans | None) -> torch.Tensor:
    """gspo without a mask: the rows under sampled spans, else the rows with a nonzero advantage."""
    n = len(datum.tokens)
    if prov is not None:
        return sampled_rows(prov, n)
    advantages = datum.inputs.get("advantages")
    return (advantages != 0).float() if advantages is not None else torch.zeros(n)
