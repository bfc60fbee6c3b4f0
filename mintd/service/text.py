"""Text from a stream of token ids, as the OpenAI endpoint returns it: step by step, and cut at a stop
string.

Streamed deltas and a whole answer come from the same `TextAssembler`, so the concatenated deltas of a
stream are exactly the text of the same tokens answered at once. A token that ends inside a multi-byte
character is held back until the character is complete; text that could be the start of a stop string
is held back until it cannot, and the stop string itself (and anything after it) is never returned.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextAssembler:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found: nothing more is returned
        self._prefix = 0  # tokens before this one decode to a stable prefix (incremental decoding)
        self._read = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Take one more token; the text that may be returned now (often empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: whatever is still held back (an incomplete character is returned as is)."""
        if not self.stopped:
            before = self._decode(self.tokens[self._prefix : self._read])
            self.text += self._decode(self.tokens[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.tokens)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        elif final or not self.stop:
            end = len(self.text)
        else:  # keep back what could still grow into a stop string
            end = len(self.text) - max(_overlap(self.text, s) for s in self.stop)
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
