"""The NAV triggers on hand-made confidences (no model)."""

import math

import pytest

from edge_sdk.drafter import DraftToken
from edge_sdk.triggers import AdaptiveCumulative, DualThreshold, FixedLength, LastTokenConfidence, cumulative_confidence


def draft(*ps):
    return [DraftToken(i, p, p) for i, p in enumerate(ps)]


def test_cumulative_confidence_is_the_product():
    assert cumulative_confidence(draft(0.5, 0.4, 0.9)) == pytest.approx(0.18)


def test_fixed_length():
    t = FixedLength(3)
    assert [t.should_verify(draft(*[0.9] * n)) for n in (1, 2, 3)] == [False, False, True]


def test_hsl_fires_on_a_low_latest_token():
    t = LastTokenConfidence(r2=0.7)
    assert not t.should_verify(draft(0.2, 0.8)) and t.should_verify(draft(0.9, 0.6))


def test_dual_threshold_either_condition():
    t = DualThreshold(r1=0.3, r2=0.5)
    assert not t.should_verify(draft(0.9, 0.8))          # C = 0.72, P = 0.8
    assert t.should_verify(draft(0.9, 0.4))              # P(d_n) < R2
    assert t.should_verify(draft(0.6, 0.6, 0.6))         # C = 0.216 < R1 while each P >= R2
    assert not DualThreshold(r1=None, r2=0.5).should_verify(draft(0.6, 0.6, 0.6))
    assert not DualThreshold(r1=0.3, r2=None).should_verify(draft(0.9, 0.4))
    assert not DualThreshold(r1=None, r2=None).should_verify(draft(0.1, 0.1))   # the engine's cap ends it


def test_edgellm_threshold_adapts():
    t = AdaptiveCumulative(threshold=0.5, cap=0.95)
    t.on_round(4, 4, draft(0.9, 0.9, 0.9, 0.9))          # fully accepted: draft longer next time
    assert t.threshold == pytest.approx(0.475)
    d = draft(0.8, 0.5, 0.5, 0.5)
    t.on_round(4, 1, d)                                    # partial: divided by C^((n-a)/n)
    assert t.threshold == pytest.approx(min(0.95, 0.475 / cumulative_confidence(d) ** 0.75))
    for _ in range(20):
        t.on_round(4, 0, draft(0.1, 0.1, 0.1, 0.1))
    assert t.threshold == 0.95                             # capped
