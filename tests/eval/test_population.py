"""Population tallies on constructed populations: majority answers, ties, abstentions, and the
population score next to the best single revision and the mean."""

from __future__ import annotations

import pytest

from mintd.eval import EvalItem, ScorerSpec, Tally

ITEMS = [EvalItem(f"q{i}", expected, prompt=f"p{i}") for i, expected in enumerate(["4", "paris", "7", "x"])]


def tally(kind: str = "exact_match") -> Tally:
    return Tally(ITEMS, ScorerSpec(kind=kind).build())


def test_majority_vote_over_normalized_answers() -> None:
    t = tally()
    t.add("r1", ["4", "Paris", "7", "y"])
    t.add("r2", [" 4 ", "paris ", "8", "y"])
    t.add("r3", ["5", "Lyon", "7", "z"])
    votes = t.votes()
    assert [v.answer for v in votes] == ["4", "paris", "7", "y"]  # "Paris" and "paris " vote together
    assert [(v.votes, v.voters) for v in votes] == [(2, 3), (2, 3), (2, 3), (2, 3)]
    assert [v.score for v in votes] == [1.0, 1.0, 1.0, 0.0]
    assert not any(v.tied for v in votes)
    summary = t.summary(votes)
    assert summary["population"] == {"score": 0.75, "prompts": 4, "ties": 0, "abstained": 0}
    assert summary["best"] == {"revision": "r1", "score": 0.75}  # r1 and r2 tie at 0.75: the first ref
    assert summary["mean"] == pytest.approx((0.75 + 0.5 + 0.25) / 3)


def test_population_beats_every_member() -> None:
    """Three revisions each right on a different two of three prompts: the majority is right on all."""
    items = ITEMS[:3]
    t = Tally(items, ScorerSpec().build())
    t.add("a", ["4", "paris", "0"])
    t.add("b", ["4", "no", "7"])
    t.add("c", ["no", "paris", "7"])
    summary = t.summary()
    assert summary["population"]["score"] == 1.0
    assert summary["best"]["score"] == pytest.approx(2 / 3) and summary["mean"] == pytest.approx(2 / 3)


def test_ties_are_reported_and_score_the_fraction_correct() -> None:
    t = tally()
    t.add("a", ["4", "paris", "7", "x"])
    t.add("b", ["5", "paris", "6", "y"])
    t.add("c", ["6", "lyon", "7", "x"])
    t.add("d", ["4", "lyon", "6", "y"])
    votes = t.votes()
    assert votes[0].tied == () and votes[0].answer == "4" and votes[0].score == 1.0
    assert votes[1].tied == ("lyon", "paris") and votes[1].answer == "lyon" and votes[1].score == 0.5
    assert votes[2].tied == ("6", "7") and votes[2].score == 0.5
    assert votes[3].tied == ("x", "y") and votes[3].votes == 2 and votes[3].voters == 4
    summary = t.summary(votes)
    assert summary["population"] == {
        "score": (1 + 0.5 + 0.5 + 0.5) / 4,
        "prompts": 4,
        "ties": 3,
        "abstained": 0,
    }


def test_no_answer_abstains_and_failed_revisions_do_not_vote() -> None:
    t = Tally(ITEMS[:2], ScorerSpec(kind="numeric").build())
    t.add("a", ["it is 4", "no number"])
    t.add("b", ["4.0", "none"])
    t.add("c", ["5", "nothing"])
    failed = t.fail("d", "checksum mismatch")
    assert failed.score is None and failed.error == "checksum mismatch"
    votes = t.votes()
    assert (votes[0].answer, votes[0].votes, votes[0].voters) == ("4", 2, 3)
    assert (votes[1].answer, votes[1].voters, votes[1].score) == (None, 0, 0.0)
    summary = t.summary(votes)
    assert summary["failed"] == 1 and summary["scored"] == 3
    assert summary["population"]["abstained"] == 1 and summary["population"]["score"] == 0.5
    assert summary["mean"] == pytest.approx(1 / 3)  # the failed revision is not averaged in


def test_outputs_must_cover_every_item() -> None:
    with pytest.raises(ValueError, match="2 outputs for 4 items"):
        tally().add("a", ["1", "2"])
