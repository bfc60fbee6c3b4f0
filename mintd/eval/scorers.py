"""Scorers: an output text and an item -> the normalized answer it gives, and its score in [0, 1].

The answer is what a population votes on (`mintd.eval.population`); the score is what a revision's
evaluation averages. Built in, described by a `ScorerSpec` (what the REST body and the catalog record
carry):

  exact_match  the normalized output equals the normalized expected answer
  contains     the normalized output contains the normalized expected answer
  regex        `pattern` is searched in the output; its first group (else the whole match) is the
               answer, compared normalized with the expected one; no match gives no answer
  numeric      the last number in the output (or in `pattern`'s first group) is the answer, correct
               within `tolerance` (absolute) or `rel_tolerance` (relative) of the expected number

Normalizing strips the text, collapses runs of whitespace, and case-folds unless `case_sensitive`.
A Python scorer (`module:function`, from the CLI or the Python helper) is called as
`function(output, item) -> bool | float` with the item as a JSON object; its votes are the
normalized outputs.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mintd.eval.evalset import EvalItem

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*)?\.?\d+(?:[eE][-+]?\d+)?")
_PYTHON = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Scorer(Protocol):
    name: str  # the default metric name

    def answer(self, output: str) -> str | None: ...

    def score(self, output: str, item: EvalItem) -> float: ...


class ScorerSpec(BaseModel):
    """A built-in scorer and its options."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exact_match", "contains", "regex", "numeric"] = "exact_match"
    pattern: str | None = Field(None, max_length=1024, description="regex: required; numeric: optional")
    tolerance: float = Field(0.0, ge=0, allow_inf_nan=False, description="numeric: absolute tolerance")
    rel_tolerance: float = Field(0.0, ge=0, allow_inf_nan=False, description="numeric: relative tolerance")
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _pattern(self) -> ScorerSpec:
        if self.kind == "regex" and not self.pattern:
            raise ValueError("scorer.pattern: the regex scorer needs a pattern")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"scorer.pattern: not a regular expression ({exc})") from None
        return self

    def build(self) -> Scorer:
        return BuiltinScorer(self)


def normalize(text: str, case_sensitive: bool = False) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def parse_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def number_text(value: float) -> str:
    """One spelling per number, so "4", "4.0" and "+4" vote together."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class BuiltinScorer:
    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self.name = spec.kind
        self._pattern = None if spec.pattern is None else re.compile(spec.pattern)

    def answer(self, output: str) -> str | None:
        kind = self.spec.kind
        if kind in ("exact_match", "contains"):
            return normalize(output, self.spec.case_sensitive)
        text = output
        if self._pattern is not None:
            m = self._pattern.search(output)
            if m is None:
                return None
            text = m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)
        if kind == "regex":
            return normalize(text, self.spec.case_sensitive)
        numbers = [v for v in map(parse_number, _NUMBER.findall(text)) if v is not None]
        return number_text(numbers[-1]) if numbers else None

    def score(self, output: str, item: EvalItem) -> float:
        got = self.answer(output)
        if got is None:
            return 0.0
        kind = self.spec.kind
        if kind == "numeric":
            expected = parse_number(item.expected)
            return float(
                expected is not None
                and math.isclose(
                    float(got), expected, rel_tol=self.spec.rel_tolerance, abs_tol=self.spec.tolerance
                )
            )
        expected = normalize(item.expected, self.spec.case_sensitive)
        return float(expected in got if kind == "contains" else expected == got)

    def check(self, items: list[EvalItem], field_name: str = "eval_set") -> None:
        """The numeric scorer needs numeric expected answers: say which item has none."""
        if self.spec.kind != "numeric":
            return
        for i, item in enumerate(items):
            if parse_number(item.expected) is None:
                raise ValueError(f"{field_name}[{i}].expected: {item.expected!r} is not a number")


class PythonScorer:
    """`module:function` called as function(output, item_json) -> bool | float in [0, 1]."""

    def __init__(self, target: str) -> None:
        if not _PYTHON.match(target):
            raise ValueError(f"scorer: {target!r} must look like module:function")
        module_name, _, function = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"scorer: cannot import {module_name!r} ({exc})") from None
        fn = getattr(module, function, None)
        if not callable(fn):
            raise ValueError(f"scorer: {module_name!r} has no function {function!r}")
        self.name = function
        self.target = target
        self._fn: Callable[[str, dict[str, Any]], Any] = fn

    def answer(self, output: str) -> str | None:
        return normalize(output)

    def score(self, output: str, item: EvalItem) -> float:
        value = self._fn(output, item.as_json())
        if isinstance(value, bool | int | float) and 0 <= float(value) <= 1:
            return float(value)
        raise ValueError(
            f"scorer: {self.target} returned {value!r} for item {item.id!r}; expected a bool or 0..1"
        )
