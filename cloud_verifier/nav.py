"""Non-autoregressive verification (NAV): the acceptance rule, free of models and I/O."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from privacy.sampling import TARGET_STREAM, SamplingParams, SparseDist, sample_index, truncate, uniforms


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


def greedy_accept_tree(nodes: Sequence[int], parents: Sequence[int], logits: np.ndarray) -> tuple[list[int], int]:
    """The tree form of ``greedy_accept``: (the accepted path's node indices, the target's next token).

    ``nodes``/``parents`` as in ``VerifyRequest`` (parents precede children, -1 the base, siblings
    distinct). Row 0 of ``logits`` is the target's distribution after the base, row 1 + i after the
    base plus node i's root path. From the base, follow the child whose token is the target's argmax
    until no child is; what the walk accepted is exactly the tokens target-only greedy decoding would
    produce next, and the argmax where it stopped is the correction or bonus token. A chain (parents
    0..n-2 after -1) gives the same answer as ``greedy_accept``.
    """
    if logits.shape[0] != len(nodes) + 1 or len(parents) != len(nodes):
        raise ValueError(f"need {len(nodes) + 1} logits rows and {len(nodes)} parents")
    children: dict[int, dict[int, int]] = {}
    for i, (token, parent) in enumerate(zip(nodes, parents)):
        children.setdefault(parent, {})[token] = i
    predicted = logits.argmax(axis=-1)
    path, at = [], -1
    while True:
        token = int(predicted[at + 1])
        child = children.get(at, {}).get(token)
        if child is None:
            return path, token
        path.append(child)
        at = child


def speculative_accept(draft: Sequence[int], q_rows: Sequence[SparseDist], logits: np.ndarray,
                       params: SamplingParams, first_position: int) -> tuple[int, int]:
    """The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023); (accepted, next token).

    Row i of ``logits`` gives the target's p at absolute position ``first_position + i`` under the
    request's truncation and temperature (``truncate``, the same function the draft used for q).
    Draft token x_i is accepted with probability min(1, p(x_i) / q_i(x_i)); at the first rejection
    the next token is drawn from norm(max(0, p - q_i)); if every token is accepted, a bonus token is
    drawn from p after the last. Each position's two uniforms (accept, resample) come from the
    generator keyed by (seed, position, target stream), so a retried request draws the same.
    The committed tokens are then distributed exactly as the target sampling alone.
    """
    if logits.shape[0] != len(draft) + 1 or len(q_rows) != len(draft):
        raise ValueError(f"need {len(draft) + 1} logits rows and {len(draft)} q rows")
    for i, (x, q) in enumerate(zip(draft, q_rows)):
        ids, p = truncate(logits[i], params)
        accept_u, resample_u = uniforms(params.seed, first_position + i, TARGET_STREAM)
        p_x = float(p[ids == x][0]) if np.any(ids == x) else 0.0
        q_x = q.prob_of(x)
        if q_x > 0 and accept_u < min(1.0, p_x / q_x):
            continue
        dense_p = np.zeros(logits.shape[1])
        dense_p[ids] = p
        residual = dense_p.copy()
        residual[q.ids.astype(np.int64)] -= q.probs()
        np.maximum(residual, 0.0, out=residual)
        if residual.sum() <= 0.0:           # p <= q everywhere: a rejection has probability 0; guard rounding
            residual = dense_p
        support = np.nonzero(residual)[0]
        return i, int(support[sample_index(residual[support], resample_u)])
    ids, p = truncate(logits[-1], params)
    _, bonus_u = uniforms(params.seed, first_position + len(draft), TARGET_STREAM)
    return len(draft), int(ids[sample_index(p, bonus_u)])
