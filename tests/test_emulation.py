"""The link emulator's model (pure, with a fake clock), the scenarios, and the TPT lower bound."""

import math
import time

import pytest

from pipesd_lab.bench import earlier_bound_tpt, lower_bound_tpt
from pipesd_lab.emulation import BandwidthTrace, LinkDown, LinkProfile, SerialLink
from pipesd_lab.scenarios import PAPER_GAMMA_S, PAPER_PAYLOAD_BYTES, SCENARIOS, get_scenario


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def link(profile, direction=1):
    clock = FakeClock()
    return SerialLink(profile, direction, clock=clock), clock


def test_serial_link_transmits_at_its_bandwidth_then_propagates():
    up, clock = link(LinkProfile(up_mbps=8, rtt_ms=20))            # 1 MB/s, 10 ms one way
    start, end, arrival = up.reserve(10_000)
    assert (start, end) == (100.0, pytest.approx(100.01))
    assert arrival == pytest.approx(100.02)
    # A second message queues behind the first (FIFO transmitter), even if sent at the same instant.
    start2, end2, arrival2 = up.reserve(10_000)
    assert start2 == pytest.approx(end) and end2 == pytest.approx(100.02) and arrival2 == pytest.approx(100.03)
    clock.t = 200.0                                                # an idle link starts at once
    assert up.reserve(0)[0] == 200.0


def test_released_reservations_give_back_the_link_and_the_arrival_time():
    up, clock = link(LinkProfile(up_mbps=8, rtt_ms=20))
    up.reserve(1_000)                                              # on the wire: 100.001, arrives 100.011
    big = [up.reserve(1_000_000) for _ in range(2)]                # a stale round's batches, queued
    for start, end, _ in reversed(big):
        up.release(start, end)
    assert up.reserve(1_000)[2] == pytest.approx(100.012)          # not behind the abandoned batches


def test_trace_with_fractional_segments_never_stalls():
    trace = BandwidthTrace(((0.1, 1.0, 1.0), (0.3, 2.0, 2.0), (0.7, 3.0, 3.0)))
    up, clock = link(LinkProfile(rtt_ms=0, trace=trace))
    clock.t = up.t0 = 43101.85                                     # a large clock: coarse float steps
    assert up._transmit_end(up.t0 + 0.05, 200_000) - up.t0 == pytest.approx(0.4 + 0.95 / 3)
    for k in range(200):                                           # starts on and around every boundary
        start = up.t0 + k * 0.05
        assert up._transmit_end(start, 123_457) > start
    with pytest.raises(ValueError):
        BandwidthTrace(((float("inf"), 1.0, 1.0),))


def test_released_reservation_frees_the_link_only_if_nothing_follows():
    up, clock = link(LinkProfile(up_mbps=8))
    up.reserve(100_000)                                            # busy until 100.1
    s, e, _ = up.reserve(10_000)                                   # queued: 100.1 .. 100.11
    up.release(s, e)
    assert up.reserve(0)[0] == pytest.approx(100.1)
    s1, e1, _ = up.reserve(10_000)
    up.reserve(10_000)
    up.release(s1, e1)                                             # something was queued after it: kept
    assert up.reserve(0)[0] == pytest.approx(100.12)


def test_trace_integrates_bandwidth_across_segments():
    trace = BandwidthTrace(((1.0, 1.0, 10.0), (1.0, 2.0, 20.0)))   # 1 Mbps up for 1 s, then 2 Mbps
    up, clock = link(LinkProfile(rtt_ms=0, trace=trace))
    # 1.5 Mbit: 1 Mbit in the first second, the other 0.5 Mbit at 2 Mbps -> 0.25 s more.
    assert up.reserve(187_500)[1] == pytest.approx(101.25)
    down, _ = link(LinkProfile(rtt_ms=0, trace=trace), direction=2)
    assert down.reserve(1_250_000)[1] == pytest.approx(101.0)      # 10 Mbit at 10 Mbps
    assert trace.period == 2.0 and trace.mbps(2.5, 1) == (1.0, pytest.approx(0.5))   # it repeats


def test_generated_trace_is_seeded_and_within_the_papers_ranges():
    a, b = BandwidthTrace.generated(seed=3), BandwidthTrace.generated(seed=3)
    assert a == b and a != BandwidthTrace.generated(seed=4)
    assert all(d == 20 and 10 <= u <= 80 and 150 <= w <= 280 for d, u, w in a.segments)


def test_trace_file_round_trip_and_errors(tmp_path):
    f = tmp_path / "trace.csv"
    f.write_text("# seconds,up,down\n5,10,100\n5,40,200\n")
    assert BandwidthTrace.from_file(f).segments == ((5.0, 10.0, 100.0), (5.0, 40.0, 200.0))
    f.write_text("5,ten,100\n")
    with pytest.raises(ValueError, match="seconds,up_mbps,down_mbps"):
        BandwidthTrace.from_file(f)
    with pytest.raises(ValueError):
        BandwidthTrace(((0.0, 1.0, 1.0),))


def test_jitter_and_loss_are_seeded_and_keep_order():
    def arrivals(seed):
        up, clock = link(LinkProfile(up_mbps=1000, rtt_ms=20, jitter_ms=8, loss=0.2, rto_ms=200, seed=seed))
        out = []
        for i in range(200):
            clock.t = 100.0 + i * 0.5
            out.append(up.reserve(100)[2])
        return out

    a = arrivals(1)
    assert a == arrivals(1) and a != arrivals(2)
    assert a == sorted(a), "deliveries stay in order, as on one TCP connection"
    delays = [t - (100.0 + i * 0.5) for i, t in enumerate(a)]
    assert min(delays) >= 0.002 - 1e-9                              # 10 ms - 8 ms jitter
    late = sum(d > 0.15 for d in delays)
    assert 20 < late < 65                                           # ~20% lost once: 40 expected


def test_link_down_refuses_until_up():
    up, _ = link(LinkProfile())
    up.cut = True
    with pytest.raises(LinkDown):
        up.reserve(10)
    up.cut = False
    up.reserve(10)


@pytest.mark.parametrize("bad", [dict(up_mbps=0), dict(rtt_ms=-1), dict(loss=1.0), dict(jitter_ms=-2)])
def test_profile_validation(bad):
    with pytest.raises(ValueError):
        LinkProfile(**bad)


def test_scenarios_follow_the_paper():
    s1, s3, s4 = get_scenario("S1"), SCENARIOS["s3"], SCENARIOS["s4"]
    paper = s1.link("paper")
    assert (paper.up_mbps, paper.down_mbps, paper.payload_bytes_per_token) == (20, 200, PAPER_PAYLOAD_BYTES)
    assert s1.link("native", "ids").payload_bytes_per_token == 0
    assert s1.link("native", "full", vocab_size=2048).payload_bytes_per_token == 8192
    assert s1.link("native", "topk").payload_bytes_per_token == 48
    # Paper regime: the device drafts at the paper's 36 ms x slowdown; native: our speed x slowdown.
    assert s1.added_draft_seconds("paper", 0.0004) == pytest.approx(PAPER_GAMMA_S - 0.0004)
    assert s3.added_draft_seconds("paper", 0.0004) == pytest.approx(PAPER_GAMMA_S * 3.3 - 0.0004)
    assert s3.added_draft_seconds("native", 0.001) == pytest.approx(0.0023)
    assert s1.added_draft_seconds("native", 0.001) == 0
    assert s4.link("paper").trace is not None and s1.link("paper").trace is None
    with pytest.raises(ValueError, match="unknown scenario"):
        get_scenario("s9")
    with pytest.raises(ValueError):
        s1.link("fast")


def test_lower_bound():
    no_rebase = lambda *a: lower_bound_tpt(*a, rebased=0.0)      # noqa: E731  (no rebased rounds)
    # A rejection at every position (one position per run): the target alone, a round trip and a pass a token.
    assert no_rebase(0.004, 0.005, 0.02, 1.0) == pytest.approx(0.025)
    # Four positions per rejection and a 4 ms draft: three drafted (4 ms each), then a round trip.
    assert no_rebase(0.004, 0.005, 0.02, 4.0) == pytest.approx((3 * 0.004 + 0.025) / 4)
    # A draft slower than a pass: a position may be a looked-up guess instead, verified in a pass of its own.
    assert no_rebase(0.2, 0.005, 0.02, 10.0) == pytest.approx((9 * 0.005 + 0.025) / 10)
    # Longer runs or a faster device never make the bound worse; an unmeasured run length is the target's.
    assert no_rebase(0.004, 0.005, 0.02, 5.0) < no_rebase(0.004, 0.005, 0.02, 3.0)
    assert no_rebase(0.002, 0.005, 0.02, 4.0) < no_rebase(0.004, 0.005, 0.02, 4.0)
    assert no_rebase(0.004, 0.005, 0.02, math.nan) == pytest.approx(0.025)
    # Never rejected: every position drafted at the draft's speed, or guessed at a pass each.
    assert no_rebase(0.004, 0.005, 0.02, math.inf) == pytest.approx(0.004)
    assert no_rebase(0.05, 0.005, 0.02, math.inf) == pytest.approx(0.005)
    assert math.isfinite(no_rebase(0.0, 0.0, 0.0, 2.0))
    # Rebased rounds (the default): each run may end with one more target token in the same time.
    assert lower_bound_tpt(0.004, 0.005, 0.02, 4.0) == pytest.approx((3 * 0.004 + 0.025) / 5)
    assert lower_bound_tpt(0.004, 0.005, 0.02, 1.0) == pytest.approx(0.025 / 2)
    assert lower_bound_tpt(0.004, 0.005, 0.02, math.inf) == pytest.approx(0.004)   # no rejection: nothing rebased


def test_the_earlier_bound_is_the_looser_floor():
    # With geometric acceptance a (1 / (1 - a) positions per rejection), an idle uplink and a draft no
    # slower than a pass, the earlier bound (bonus token free, round trip hidden) is never above the
    # current one. (A slower draft: the earlier bound knew no free guesses, and is no floor there.)
    for gamma in (0.0005, 0.002, 0.005):
        for a in (0.5, 0.75, 0.9):
            assert earlier_bound_tpt(gamma, 0.0, 0.005, 0.02, a) <= lower_bound_tpt(gamma, 0.005, 0.02, 1 / (1 - a), 0.0)
    assert earlier_bound_tpt(0.01, 0.0, 0.005, 0.02, 0.0) == pytest.approx(0.025)   # nothing accepted: the target

def test_a_slowed_drafter_gives_up_its_emulated_compute_when_interrupted():
    import threading

    from edge_sdk.drafter import DraftInterrupted
    from pipesd_lab.emulation import SlowedDrafter
    from pipesd_lab.toy import ToyDrafter, toy_pair

    drafter = SlowedDrafter(ToyDrafter(toy_pair()[1]), 0.5)
    drafter.set_context([1, 2, 3])
    timer = threading.Timer(0.02, drafter.interrupt)
    t = time.perf_counter()
    timer.start()
    with pytest.raises(DraftInterrupted):
        drafter.next_token()
    assert time.perf_counter() - t < 0.3 and drafter.slept_s < 0.3     # not the whole half second
    drafter.interrupt(False)
    drafter.seconds_per_token = 0.0
    drafter.set_context([1, 2, 3])
    assert drafter.next_token().token == ToyDrafter(toy_pair()[1]).language.logits([1, 2, 3]).argmax()
