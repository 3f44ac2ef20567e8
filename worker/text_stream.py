"""Incremental detokenization for OpenAI-style text output, with stop strings cut off as OpenAI does.

`TextStream.push(token)` returns the text that is safe to emit now: it holds back an incomplete UTF-8 character
(the tokenizer decodes it as U+FFFD) and any suffix that could still grow into a stop string. `finish()` returns
the rest. The emitted pieces always concatenate to `text`, which ends before the first stop string.

Limits: decodes the whole sequence at every token (O(n²) in the sequence length; fine for chat-length outputs).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _cut_at_stop(self, text: str) -> tuple[str, bool]:
        hits = [text.find(s) for s in self.stop_strings if s in text]
        return (text[: min(hits)], True) if hits else (text, False)

    def _held_back(self, text: str) -> int:
        """How many trailing characters might be the start of a stop string."""
        longest = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text, self.stopped = self._cut_at_stop(self._decoded())
        if not self.stopped:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self._held_back(text)]
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def finish(self) -> str:
        text, self.stopped = self._cut_at_stop(self._decoded())
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    @property
    def text(self) -> str:
        return self.sent
