"""Scores per revision and the population's answer per prompt, built up one revision at a time.

A `Tally` takes each revision's outputs as they complete (or the error that stopped it) and keeps only
per-prompt vote counts, so its memory is bounded by the distinct answers, not revisions × prompts.

Population answer of a prompt: the majority among the revisions' normalized answers (revisions that
gave no answer abstain). When several answers tie for the most votes the tie is reported, with all of
them, and the prompt scores the fraction of the tied answers that are correct: what a fair coin
between them would score on average. The population score is the mean over prompts, reported next to
the best single revision and the mean revision, which is the comparison population claims are about.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mintd.eval.evalset import EvalItem
from mintd.eval.scorers import Scorer


@dataclass(frozen=True, slots=True)
class Sample:
    item_id: str
    output: str
    answer: str | None
    score: float | None  # None: not scored (the server only sampled)

    def row(self, revision: str) -> dict[str, Any]:
        """Its line in a run's JSONL results."""
        return {
            "type": "sample",
            "revision": revision,
            "item_id": self.item_id,
            "output": self.output,
            "answer": self.answer,
            "score": self.score,
        }


@dataclass(frozen=True, slots=True)
class RevisionScore:
    revision: str
    score: float | None  # mean over prompts; None when it failed
    n: int  # prompts scored
    correct: float  # sum of scores
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "score": self.score,
            "n": self.n,
            "correct": self.correct,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class PromptVote:
    item_id: str
    answer: str | None  # the majority answer (the first of the tied ones, in sorted order)
    votes: int  # the votes it got
    voters: int  # revisions that answered
    tied: tuple[str, ...]  # every answer with the most votes, when more than one
    score: float

    def as_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "answer": self.answer,
            "votes": self.votes,
            "voters": self.voters,
            "tied": list(self.tied),
            "score": self.score,
        }


@dataclass
class _Prompt:
    votes: Counter[str] = field(default_factory=Counter)
    outputs: dict[str, str] = field(default_factory=dict)  # answer -> the first output that gave it


class Tally:
    def __init__(self, items: list[EvalItem], scorer: Scorer) -> None:
        self.items = items
        self.scorer = scorer
        self.revisions: list[RevisionScore] = []
        self._prompts = [_Prompt() for _ in items]

    def add(self, revision: str, outputs: list[str]) -> tuple[RevisionScore, list[Sample]]:
        """One revision's outputs, one per item in order: its score, and each output scored."""
        if len(outputs) != len(self.items):
            raise ValueError(f"{revision}: {len(outputs)} outputs for {len(self.items)} items")
        samples = []
        for item, output, prompt in zip(self.items, outputs, self._prompts, strict=True):
            answer = self.scorer.answer(output)
            samples.append(Sample(item.id, output, answer, self.scorer.score(output, item)))
            if answer is not None:
                prompt.votes[answer] += 1
                prompt.outputs.setdefault(answer, output)
        correct = sum(s.score or 0.0 for s in samples)
        result = RevisionScore(revision, correct / len(samples), len(samples), correct)
        self.revisions.append(result)
        return result, samples

    def fail(self, revision: str, error: str) -> RevisionScore:
        """A revision that could not be evaluated: reported, and left out of scores and votes."""
        result = RevisionScore(revision, None, 0, 0.0, error)
        self.revisions.append(result)
        return result

    def votes(self) -> list[PromptVote]:
        out = []
        for item, prompt in zip(self.items, self._prompts, strict=True):
            if not prompt.votes:
                out.append(PromptVote(item.id, None, 0, 0, (), 0.0))
                continue
            top = max(prompt.votes.values())
            tied = sorted(a for a, n in prompt.votes.items() if n == top)
            score = sum(self.scorer.score(prompt.outputs[a], item) for a in tied) / len(tied)
            voters = sum(prompt.votes.values())
            out.append(PromptVote(item.id, tied[0], top, voters, tuple(tied) if len(tied) > 1 else (), score))
        return out

    def summary(self, votes: list[PromptVote] | None = None) -> dict[str, Any]:
        """Best single revision, mean revision and population score, and counts of what went wrong."""
        votes = self.votes() if votes is None else votes
        scored = [r for r in self.revisions if r.score is not None]
        best = min(scored, key=lambda r: (-r.score, r.revision), default=None)  # ties: the first ref
        return {
            "revisions": len(self.revisions),
            "scored": len(scored),
            "failed": len(self.revisions) - len(scored),
            "best": None if best is None else {"revision": best.revision, "score": best.score},
            "mean": sum(r.score for r in scored) / len(scored) if scored else None,
            "population": {
                "score": sum(v.score for v in votes) / len(votes) if scored else None,
                "prompts": len(votes),
                "ties": sum(1 for v in votes if v.tied),
                "abstained": sum(1 for v in votes if v.voters == 0),
            },
        }
