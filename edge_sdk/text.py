"""Turning committed token ids into text: incremental UTF-8, stop sequences, streaming holdback."""

from __future__ import annotations

import codecs
from typing import Callable, Sequence


class TextAssembler:
    """Accumulates token bytes into text and finds stop sequences.

    Tokens are byte-level, so one character may span several tokens: an incremental
    UTF-8 decoder holds partial characters. While streaming, text that could still
    become the start of a stop sequence is held back, so a caller never receives
    text that is later cut off.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in stop if s]
        self.text = ""         # all text so far (after a stop: cut before the stop sequence)
        self.released = 0      # characters of `text` handed to the caller
        self.stopped = False

    def add(self, token: int) -> str:
        """Add one token; return the text that can be released now (maybe empty)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(self._token_bytes(token))
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.released - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._holdback())
        return self._release(len(self.text))

    def finish(self) -> str:
        """Flush held-back text and any partial character at the end of generation."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _holdback(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop sequence."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released: upto], upto
        return out
