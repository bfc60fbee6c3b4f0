"""The OpenAI wire format: request bodies, validated once, here.

Every parameter mintd does not implement is refused with a 400 naming it, never ignored; a few that
clients send with their no-op value (`presence_penalty: 0`, `echo: false`, ...) are accepted when, and
only when, they carry that value. Extensions, as in vLLM: `top_k`, `ignore_eos` and
`return_tokens_as_token_ids`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from mintd.config import MAX_ID_CHARS, MAX_INT

MAX_STOP = 16  # stop strings per request
MAX_TOP_LOGPROBS = 20
_NOOP: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,  # meaningless without tools
    "response_format": lambda v: v in (None, {"type": "text"}),
    "store": lambda v: v in (None, False),
    "metadata": lambda v: not v,
}

Text = Annotated[str, StringConstraints(max_length=1_000_000)]
Stop = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=MAX_INT, description="extension: sample from the k likeliest (-1: all)")
    n: int = Field(1, ge=1, le=128)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-MAX_INT, le=MAX_INT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: generate max_tokens tokens, EOS or not")
    return_tokens_as_token_ids: bool = Field(
        False, description="extension: logprobs name tokens as `token_id:<id>` rather than their text"
    )
    user: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        None,
        description="the end user: for a δ-mem model, the memory instance the request reads and writes "
        "(see README, serving δ-mem); for any other model a label, unused",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_ops(cls, data: Any) -> Any:
        """Drop parameters sent with their no-op value; refuse them with any other."""
        if not isinstance(data, dict):
            return data
        for name, is_noop in _NOOP.items():
            if name in data:
                if not is_noop(data[name]):
                    raise ValueError(f"{name}: not supported by mintd (only its default value is accepted)")
                data = {k: v for k, v in data.items() if k != name}
        return data

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Request):
    prompt: Any = Field(
        description="a string, a list of token ids, or a list of either (several prompts, n choices each)"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=128, description="accepted only when equal to n")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int] | list[str | list[int]]:
        if isinstance(value, str) or _token_ids(value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) or _token_ids(p) for p in value):
            return value
        raise ValueError(
            "prompt: must be a string, a non-empty list of token ids (non-negative integers), or a "
            "non-empty list of those"
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT for t in value)
    )


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
