"""Decoding policies: how the edge drafts, uploads and triggers verification.

A policy is plain configuration plus a trigger (``triggers.py``): no I/O. The engine reads
three knobs -- the trigger, the upload ``schedule`` and whether to draft ``proactive``ly
while NAV is in flight -- so PipeSD and the paper's baselines run on the same engine:

| policy | trigger | upload schedule | drafts during NAV |
|---|---|---|---|
| vanilla | every k tokens | whole draft at the trigger | no |
| hsl | P(d_n) < R2 | whole draft at the trigger | no |
| edgellm | C_n < adaptive threshold | whole draft at the trigger | yes (uploaded at the next trigger) |
| pipesd | C_n < R1 or P(d_n) < R2, tuned online by BO | DP token batches | yes, uploaded as drafted |

and the ablations ``pipesd_per_token``, ``pipesd_at_trigger`` (no DP), ``pipesd_c_only``,
``pipesd_p_only`` (single threshold), ``pipesd_no_proactive`` and ``pipesd_fixed`` (no BO).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .triggers import (
    DEFAULT_R1,
    DEFAULT_R2,
    AdaptiveCumulative,
    DualThreshold,
    FixedLength,
    LastTokenConfidence,
    Trigger,
)

SCHEDULES = ("at_trigger", "per_token", "dp")


@dataclass
class Policy:
    name: str
    trigger: Trigger | None = None
    schedule: str = "at_trigger"   # at_trigger: whole draft at once; per_token: each token at once; dp: planned
    proactive: bool = False        # keep drafting the next round while NAV is in flight
    autotune: bool = False         # tune the dual threshold's (R1, R2) online
    uses_cloud: bool = True        # False: the draft's tokens are the output (edge-only)
    uses_draft: bool = True        # False: the target decodes alone (cloud-only)
    max_draft: int = 32            # hard cap on a round's draft length

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown upload schedule {self.schedule!r}; choose one of {SCHEDULES}")


MODES = ("pipesd", "vanilla", "hsl", "edgellm", "cloud_only", "edge_only", "pipesd_fixed", "pipesd_per_token",
         "pipesd_at_trigger", "pipesd_c_only", "pipesd_p_only", "pipesd_no_proactive")


def make_policy(mode: str, k: int = 4, r1: float | None = None, r2: float | None = None,
                max_draft: int = 32) -> Policy:
    """A fresh policy by name. ``k`` is vanilla's draft length; ``r1``/``r2`` override thresholds."""
    if mode == "edge_only":
        return Policy(mode, uses_cloud=False)
    if mode == "cloud_only":
        return Policy(mode, uses_draft=False)
    if mode == "vanilla":
        if k < 1:
            raise ConfigError(f"vanilla needs a draft length k >= 1, got {k}")
        return Policy(mode, FixedLength(k), max_draft=k)
    if mode == "hsl":
        return Policy(mode, LastTokenConfidence(r2 if r2 is not None else 0.7, max_draft), max_draft=max_draft)
    if mode == "edgellm":
        return Policy(mode, AdaptiveCumulative(max_draft=max_draft), proactive=True, max_draft=max_draft)
    if mode.startswith("pipesd"):
        r1_, r2_ = (DEFAULT_R1 if r1 is None else r1), (DEFAULT_R2 if r2 is None else r2)
        variants = {
            "pipesd": dict(schedule="dp", proactive=True, autotune=r1 is None and r2 is None),
            "pipesd_fixed": dict(schedule="dp", proactive=True),
            "pipesd_per_token": dict(schedule="per_token", proactive=True),
            "pipesd_at_trigger": dict(schedule="at_trigger", proactive=True),
            "pipesd_c_only": dict(schedule="dp", proactive=True, thresholds=(r1_, None)),
            "pipesd_p_only": dict(schedule="dp", proactive=True, thresholds=(None, r2_)),
            "pipesd_no_proactive": dict(schedule="dp", proactive=False),
        }
        if mode not in variants:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        v = variants[mode]
        t1, t2 = v.pop("thresholds", (r1_, r2_))
        return Policy(mode, DualThreshold(t1, t2, max_draft), max_draft=max_draft, **v)
    raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
