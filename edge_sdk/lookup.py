"""Guesses of the target's next token that cost no drafting: prompt lookup.

A round drafted ahead begins with a guess of the target's token after the round it is drafted on
(``engine._round_on``). Where the draft model is slow next to the target's pass (the paper's 36 ms
laptop, a phone), drafting that guess costs more than it is worth, and PipeSD would let the target
decode alone: one token per round trip. A guess that costs nothing still pays there, right or wrong:
right, the round after it is verified without a round trip of its own; wrong, the verifier answers
it rebased (``VerifyRequest.after``) with the target's next token -- two tokens per round trip and
two passes instead of one.

``LookupGuesser`` guesses the token that followed the latest earlier occurrence of the output's last
three, two or one tokens in the generation's prompt and output (prompt lookup decoding, Saxena 2023;
code and chat repeat themselves), else the last token again. It indexes the committed sequence as it
grows (one dict from 3-, 2- and 1-grams to the token after them) and scores itself on every committed token -- what it would have guessed before seeing it -- so the
controller knows how often a looked-up guess is right whether or not it is using them.
"""

from __future__ import annotations

from typing import Sequence

ORDERS = (3, 2, 1)


class LookupGuesser:
    def __init__(self, decay: float = 0.98):
        self._next: dict[tuple[int, ...], int] = {}     # n-gram -> the token that followed it last
        self._len, self._last = 0, None                 # the committed sequence indexed so far: its length, last token
        self.decay = decay
        self._hits, self._seen = 0.0, 0.0               # decayed counts: a memory of ~50 tokens
        self._scored = 0

    MIN_SCORED = 16            # a rate from fewer guesses than this is no rate

    @property
    def hit_rate(self) -> float | None:
        """How often the guess before a committed token was that token, recently (None before MIN_SCORED)."""
        return self._hits / self._seen if self._scored >= self.MIN_SCORED else None

    def start(self, prompt: Sequence[int]) -> None:
        """A new generation: forget the last one's sequence, index `prompt` (its tokens are not scored)."""
        self._next.clear()
        self._len, self._last = 0, None
        self.observe(prompt, scored_from=len(prompt))

    def guess(self, tokens: Sequence[int]) -> int:
        """The token the index expects after `tokens` (an assumed sequence may run past the indexed one)."""
        for n in ORDERS:
            if len(tokens) >= n:
                nxt = self._next.get(tuple(tokens[-n:]))
                if nxt is not None:
                    return nxt
        return tokens[-1]

    def observe(self, tokens: Sequence[int], scored_from: int) -> None:
        """Index the committed sequence `tokens`; score the guesses for its new positions from `scored_from`
        on (a prompt is indexed, not scored). A sequence that does not extend the one indexed (a new
        generation, a revised tail) is indexed anew from its start: guesses come from the generation's own
        prompt and output only. (An index kept across requests would also recall earlier answers -- a
        cache of outputs, which repeated benchmark prompts would turn into perfect guesses.)"""
        have = self._len
        if have > len(tokens) or (have and tokens[have - 1] != self._last):
            have = 0
            self._next.clear()
        for i in range(have, len(tokens)):
            if i >= max(scored_from, 1):
                hit = float(self.guess(tokens[max(0, i - ORDERS[0]):i]) == tokens[i])
                self._hits = self._hits * self.decay + hit
                self._seen = self._seen * self.decay + 1.0
                self._scored += 1
            for n in ORDERS:
                if i >= n:
                    self._next[tuple(tokens[i - n:i])] = tokens[i]
        self._len, self._last = len(tokens), tokens[-1] if tokens else None
