"""Eval sets: JSONL items (a prompt or chat messages, the expected answer, an optional id) and their
fingerprint.

One item per line, e.g. `{"id": "q1", "prompt": "2+2=", "expected": "4"}` or
`{"messages": [{"role": "user", "content": "2+2?"}], "expected": 4}`. Other fields are kept and handed
to a Python scorer. The fingerprint is the sha256 of the canonical set (each item as sorted, compact
JSON, one per line, in order), so the same questions in another file layout fingerprint alike and any
change to a question, answer or id does not.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mintd.config import MAX_EVAL_ITEMS as MAX_ITEMS

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class EvalItem:
    id: str
    expected: str  # numbers are kept as their JSON text
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The item as a JSON object (what a Python scorer receives, and what is fingerprinted)."""
        out: dict[str, Any] = {**self.extra, "id": self.id, "expected": self.expected}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["messages"] = [dict(m) for m in self.messages or ()]
        return out


def parse_items(rows: Iterable[Any], field_name: str = "eval_set") -> list[EvalItem]:
    """JSON objects -> items; ValueError naming `field_name[i].<field>` for the first bad one."""
    items: list[EvalItem] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if i >= MAX_ITEMS:
            raise ValueError(f"{field_name}: more than {MAX_ITEMS} items")
        item = _item(row, i, f"{field_name}[{i}]")
        if item.id in seen:
            raise ValueError(f"{field_name}[{i}].id: {item.id!r} appears twice")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ValueError(f"{field_name}: holds no items")
    return items


def load_jsonl(text: str, field_name: str = "eval_set") -> list[EvalItem]:
    """A JSONL document (blank lines skipped) -> items; errors name the line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field_name}: line {number} is not JSON ({exc.msg})") from None
    return parse_items(rows, field_name)


def fingerprint(items: list[EvalItem]) -> str:
    lines = (
        json.dumps(i.as_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False) for i in items
    )
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _item(row: Any, index: int, where: str) -> EvalItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: must be a JSON object")
    extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages", "expected")}
    item_id = row.get("id", str(index))
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    if not isinstance(item_id, str) or not item_id or len(item_id) > 256:
        raise ValueError(f"{where}.id: must be a string (or integer) of 1-256 characters")
    expected = row.get("expected")
    if isinstance(expected, bool) or not isinstance(expected, str | int | float):
        raise ValueError(f"{where}.expected: must be a string or a number")
    if isinstance(expected, float) and not math.isfinite(expected):
        raise ValueError(f"{where}.expected: must be a finite number")
    expected = expected if isinstance(expected, str) else json.dumps(expected)
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError(f"{where}: give exactly one of prompt (a string) or messages (a chat)")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}.prompt: must be a non-empty string")
        return EvalItem(item_id, expected, prompt=prompt, extra=extra)
    return EvalItem(item_id, expected, messages=_messages(messages, f"{where}.messages"), extra=extra)


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{j}]: must be {{role: {' | '.join(_ROLES)}, content: string}}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)
