"""Eval sets: JSONL items, field-named errors, and a fingerprint that follows content, not layout."""

from __future__ import annotations

import json

import pytest

from mintd.eval import fingerprint, load_jsonl, parse_items


def test_prompts_chats_ids_and_extra_fields() -> None:
    items = load_jsonl(
        '{"id": "a", "prompt": "2+2=", "expected": "4"}\n\n'
        '{"messages": [{"role": "user", "content": "hi"}], "expected": 3.5, "topic": "x"}\n'
        '{"id": 7, "prompt": "p", "expected": 12}\n'
    )
    assert [i.id for i in items] == ["a", "1", "7"]  # default id: the position
    assert items[0].prompt == "2+2=" and items[1].messages == ({"role": "user", "content": "hi"},)
    assert [i.expected for i in items] == ["4", "3.5", "12"]
    assert items[1].as_json() == {
        "id": "1",
        "expected": "3.5",
        "messages": [{"role": "user", "content": "hi"}],
        "topic": "x",
    }


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "eval_set: holds no items"),
        (["x"], "eval_set[0]: must be a JSON object"),
        ([{"prompt": "p"}], "eval_set[0].expected"),
        ([{"prompt": "p", "expected": True}], "eval_set[0].expected"),
        ([{"expected": "1"}], "eval_set[0]: give exactly one of prompt"),
        ([{"prompt": "p", "messages": [], "expected": "1"}], "eval_set[0]: give exactly one of prompt"),
        ([{"prompt": "", "expected": "1"}], "eval_set[0].prompt"),
        ([{"messages": [{"role": "robot", "content": "x"}], "expected": "1"}], "eval_set[0].messages[0]"),
        (
            [{"id": "a", "prompt": "p", "expected": "1"}, {"id": "a", "prompt": "q", "expected": "2"}],
            "eval_set[1].id",
        ),
        ([{"id": "", "prompt": "p", "expected": "1"}], "eval_set[0].id"),
    ],
)
def test_bad_items_are_named(rows: list, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_items(rows)


def test_a_bad_line_is_named() -> None:
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_jsonl('{"prompt": "p", "expected": "1"}\n{oops\n')


def test_the_fingerprint_follows_content_not_layout() -> None:
    rows = [{"id": "a", "prompt": "2+2=", "expected": "4"}, {"id": "b", "prompt": "3+3=", "expected": "6"}]
    spaced = "\n".join(json.dumps(r, indent=None, separators=(", ", ": ")) for r in rows)
    reordered_keys = "\n".join(json.dumps(dict(reversed(list(r.items())))) for r in rows)
    base = fingerprint(parse_items(rows))
    assert base.startswith("sha256:") and len(base) == 7 + 64
    assert fingerprint(load_jsonl(spaced)) == base == fingerprint(load_jsonl(reordered_keys))
    changed = [rows[0], {**rows[1], "expected": "7"}]
    assert fingerprint(parse_items(changed)) != base
    assert fingerprint(parse_items(list(reversed(rows)))) != base  # the order is part of the set
