"""Non-autoregressive verification (NAV): the acceptance rule, free of models and I/O."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def greedy_accept(draft: Sequence[int], logits: np.ndarray) -> tuple[int, int]:
    """Accept the longest draft prefix equal to the target's argmax; return (accepted, next token).

    ``logits`` has len(draft) + 1 rows: row i is the target's distribution after the
    committed prefix plus draft[:i]. The next token is the target's argmax at the first
    rejected position (a correction) or after the whole draft (a bonus token), so every
    round commits accepted + 1 tokens and the output equals target-only greedy decoding.
    """
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} logits rows, got {logits.shape[0]}")
    predicted = logits.argmax(axis=-1)
    accepted = 0
    while accepted < len(draft) and draft[accepted] == predicted[accepted]:
        accepted += 1
    return accepted, int(predicted[accepted])
