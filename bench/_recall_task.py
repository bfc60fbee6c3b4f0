"""The synthetic cross-session profile-recall task of the δ-mem design note (§6), as token ids.

A user is a random profile (one value per attribute). Session 1 tells K of its facts ("my pet 17.")
and the assistant acknowledges; distractor sessions follow (chit-chat, optionally other people's
facts); the last session asks for one told attribute and the answer is its value. Every session is a
chat turn in the base's template, so the same ids are what a client writes through `/completions`.
Seeded: the same seed gives the same users, so training and held-out users never overlap by seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# 8 attributes whose last token (in the tiny tokenizer) differs: "my pet 17." puts the value right after
# the token that names its attribute, the pattern a two-layer model's induction head can copy from
ATTRIBUTES = ("pet", "color", "food", "drink", "job", "car", "tree", "song")
VALUES = tuple(str(v) for v in range(10, 26))  # 16 values, each one token " 10" ... " 25"
PEOPLE = ("alice", "bob", "carol", "dave", "eve", "frank", "grace", "henry")
CHIT_CHAT = (
    ("Hello! Who are you?", "Hello! I am a small assistant."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("Name three animals.", "A cat, a dog, and a horse."),
    ("Which animal is the biggest?", "The blue whale is the biggest animal."),
    ("Can you count to five?", "Yes: one, two, three, four, five."),
    ("What is 3 + 4?", "3 + 4 = 7."),
    ("What is 6 * 7?", "6 * 7 = 42."),
    ("Thank you!", "You are welcome. Have a good day!"),
    ("Is it sunny today?", "It is sunny today. Tomorrow it may rain."),
)
ACK = "ok."


@dataclass(frozen=True)
class TaskConfig:
    facts: int = 2  # K: facts told in session 1
    distractor_sessions: int = 0
    other_facts: int = 0  # facts about other people in each distractor session (0: chit-chat only)

    @property
    def chance(self) -> float:
        return 1 / len(VALUES)


@dataclass(frozen=True)
class Episode:
    """One user: `sessions` (token ids each; the last is the question and the start of the answer, "your
    pet is"), the `answer` ids (the value, then the end of the turn), the asked attribute and the facts."""

    sessions: tuple[tuple[int, ...], ...]
    answer: tuple[int, ...]
    asked: str
    facts: dict[str, str]

    @property
    def value(self) -> str:
        return self.facts[self.asked]

    def segment_ids(self) -> list[int]:
        """The session of each token of `sessions` + `answer` (the answer belongs to the last)."""
        ids = [i for i, s in enumerate(self.sessions) for _ in s]
        return ids + [len(self.sessions) - 1] * len(self.answer)

    def full_context(self) -> list[int]:
        """Every session in one context: the in-context (oracle) version of the question."""
        return [t for s in self.sessions for t in s]


class Task:
    """Builds episodes for one tokenizer; `episodes(n, seed)` is deterministic."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: TaskConfig) -> None:
        self.tokenizer, self.config = tokenizer, config
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_of_turn = end
        self.value_ids = {v: self._encode(f" {v}") for v in VALUES}
        if any(len(ids) != 1 for ids in self.value_ids.values()):
            raise ValueError("every value must be one token of the tokenizer (exact match on one id)")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _turn(self, user: str, assistant: str | None, answer_prefix: str = "") -> tuple[int, ...]:
        """A whole exchange, or (`assistant` None) the user's turn and the assistant's answer so far."""
        messages = [{"role": "user", "content": user}]
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=assistant is None, return_dict=True
        )["input_ids"]
        return tuple(ids) + tuple(self._encode(answer_prefix))

    def episode(self, rng: random.Random) -> Episode:
        k = self.config.facts
        told = rng.sample(ATTRIBUTES, k)
        facts = {a: rng.choice(VALUES) for a in told}
        sessions = [self._turn(" ".join(f"my {a} {v}." for a, v in facts.items()), ACK)]
        for _ in range(self.config.distractor_sessions):
            question, reply = rng.choice(CHIT_CHAT)
            others = [
                f"{rng.choice(PEOPLE)}'s {rng.choice(ATTRIBUTES)} {rng.choice(VALUES)}."
                for _ in range(self.config.other_facts)
            ]
            sessions.append(self._turn(" ".join([*others, question]), reply if not others else ACK))
        asked = rng.choice(told)
        sessions.append(self._turn(f"what is my {asked}?", None, f"your {asked}"))
        answer = (self.value_ids[facts[asked]][0], self.end_of_turn)
        return Episode(tuple(sessions), answer, asked, facts)

    def episodes(self, count: int, seed: int) -> list[Episode]:
        rng = random.Random(seed)
        return [self.episode(rng) for _ in range(count)]

    def decode_value(self, generated: list[int]) -> str:
        """The answer text of generated ids: up to the end of turn, stripped (exact match compares it)."""
        if self.end_of_turn in generated:
            generated = generated[: generated.index(self.end_of_turn)]
        return self.tokenizer.decode(generated).strip()


def swap_partners(episodes: list[Episode]) -> list[int]:
    """For each user i, another user j who told i's asked attribute with a different value: j's state
    answering i's question must say j's value if the information is in the state."""
    partners = []
    n = len(episodes)
    for i, e in enumerate(episodes):
        for step in range(1, n):
            j = (i + step) % n
            other = episodes[j].facts.get(e.asked)
            if other is not None and other != e.value:
                partners.append(j)
                break
        else:
            raise ValueError(f"no swap partner for user {i}: too few held-out users")
    return partners
