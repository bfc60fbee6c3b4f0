"""Evaluation without an engine: eval sets and their fingerprints, scorers, and population tallies.

Pure code, shared by the server's evaluation runs (`mintd.service.evaluation`) and the client side
(`mintd.eval.client`, the `mintd eval` CLI), which scores with a Python scorer where one is given.
"""

from mintd.eval.evalset import EvalItem, fingerprint, load_jsonl, parse_items
from mintd.eval.population import PromptVote, RevisionScore, Sample, Tally
from mintd.eval.scorers import BuiltinScorer, PythonScorer, Scorer, ScorerSpec, normalize

__all__ = [
    "BuiltinScorer",
    "EvalItem",
    "PromptVote",
    "PythonScorer",
    "RevisionScore",
    "Sample",
    "Scorer",
    "ScorerSpec",
    "Tally",
    "fingerprint",
    "load_jsonl",
    "normalize",
    "parse_items",
]
