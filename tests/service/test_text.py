"""Text from tokens step by step (service/text): deltas add up to the whole text, characters split over
several byte tokens come out whole, and stop strings end the text before them, even across tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mintd.service.text import TextAssembler


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir: Path):
    return AutoTokenizer.from_pretrained(qwen3_dir)


def _deltas(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    assembler = TextAssembler(tokenizer, stop)
    deltas = [assembler.add(t) for t in tokenizer.encode(text)]
    return [*deltas, assembler.finish()], assembler


def test_deltas_add_up_to_the_text_and_never_split_a_character(tokenizer) -> None:
    text = "héllo wörld ✓ done"
    deltas, assembler = _deltas(tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)  # é, ö and ✓ are 2-3 byte tokens each here
    assert len([d for d in deltas if d]) > 3  # and the text does come out step by step
    assert not assembler.stopped


def test_a_stop_string_ends_the_text_before_it_even_across_tokens(tokenizer) -> None:
    deltas, assembler = _deltas(tokenizer, "The cat sat. STOP here", ("STOP",))
    assert "".join(deltas) == "The cat sat. "
    assert assembler.stopped
    assert assembler.add(tokenizer.encode(" more")[0]) == ""  # nothing after a stop


def test_text_that_may_become_a_stop_string_is_held_back_until_it_cannot(tokenizer) -> None:
    assembler = TextAssembler(tokenizer, ("cat!",))
    released = "".join(assembler.add(t) for t in tokenizer.encode("The cat"))
    assert released == "The "  # "cat" could still become "cat!"
    rest = "".join(assembler.add(t) for t in tokenizer.encode(" sat")) + assembler.finish()
    assert released + rest == "The cat sat" and not assembler.stopped


def test_the_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    deltas, _ = _deltas(tokenizer, "one two three four", ("four", "two", "three"))
    assert "".join(deltas) == "one "
