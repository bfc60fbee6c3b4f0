"""Built-in scorers: the answer each extracts (what populations vote on) and its score."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from mintd.eval import EvalItem, PythonScorer, ScorerSpec, normalize


def item(expected: str) -> EvalItem:
    return EvalItem("q", expected, prompt="p")


def test_normalize() -> None:
    assert normalize("  Paris\n  France ") == "paris france"
    assert normalize(" Paris ", case_sensitive=True) == "Paris"


@pytest.mark.parametrize(
    ("spec", "output", "expected", "answer", "score"),
    [
        ({"kind": "exact_match"}, " Paris ", "paris", "paris", 1.0),
        ({"kind": "exact_match"}, "Paris.", "paris", "paris.", 0.0),
        ({"kind": "exact_match", "case_sensitive": True}, "paris", "Paris", "paris", 0.0),
        ({"kind": "contains"}, "It is  Paris, France", "paris, france", "it is paris, france", 1.0),
        ({"kind": "contains"}, "Lyon", "paris", "lyon", 0.0),
        ({"kind": "regex", "pattern": r"answer: (\w+)"}, "so the answer: Paris!", "paris", "paris", 1.0),
        ({"kind": "regex", "pattern": r"\d+"}, "x 42 y", "42", "42", 1.0),
        ({"kind": "regex", "pattern": r"answer: (\w+)"}, "no idea", "paris", None, 0.0),
        ({"kind": "numeric"}, "3 apples and 4.0 pears", "4", "4", 1.0),
        ({"kind": "numeric"}, "total: 1,234.5", "1234.5", "1234.5", 1.0),
        ({"kind": "numeric"}, "-7", "-7.0", "-7", 1.0),
        ({"kind": "numeric"}, "3.14", "3.1416", "3.14", 0.0),
        ({"kind": "numeric", "tolerance": 0.01}, "3.14", "3.1416", "3.14", 1.0),
        ({"kind": "numeric", "rel_tolerance": 0.1}, "105", "100", "105", 1.0),
        ({"kind": "numeric"}, "none", "1", None, 0.0),
        ({"kind": "numeric", "pattern": r"#### (.*)"}, "12 steps #### 30", "30", "30", 1.0),
    ],
)
def test_builtin_scorers(spec: dict, output: str, expected: str, answer: str | None, score: float) -> None:
    scorer = ScorerSpec(**spec).build()
    assert scorer.answer(output) == answer
    assert scorer.score(output, item(expected)) == score


def test_numeric_needs_numeric_expected_answers() -> None:
    scorer = ScorerSpec(kind="numeric").build()
    scorer.check([item("4"), item("1e3")])
    with pytest.raises(ValueError, match=r"eval_set\[1\].expected: 'four' is not a number"):
        scorer.check([item("4"), item("four")])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "regex"}, "needs a pattern"),
        ({"kind": "regex", "pattern": "("}, "not a regular expression"),
        ({"kind": "numeric", "tolerance": -1}, "tolerance"),
        ({"kind": "bleu"}, "kind"),
    ],
)
def test_bad_specs_are_refused(spec: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ScorerSpec(**spec)


def test_python_scorers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scores.py").write_text(
        "def starts(output, item):\n    return output.strip().startswith(item['expected'])\n"
        "def bad(output, item):\n    return 'yes'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = PythonScorer("my_scores:starts")
    assert scorer.name == "starts"
    assert scorer.score(" Paris is big", item("Paris")) == 1.0
    assert scorer.score("Lyon", item("Paris")) == 0.0
    assert scorer.answer("  Paris  IS ") == "paris is"
    with pytest.raises(ValueError, match="expected a bool or 0..1"):
        PythonScorer("my_scores:bad").score("x", item("y"))
    for target, message in [
        ("nope", "must look like module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("my_scores:missing", "has no function"),
    ]:
        with pytest.raises(ValueError, match=message):
            PythonScorer(target)
    sys.modules.pop("my_scores", None)
