"""Incremental detokenisation with stop strings.

Emits only text that is final: never half of a multi-byte character (the tokenizer shows
it as U+FFFD until the rest arrives) and never the beginning of a stop string that may
still complete.
"""

from __future__ import annotations

from typing import Any


class StreamDecoder:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of `text` already handed out
        self.text = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that could be the start of a stop string."""
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly final text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = text.find(s, max(0, self.emitted - len(s)))
            if cut != -1:
                self.stopped = True
                text = text[:cut]
        self.text = text
        if self.stopped:
            return self.flush()
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete UTF-8 sequence: wait for the next token
        end -= self._held_back(text[:end])
        if end <= self.emitted:
            return ""
        delta = text[self.emitted : end]
        self.emitted = end
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation).

        A multi-byte character cut off by the token limit is dropped, not sent as U+FFFD.
        """
        self.text = self.text.rstrip("\ufffd")
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
