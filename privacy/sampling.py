"""Sampling arithmetic both sides must do bit-identically: truncation, the sparse draft distribution,
and where each random number comes from.

- ``truncate``: temperature, then top-k, then top-p (the order transformers applies them), over a
  logits row; returns the support and its renormalised probabilities. The draft's q and the target's
  p use the same function with the same parameters, so "the same truncation" is literal.
- ``SparseDist``: q as it travels: the support's ids (uint32) and float16 probabilities. The draft
  samples from the *dequantised* float16 values (``probs()``), which the verifier recomputes from the
  same bytes: the q the verifier tests against is exactly the q the draft sampled from.
- ``uniforms``: the random numbers of a position come from a generator keyed by (seed, absolute
  position, stream), not from a running generator. Which tokens a round drafts ahead, how the upload
  is batched, or a retried request do not consume randomness, so a seeded run's text depends only on
  the seed and the policy's round boundaries. Stream 0 is the draft's, stream 1 the verifier's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAFT_STREAM, TARGET_STREAM = 0, 1


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax; top_k/top_p/seed unused). top_k 0 and top_p 1 disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be in [0, 100], not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if not (0 <= self.seed < 2 ** 64):
            raise ValueError("seed must be an unsigned 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return {"t": float(self.temperature), "k": self.top_k, "p": float(self.top_p), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return cls(float(d["t"]), int(d["k"]), float(d["p"]), int(d["seed"]))


def truncate(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(support ids ascending-by-probability-rank, float64 probabilities summing to 1)."""
    z = np.asarray(logits, dtype=np.float64)
    z = (z - z.max()) / params.temperature       # shift first: a tiny temperature cannot overflow to inf - inf
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    probs = p[order]
    if params.top_p < 1.0:
        cum = np.cumsum(probs)
        keep = int(np.searchsorted(cum, params.top_p * cum[-1], side="left")) + 1   # include the crossing token
        order, probs = order[:keep], probs[:keep]
    return order.astype(np.int64), probs / probs.sum()


@dataclass(frozen=True)
class SparseDist:
    """A draft distribution as it travels: support ids and float16 probabilities (zeros dropped)."""

    ids: np.ndarray     # uint32
    p16: np.ndarray     # float16

    @classmethod
    def quantize(cls, ids: np.ndarray, probs: np.ndarray) -> "SparseDist":
        p16 = probs.astype(np.float16)
        nz = p16 > 0
        if not nz.any():               # cannot happen for a normalised row, but never send an empty q
            nz[int(np.argmax(probs))] = True
            p16[nz] = np.float16(1.0)
        return cls(ids[nz].astype(np.uint32), p16[nz])

    def probs(self) -> np.ndarray:
        """The exact distribution both sides use: the float16 values, renormalised in float64."""
        p = self.p16.astype(np.float64)
        return p / p.sum()

    def prob_of(self, token: int) -> float:
        hit = np.nonzero(self.ids == token)[0]
        return float(self.probs()[hit[0]]) if len(hit) else 0.0

    def __len__(self) -> int:
        return len(self.ids)


def uniforms(seed: int, position: int, stream: int, n: int = 2) -> np.ndarray:
    """`n` uniforms in [0, 1) for absolute token `position` of a sequence, from a keyed generator."""
    return np.random.default_rng([seed, position, stream]).random(n)


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF sample: the index whose cumulative probability first exceeds `u`."""
    cum = np.cumsum(probs)
    return min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(probs) - 1)
