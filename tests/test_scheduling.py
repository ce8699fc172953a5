"""The token-batch DP against brute force, and the window estimator."""

import itertools
import math
import random

import pytest

from edge_sdk.scheduling import BatchPlan, WindowEstimator, arrival_time, plan_batches


def compositions(n):
    """Every way to cut n tokens into consecutive batches."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        yield sizes + [size]


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    alpha, beta = rng.uniform(0, 0.1), rng.uniform(0, 0.2)
    gamma = [rng.uniform(0.001, 0.08) for _ in range(n)] if seed % 2 else rng.uniform(0.001, 0.08)
    best = min(arrival_time(c, alpha, beta, gamma) for c in compositions(n))
    plan = plan_batches(n, alpha, beta, gamma)
    assert sum(plan) == n and all(s > 0 for s in plan)
    assert arrival_time(plan, alpha, beta, gamma) == pytest.approx(best, abs=1e-12)


def test_paper_shaped_plan():
    # Uplink slower than drafting: small batches first, so the link starts early, then bigger ones.
    plan = plan_batches(20, alpha=0.05, beta=0.03, gamma=0.036)
    assert plan[0] <= plan[-1] and len(plan) > 1


def test_cheap_link_keeps_up_with_drafting():
    # Sending is faster than drafting: only the last token is left to send after it is drafted.
    plan = plan_batches(5, alpha=0.0, beta=0.001, gamma=0.01)
    assert plan[-1] == 1
    assert arrival_time(plan, 0.0, 0.001, 0.01) == pytest.approx(5 * 0.01 + 0.001)


def test_costly_batches_send_everything_at_once():
    assert plan_batches(6, alpha=10.0, beta=0.0, gamma=0.01) == [6]


def test_plan_repeats_across_windows():
    plan = BatchPlan([1, 2, 3])
    ends = [i for i in range(1, 14) if plan.ends_batch(i)]
    assert ends == [1, 3, 6, 7, 9, 12, 13]


def test_window_estimator():
    w = WindowEstimator(initial=20, history=3)
    assert w.value == 20
    for n in (4, 6, 8, 10):
        w.observe(n)
    assert w.value == 8


def test_profiler_recovers_alpha_and_beta():
    from edge_sdk.profiler import LinkProfiler

    rng = random.Random(7)
    prof = LinkProfiler()
    for _ in range(32):
        n = rng.randint(1, 16)
        prof.observe_send(n, 0.020 + 0.004 * n + rng.uniform(-1e-4, 1e-4))
    alpha, beta = prof.alpha_beta()
    assert alpha == pytest.approx(0.020, abs=1e-3) and beta == pytest.approx(0.004, abs=2e-4)


def test_profiler_drift_and_regime():
    from edge_sdk.profiler import LinkProfiler

    prof = LinkProfiler()
    for n in (1, 4, 8):
        prof.observe_send(n, 0.01 + 0.001 * n)
    before = prof.estimate()
    for n in (1, 4, 8) * 11:
        prof.observe_send(n, 0.05 + 0.001 * n)   # latency went up five-fold
    after = prof.estimate()
    assert after.drifted_from(before) and not before.drifted_from(before)
    assert prof.estimate().regime() is None            # no NAV measured yet
    for rtt in (0.041, 0.040, 0.052):
        prof.observe_nav(rtt)
    near = prof.estimate().regime()
    prof.observe_nav(0.039)                            # the median of recent round trips counts
    assert prof.estimate().regime() == near
    far = LinkProfiler()
    far.observe_nav(0.6)
    assert far.estimate().regime() != near


def test_regime_does_not_move_with_the_final_batch_size():
    """The trigger's thresholds set how many tokens the final batch carries; on a slow uplink that
    multiplies the NAV time, but the regime (what the tuner remembers) must stay put."""
    from edge_sdk.profiler import LinkProfiler

    def nav(k):                                         # RTT 20 ms + 116 ms per token (the paper's uplink)
        return 0.020 + 0.116 * k

    short, long_, fixed = LinkProfiler(), LinkProfiler(), LinkProfiler()
    for k in (1, 1, 2, 1, 3, 1):
        short.observe_nav(nav(k), k)
    for k in (6, 9, 7, 12, 8, 10):
        long_.observe_nav(nav(k), k)
    for n in (2, 4, 6) * 4:
        fixed.observe_send(n, 0.01 + 0.116 * n)         # non-final sends teach beta
    for _ in range(5):
        fixed.observe_nav(nav(8), 8)                     # one final size only: beta takes the extra tokens off
    regimes = {p.estimate().regime() for p in (short, long_, fixed)}
    assert regimes == {round(math.log2(136))}
    assert short.estimate().nav_network == pytest.approx(0.136, rel=0.01)
