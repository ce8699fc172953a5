"""The round controller: its acceptance model, its cost model, its decisions. Pure objects, microseconds."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from edge_sdk.autotune import CorrectionTuner
from edge_sdk.controller import AcceptanceModel, DevicePower, PositionAcceptance, SegmentCosts, plan_segment
from edge_sdk.drafter import DraftToken
from edge_sdk.errors import ConfigError
from edge_sdk.lookup import LookupGuesser
from edge_sdk.policies import PipeSD, RoundVerdict, make_policy
from edge_sdk.profiler import LinkEstimate, LinkProfiler
from edge_sdk.scheduling import AtTrigger, DPSchedule, PerToken, arrival_times, plan_batches, arrival_time

# Links as the profiler would report them (seconds): alpha, beta, gamma, verify, acceptance, nav_network.
NATIVE = LinkEstimate(0.0005, 0.00002, 0.0003, 0.009, 0.7, 0.024, nav_latency=0.024, nav_per_token=0.00002,
                      nav_empty=0.024, verify_fixed=0.009, verify_per_token=0.0003, uplink_per_token=0.00002)
PAPER = LinkEstimate(0.001, 0.116, 0.036, 0.005, 0.7, 0.137, nav_latency=0.021, nav_per_token=0.116,
                     nav_empty=0.021, verify_fixed=0.005, verify_per_token=0.0001, uplink_per_token=0.116)
DEVICE = LinkEstimate(0.0005, 0.00002, 0.025, 0.021, 0.7, 0.055, nav_latency=0.055, nav_per_token=0.00002,
                      nav_empty=0.055, verify_fixed=0.021, verify_per_token=0.0002, uplink_per_token=0.00002)
# Per-position acceptance as the embedded pair shows it: lower just after a rejection.
CLUSTERED = (0.66, 0.66, 0.71, 0.78, 0.78, 0.82)


def tok(conf: float) -> DraftToken:
    return DraftToken(1, conf, conf)


def plan(link, a=CLUSTERED, objective="latency", proactive=True, pipelined=True):
    return plan_segment(SegmentCosts.from_link(link), a, objective, proactive=proactive, pipelined=pipelined)


# -- the acceptance model ---------------------------------------------------------------------------
def synthetic_rounds(model: AcceptanceModel, rounds: int, true_p, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(rounds):
        draft, accepted = [], None
        for i in range(8):
            conf = rng.random()
            draft.append(tok(conf))
            if accepted is None and rng.random() >= true_p(conf, i + 1):
                accepted = i
        model.observe(draft, 8 if accepted is None else accepted)


def test_the_acceptance_model_starts_at_the_drafts_own_confidence():
    model = AcceptanceModel()
    assert model.predict(0.3, 1) == pytest.approx(0.3, abs=1e-3)
    assert model.predict(0.9, 5) == pytest.approx(0.9, abs=1e-3)


def test_the_acceptance_model_learns_an_under_confident_draft_and_says_how_well():
    # Like the embedded draft: tokens it gives 0.3 are accepted ~70% of the time.
    truth = lambda conf, n: 0.45 + 0.5 * conf   # noqa: E731
    model = AcceptanceModel()
    synthetic_rounds(model, 600, truth)
    for conf in (0.1, 0.3, 0.6, 0.9):
        assert model.predict(conf, 1) == pytest.approx(truth(conf, 1), abs=0.08)
    cal = model.calibration
    assert cal.count > 1000 and cal.brier < cal.raw_brier        # better than the raw confidence
    for predicted, observed, n in cal.reliability():
        if n > 200:
            assert abs(predicted - observed) < 0.08
    assert sum(n for *_, n in cal.reliability()) == cal.count


def test_only_tokens_up_to_the_first_rejection_are_learnt():
    model = AcceptanceModel()
    model.observe([tok(0.5)] * 6, 2)          # two accepted, the third rejected, three unobserved
    assert model.calibration.count == 3
    model.observe([tok(0.5)] * 4, 4)          # all accepted
    assert model.calibration.count == 7


# -- the cost model and the plan --------------------------------------------------------------------
def test_arrival_times_are_the_dps_for_every_length():
    for n in (1, 3, 7, 12):
        sizes = plan_batches(n, 0.004, 0.002, 0.001)
        assert arrival_times(n, 0.004, 0.002, 0.001)[n] == pytest.approx(arrival_time(sizes, 0.004, 0.002, 0.001))
    assert arrival_times(3, 0.004, 0.002, 0.001, "at_trigger")[3] == pytest.approx(3 * 0.001 + 0.004 + 3 * 0.002)


def test_each_link_gets_its_own_structure():
    native, paper, device = plan(NATIVE), plan(PAPER), plan(DEVICE)
    # A fast draft and a round trip that dwarfs it: a head of a few tokens, longer rounds drafted ahead.
    assert native.best_length >= 2 and native.ahead >= 1 and native.ahead_draft >= 4
    # 116 ms of uplink per drafted token and a 36 ms draft: the target alone beats every draft.
    assert (paper.best_length, paper.ahead) == (0, 0)
    assert 1 / paper.rate == pytest.approx(0.021 + 0.005, rel=0.05)
    # A 25 ms draft against a 75 ms round trip: nothing drafted before the first NAV, then a guess of the
    # target's next token per round, several rounds in flight -- the verifier checks a token per pass.
    assert device.best_length == 0 and device.ahead >= 3 and device.ahead_draft <= 1


def test_the_plan_prices_a_structure_as_a_renewal_of_segments():
    """The head alone (no round ahead) by hand: E[min(p, m + 1)] tokens in one round trip of m drafts."""
    costs = SegmentCosts.from_link(NATIVE)
    a = 0.7
    p = plan_segment(costs, a, proactive=False)
    m = p.best_length
    tokens = (1 - a ** (m + 1)) / (1 - a)
    seconds = m * costs.gamma + costs.latency + costs.pass_fixed + costs.pass_per_token * m
    assert p.seconds_per_token == pytest.approx(seconds / tokens, rel=0.02)
    assert p.ahead == 0 and 1 / p.rate == pytest.approx(p.seconds_per_token, rel=0.05)


def test_drafting_ahead_never_plans_slower_than_not():
    for link in (NATIVE, DEVICE, PAPER):
        chained = plan(link).seconds_per_token
        assert chained <= plan(link, proactive=False).seconds_per_token * 1.0001
        assert chained <= plan(link, pipelined=False).seconds_per_token * 1.0001


def test_the_stop_threshold_is_the_paper_dual_threshold_on_the_calibrated_scale():
    p = plan(NATIVE, proactive=False)
    r1, r2 = p.thresholds
    assert 0 < r2 < 1 and 0 < r1 < 1
    assert r1 == p.stop_below[p.best_length] and r2 == p.stop_below[1]
    assert p.stop_below[0] == math.inf


def test_a_dearer_round_trip_means_longer_heads_and_a_better_draft_longer_ones():
    slow = dataclasses.replace(NATIVE, nav_latency=0.2, nav_empty=0.2)
    assert plan(slow, 0.7, proactive=False).best_length > plan(NATIVE, 0.7, proactive=False).best_length
    assert plan(NATIVE, 0.5, proactive=False).best_length <= plan(NATIVE, 0.85, proactive=False).best_length


def test_tokens_just_after_a_rejection_matter_most():
    """The same mean acceptance, spread as the pair spreads it (low after a rejection) or evenly: the
    clustered one commits fewer tokens per segment, and the plan knows it."""
    flat = sum(CLUSTERED) / len(CLUSTERED)
    assert plan(NATIVE, CLUSTERED).seconds_per_token > plan(NATIVE, flat).seconds_per_token
    positions = PositionAcceptance()
    for _ in range(400):
        positions.add(1, 0.0 if len(positions.n) and _ % 3 == 0 else 1.0)
        for i in range(2, 7):
            positions.add(i, 1.0 if _ % 10 else 0.0)
    curve = positions.curve()
    assert curve[0] < curve[1] and curve[0] == pytest.approx(2 / 3, abs=0.05)
    assert positions.curve(start=3)[0] == curve[2]


def test_rounds_ahead_that_upload_drafts_cost_the_next_head_their_upload():
    """With the draft's full distribution on the uplink (8 KB a token, ~3 ms at 20 Mbps), drafted rounds
    ahead are priced by what they occupy of the uplink -- also after a rejection -- so the plan drafts
    fewer tokens ahead than on a free uplink, and prefers guesses (no upload at all) to long rounds."""
    free, dear = plan(NATIVE), plan(dataclasses.replace(NATIVE, nav_per_token=0.003, uplink_per_token=0.003))
    assert free.ahead_draft >= 4 and dear.ahead_draft < free.ahead_draft
    assert dear.seconds_per_token > free.seconds_per_token


def test_the_profiler_prices_the_uplink_robustly_and_follows_a_step():
    profiler = LinkProfiler()
    for i in range(10):
        profiler.observe_nav(0.030 + (0.001 if i % 2 else -0.001), 0)   # rounds that uploaded nothing
        profiler.observe_nav(0.030 + 4 * 0.0005, 4)                      # 0.5 ms a drafted token
    profiler.observe_nav(0.030 + 0.050, 4)                               # one round that queued behind another
    assert profiler.estimate().upload_per_token == pytest.approx(0.0005, abs=2e-4)
    for _ in range(2):
        profiler.observe_nav(0.030 + 4 * 0.02, 4)                         # the uplink got 40x slower
    assert profiler.estimate().upload_per_token == pytest.approx(0.02, rel=0.2)
    assert profiler.estimate().nav_latency == pytest.approx(0.030, abs=0.002)


def test_an_empty_probe_waits_for_a_round_not_yet_sent():
    """While no measured round trip without an upload is at hand, the controller sends an empty round: no
    draft, nothing ahead. A round that already went up (answered rebased, or sent pipelined) cannot be
    that probe -- its draft is fixed -- so the probe waits for the next round instead of stopping the
    rounds drafted ahead on it."""
    link = dataclasses.replace(NATIVE, nav_empty=None)
    policy = make_policy("pipesd_model")
    policy.start_round(link)                 # a drafted round; the probe is due from the second
    policy.on_verdict(RoundVerdict((tok(0.9),), 1, 0.03, link, token=1))
    assert policy.proactive
    policy.round_sent = True                 # a rebased round: it keeps what is drafted ahead on it
    policy.start_round(link)
    assert policy.proactive and policy.empty_probes == 0
    policy.round_sent = False                # the next round is the probe
    policy.start_round(link)
    assert not policy.proactive and policy.max_draft == 0 and policy.empty_probes == 1


def test_a_small_bandwidth_step_is_priced_within_three_drafted_rounds():
    """A 30% faster uplink (S4's 45.8 -> 64.9 Mbps) moves a four-token round by under 2 ms: too little
    for a jump, so the slope follows by its recency-weighted median. A plain median of the last nine
    rounds needed five new ones; the controller then re-plans a round or two after the price."""
    profiler = LinkProfiler()
    for i in range(10):
        profiler.observe_nav(0.030 + (0.001 if i % 2 else -0.001), 0)
        profiler.observe_nav(0.030 + 4 * 0.00143, 4)                     # 1.43 ms a drafted token
    assert profiler.estimate().upload_per_token == pytest.approx(0.00143, rel=0.05)
    for _ in range(3):
        profiler.observe_nav(0.030, 0)
        profiler.observe_nav(0.030 + 4 * 0.00101, 4)                     # the step: 1.01 ms a token
    assert profiler.estimate().nav_per_token == pytest.approx(0.00101, rel=0.05)
    for _ in range(2):
        profiler.observe_nav(0.030 + 4 * 0.00101, 4)
    profiler.observe_nav(0.030 + 0.004 + 4 * 0.00101, 4)                # a round that met a 4 ms hiccup ...
    assert profiler.estimate().nav_per_token == pytest.approx(0.00101, rel=0.05)   # ... moves nothing


def test_the_uplinks_price_is_kept_while_nothing_drafted_goes_up():
    """A controller that stopped uploading (a 0.29 MB token on a 100 Mbps uplink) measures the uplink no
    more; when the round trip jumps, the profiler clears its lines. The last measured price stands until a
    new upload says otherwise: the prior (0.5 ms) would make drafting look cheap again."""
    profiler = LinkProfiler()
    for _ in range(6):
        profiler.observe_nav(0.013, 0)
        profiler.observe_nav(0.013 + 2 * 0.023, 2)                     # 23 ms a drafted token
    assert profiler.estimate().upload_per_token == pytest.approx(0.023, rel=0.1)
    for _ in range(40):                                                  # guesses only: nothing uploaded
        profiler.observe_nav(0.013, 0)
    profiler.observe_nav(0.300, 0)
    profiler.observe_nav(0.300, 0)                                       # a jump, confirmed: the lines are cleared
    est = profiler.estimate()
    assert est.nav_per_token is None and est.uplink_per_token is None
    assert est.upload_per_token == pytest.approx(0.023, rel=0.1)         # not the prior's 0.5 ms
    assert LinkProfiler().estimate().upload_per_token == LinkProfiler().estimate().beta   # the prior, before any


def test_a_slow_suspect_is_not_kept_when_the_link_turns_out_faster():
    profiler = LinkProfiler()
    for i in range(10):
        profiler.observe_nav(0.030 + (0.001 if i % 2 else -0.001), 0)
        profiler.observe_nav(0.030 + 4 * 0.005, 4)                       # 5 ms a drafted token
    profiler.observe_nav(0.030 + 0.200, 4)                               # a slow moment: a suspect, not news
    assert profiler.estimate().upload_per_token == pytest.approx(0.005, rel=0.2)
    profiler.observe_nav(0.030 + 4 * 0.0005, 4)                          # the uplink got 10x faster: news at once
    assert profiler.estimate().upload_per_token == pytest.approx(0.0005, abs=2e-4)


def test_objectives_price_the_same_segment_differently():
    latency, cloud = plan(DEVICE), plan(DEVICE, objective="cloud_cost")
    energy = plan(DEVICE, objective="edge_energy", proactive=False)
    # A pass per guessed token is fast but dear for the cloud: cloud cost drafts a long head instead.
    assert cloud.best_length > latency.best_length and cloud.ahead_draft >= latency.ahead_draft
    # A drafted token costs 25 ms at 7 W; waiting costs 2 W: energy prefers shorter heads than cloud cost.
    assert energy.best_length < cloud.best_length and energy.ahead == 0
    with pytest.raises(ConfigError):
        plan_segment(SegmentCosts.from_link(DEVICE), 0.7, "speed")


# -- the policy ------------------------------------------------------------------------------------
def verdict(draft, accepted, link, seconds=0.05):
    return RoundVerdict(tuple(draft), accepted, seconds, link)


def run_round(policy: PipeSD, link: LinkEstimate, confs, accepted=None) -> int:
    """A round as the engine runs it: start, draft until verify_now or the cap, verdict. Returns its length."""
    policy.start_round(link)
    draft = []
    for c in confs:
        if len(draft) >= policy.max_draft:
            break
        draft.append(tok(c))
        if policy.verify_now(draft):
            break
    policy.on_verdict(verdict(draft, len(draft) if accepted is None else min(accepted, len(draft)), link))
    return len(draft)


def test_pipesd_decodes_cloud_only_while_no_draft_pays_and_drafts_again_when_the_link_recovers():
    policy = make_policy("pipesd_model")
    assert run_round(policy, PAPER, [0.9] * 32) == 0 and policy.max_draft == 0 and not policy.proactive
    assert policy.cloud_only_rounds == 1
    assert run_round(policy, NATIVE, [0.9] * 32) >= 2          # the link is back: drafting again at once


def test_a_costly_uplink_and_a_fast_draft_make_guesses_that_need_no_upload():
    """The paper's 116 ms of uplink per drafted token against a 3 ms draft: no drafted token goes up, but
    the draft's guesses of the target's next token do -- in the rounds' prefix hashes, for free."""
    fading = dataclasses.replace(PAPER, gamma=0.003)
    policy = make_policy("pipesd_model")
    run_round(policy, fading, [0.9] * 32)
    assert policy.plan.best_length == 0 and policy.plan.ahead_draft == 0 and policy.plan.ahead >= 2
    assert policy.proactive and policy.pipelined and policy.cloud_only_rounds == 0


def test_a_one_token_probe_remeasures_the_uplink_only_when_a_faster_one_could_pay():
    # Without rounds ahead (no guesses), on a fading link with the paper's payload and a 3 ms draft.
    fading = dataclasses.replace(PAPER, gamma=0.003)
    policy = make_policy("pipesd_no_proactive")
    lengths = [run_round(policy, fading, [0.9] * 32) for _ in range(40)]
    probes = [i for i, n in enumerate(lengths) if n]
    assert lengths[:PipeSD.PROBE_FIRST - 1] == [0] * (PipeSD.PROBE_FIRST - 1)
    assert probes and all(lengths[i] == 1 for i in probes)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(gaps) >= 2 and all(later == 2 * earlier for earlier, later in zip(gaps, gaps[1:]))   # ever rarer
    # A device too slow for any uplink to help (a 1 s draft token): no probes at all.
    slow = dataclasses.replace(PAPER, gamma=1.0)
    policy = make_policy("pipesd_no_proactive")
    assert [run_round(policy, slow, [0.9] * 32) for _ in range(40)] == [0] * 40 and policy.probes == 0


def timed_rounds(profiler: LinkProfiler, policy: PipeSD, beta: float, rounds: int) -> list[int]:
    """Rounds as the engine would time them on an uplink of `beta` s per token (40 ms round trip, a 2 ms
    draft): the final batch's NAV (the head's, else a round ahead's, else an empty one) and verification.
    Returns the drafted tokens each round's plan sends up."""
    sent = []
    for _ in range(rounds):
        n = run_round(policy, profiler.estimate(), [0.8] * 32, accepted=3)
        final = n or (policy.plan.ahead_draft if policy.proactive else 0)
        profiler.observe_draft(0.002)
        profiler.observe_nav(0.040 + beta * final, final)
        profiler.observe_round(final, min(3, final), 0.005)
        sent.append(n if policy.max_draft == 1 else max(n, final))
    return sent


@pytest.mark.parametrize("mode", ["pipesd_model", "pipesd_no_proactive"])
def test_a_bandwidth_step_changes_the_draft_length_within_three_rounds(mode):
    """End to end through the profiler: rounds timed on one uplink, then on one 200x slower (drafted tokens
    cost 20 ms each), then back."""
    profiler, policy = LinkProfiler(), make_policy(mode)
    fast = timed_rounds(profiler, policy, 0.0001, 20)
    slow = timed_rounds(profiler, policy, 0.02, 8)
    back = timed_rounds(profiler, policy, 0.0001, 12)
    mean = lambda xs: sum(xs) / len(xs)                       # noqa: E731 (the artificial verdicts alternate lengths)
    settled = mean(fast[-4:])
    assert settled >= 1                                        # drafted tokens go up
    assert slow[2] < settled and sum(map(bool, slow[4:])) <= 1   # fewer by the third round, then a probe at most
    # ... and drafting again once a probe saw the link (as many as before or fewer: the start's probe, 8 drafts
    # of which 3 accepted, taught the acceptance model that far positions fail)
    assert min(back[PipeSD.PROBE_FIRST + 3:]) >= 1


def test_a_link_where_no_draft_pays_goes_cloud_only_and_comes_back():
    """The paper's payload on a fading link (200 ms of uplink per drafted token) and a draft slower than
    the round trip: PipeSD stops drafting within three rounds, and a probe brings drafting back within a
    few rounds of the link recovering."""
    profiler, policy = LinkProfiler(), make_policy("pipesd_no_proactive")
    fast = timed_rounds(profiler, policy, 0.0001, 20)
    faded = timed_rounds(profiler, policy, 0.2, 12)
    back = timed_rounds(profiler, policy, 0.0001, 12)
    assert min(fast[-8:]) >= 2
    assert 0 in faded[:3] and sum(faded[3:]) <= 2             # cloud-only, but for a one-token probe or so
    assert min(back[PipeSD.PROBE_FIRST + 3:]) >= 1             # drafting again once a probe saw the link


def test_a_seeded_request_runs_a_frozen_controller():
    policy = make_policy("pipesd")
    for _ in range(5):
        run_round(policy, DEVICE, [0.8, 0.7, 0.4, 0.9, 0.2, 0.9], accepted=2)
    frozen = policy.reproducible()
    lengths = {run_round(frozen, NATIVE if i % 2 else PAPER, [0.8, 0.7, 0.4, 0.9, 0.2, 0.9], accepted=1)
               for i in range(6)}
    assert len(lengths) == 1                                   # the link no longer moves it
    assert frozen.tuner is None and frozen.model.calibration.count == policy.model.calibration.count


def test_pipesd_modes_take_an_objective_and_refuse_thresholds():
    assert make_policy("pipesd").objective == "latency"
    assert isinstance(make_policy("pipesd").tuner, CorrectionTuner)
    assert make_policy("pipesd", objective="cloud_cost").tuner is None     # the tuner scores seconds
    assert not make_policy("pipesd", objective="edge_energy").proactive
    assert isinstance(make_policy("pipesd_at_trigger").schedule, AtTrigger)
    # A batch sent before the trigger costs a target pass: cloud cost sends at the trigger; the others batch.
    for mode in ("pipesd", "pipesd_model", "pipesd_no_pipeline", "pipesd_no_proactive"):
        assert isinstance(make_policy(mode, objective="cloud_cost").schedule, AtTrigger), mode
        assert isinstance(make_policy(mode).schedule, DPSchedule), mode
    assert isinstance(make_policy("pipesd", objective="edge_energy").schedule, DPSchedule)
    assert isinstance(make_policy("pipesd").schedule, DPSchedule)
    assert isinstance(make_policy("pipesd_per_token", objective="cloud_cost").schedule, PerToken)   # an ablation's own
    with pytest.raises(ConfigError, match="pipesd_fixed"):
        make_policy("pipesd", r1=0.1)
    with pytest.raises(ConfigError, match="objective"):
        make_policy("pipesd", objective="fast")
    with pytest.raises(ConfigError, match="no use for objective"):
        make_policy("vanilla", objective="latency")


def test_the_correction_tuner_starts_at_the_models_point_and_keeps_it_unless_beaten():
    tuner = CorrectionTuner(budget=4, tokens_per_trial=10, use_bo=False)
    assert tuner.correction() == (0.0, 0.0)
    scores = iter([1.0, 0.999, 1.2, 1.1])          # nothing beats the model's point by 3%
    while tuner.tuning:
        tuner.record(10, 10 * next(scores))
        tuner.wait()
    assert tuner.evaluations[0][0] == (0.0, 0.0) and len(tuner.evaluations) == 4
    assert tuner.best() == (0.0, 0.0) == tuner.correction()
    # A winner is re-run with the model's point before it replaces it: kept when its lead holds ...
    tuner = CorrectionTuner(budget=3, tokens_per_trial=10, use_bo=False)
    for score in (1.0, 0.5, 1.0):
        tuner.record(10, 10 * score)
        tuner.wait()
    assert tuner.tuning and tuner.correction() == (0.0, 0.0)          # the model's point, re-run first
    for score in (1.0, 0.6):
        tuner.record(10, 10 * score)
    assert not tuner.tuning and tuner.best() == tuner.evaluations[1][0] != (0.0, 0.0)
    assert [p for p, _ in tuner.confirmations] == [(0.0, 0.0), tuner.evaluations[1][0]]
    # ... and dropped when it was luck (0.5 then 1.4: no better than 1.0 over both trials).
    tuner = CorrectionTuner(budget=3, tokens_per_trial=10, use_bo=False)
    for score in (1.0, 0.5, 1.0, 1.0, 1.4):
        tuner.record(10, 10 * score)
        tuner.wait()
    assert not tuner.tuning and tuner.best() == (0.0, 0.0) == tuner.correction()


def test_device_power_defaults_are_energys_models():
    from energy.meters import CPU_MODELS
    from energy.radio import RADIOS

    laptop, wifi = CPU_MODELS["laptop"], RADIOS["wifi"]
    p = DevicePower()
    assert (p.active_w, p.idle_w) == (laptop.active_w, laptop.idle_w)
    assert p.radio_w == pytest.approx(wifi.beta + wifi.alpha_up * 20)


def test_deciding_is_cheap_enough_to_run_per_token():
    """Not a timing assertion: the decision is a product and a comparison (no fit, no plan)."""
    policy = make_policy("pipesd_model")
    policy.start_round(NATIVE)
    draft = []
    calls = 0
    real = policy.model.predict

    def counting(*a):
        nonlocal calls
        calls += 1
        return real(*a)
    policy.model.predict = counting
    for _ in range(10):
        draft.append(tok(0.95))
        if policy.verify_now(draft):
            break
    assert calls == len(draft)                     # one prediction per drafted token, never a recomputation
    assert math.isfinite(policy.thresholds[0])


def test_rebased_rounds_raise_the_rate_of_pipelined_structures_only():
    """A rejection found while the next round is up commits one more token when the verifier rebases:
    the plan counts it for pipelined structures, and for nothing else."""
    costs = SegmentCosts.from_link(NATIVE)
    with_rebase, without = plan_segment(costs, CLUSTERED), plan_segment(costs, CLUSTERED, rebase=False)
    assert with_rebase.ahead > 0 and with_rebase.rate > 1.05 * without.rate
    alone = [plan_segment(costs, CLUSTERED, proactive=False, rebase=r).rate for r in (True, False)]
    assert alone[0] == alone[1]
    # The policy plans with what the engine says of the session's verifier.
    rates = {}
    for rebases in (True, False):
        policy = make_policy("pipesd_model")
        policy.rebases = rebases
        policy.start_round(NATIVE)
        rates[rebases] = policy.plan.rate
    assert rates[True] > rates[False]


def test_one_token_jitter_does_not_price_the_uplink():
    """The NAV line's slope weighs each round by the tokens it sent: one-token rounds that met a few ms of
    jitter (a busy core, a GC pause) among eight-token rounds on a fast uplink do not make drafted tokens
    look dear -- a price that, once guesses alone went up, nothing would correct."""
    profiler = LinkProfiler()
    for i in range(8):
        profiler.observe_nav(0.023, 0)
        profiler.observe_nav(0.023 + 8 * 0.00003, 8)                     # 30 us a token
        if i % 2:
            profiler.observe_nav(0.023 + 0.004, 1)                       # 4 ms of jitter on one token
    assert profiler.estimate().upload_per_token < 0.0005


def test_a_probe_sends_a_round_trip_of_tokens_at_the_believed_price():
    """A controller in guess-only rounds (the uplink believed at 25 ms a token, a 100 ms round trip, a
    0.4 ms draft) probes with four tokens, not one: a round trip's jitter over one token would read as
    the slow uplink again."""
    believed = dataclasses.replace(NATIVE, gamma=0.0004, nav_latency=0.1, nav_empty=0.1, nav_network=0.1,
                                   nav_per_token=0.025, uplink_per_token=None)
    policy = make_policy("pipesd_model")
    lengths = [run_round(policy, believed, [0.3] * 32, accepted=0) for _ in range(PipeSD.PROBE_FIRST + 2)]
    assert (policy.plan.best_length, policy.plan.ahead_draft) == (0, 0) and policy.plan.ahead > 0
    assert policy.probes == 1
    assert lengths == [0] * (PipeSD.PROBE_FIRST - 1) + [4, 0, 0]   # 100 ms / 25 ms; its confidences would stop it at 1


# -- looked-up guesses (lookup.py) -----------------------------------------------------------------
def test_the_lookup_guesser_continues_the_latest_ngram_and_scores_itself():
    g = LookupGuesser()
    prompt, output = [5, 1, 2, 3, 9], [1, 2, 4, 7, 1, 2]
    g.start(prompt)
    g.observe(prompt + output, scored_from=len(prompt))
    assert g.guess(prompt + output) == 4      # (1, 2) was last followed by 4
    assert g.guess([8, 3, 9]) == 1            # (3, 9) -> 1
    assert g.guess([42]) == 42                # never seen: the last token again
    assert g.hit_rate is None                 # six guesses scored: no rate yet
    g.observe(prompt + output + [4, 7, 1, 2] * 4, scored_from=len(prompt))
    assert 0.5 < g.hit_rate < 1               # the repeats were guessed
    g.start([6, 6, 6, 6])                     # another generation: its own tokens only, nothing recalled
    assert g.guess([6, 6]) == 6 and g.guess([1, 2]) == 2 and g.guess([3, 9]) == 9


def test_looked_up_guesses_make_two_tokens_a_round_trip_where_drafting_does_not_pay():
    """The paper's payload and 36 ms draft: the target alone is the best drafted plan. Rounds ahead of a
    looked-up guess each, even one never right, are answered rebased: two tokens a round trip and two passes."""
    costs = SegmentCosts.from_link(PAPER)
    alone = plan_segment(costs, 0.7)
    assert (alone.best_length, alone.ahead) == (0, 0)
    blind = plan_segment(dataclasses.replace(costs, gamma=2e-5), 0.0, guesses_only=True, restart=0.0)
    assert (blind.best_length, blind.ahead_draft) == (0, 0) and blind.ahead >= 1
    assert blind.seconds_per_token == pytest.approx((costs.empty_latency + 2 * costs.passes(0)) / 2, rel=0.05)
    assert blind.rate > 1.5 * alone.rate
    assert blind.thresholds == (math.inf, math.inf)         # no head token: the dual threshold stops at once
    # Without rebased answers a wrong guess buys nothing: the target alone again.
    none = plan_segment(dataclasses.replace(costs, gamma=2e-5), 0.0, guesses_only=True, restart=0.0, rebase=False)
    assert none.ahead == 0


def test_pipesd_chooses_looked_up_guesses_only_where_they_beat_its_drafted_plan():
    for link, lookup in ((PAPER, True), (NATIVE, False), (DEVICE, False)):
        policy = make_policy("pipesd_model")
        run_round(policy, dataclasses.replace(link, lookup_acceptance=0.2), [0.9] * 32)
        assert policy.lookup_guesses == lookup, link
    policy = make_policy("pipesd_model")
    policy.rebases = False                     # a verifier that does not rebase: no looked-up guesses
    run_round(policy, dataclasses.replace(PAPER, lookup_acceptance=0.2), [0.9] * 32)
    assert not policy.lookup_guesses and policy.plan.ahead == 0


def test_a_small_drift_is_replanned_off_the_path_and_a_step_at_once():
    """Planning costs milliseconds: a plan whose costs drifted a little is used for the round starting
    now and re-planned when the engine next waits (``idle``) -- at most DEFER_ROUNDS rounds late; a
    bandwidth step is re-planned in start_round."""
    policy = make_policy("pipesd_model")
    policy.start_round(NATIVE)
    made, first = policy.plans_made, policy.plan
    drifted = dataclasses.replace(NATIVE, nav_latency=NATIVE.nav_latency * 1.2, nav_empty=NATIVE.nav_empty * 1.2)
    policy.start_round(drifted)
    assert policy.plans_made == made and policy.plan is first          # used as it was, marked stale
    policy.idle(drifted)
    assert policy.plans_made == made + 1 and policy.idle_s > 0            # re-planned off the path
    policy.start_round(drifted)
    assert policy.plans_made == made + 1 and policy.plan is not first    # ... and used from then on
    again = dataclasses.replace(drifted, nav_latency=drifted.nav_latency * 1.2, nav_empty=drifted.nav_empty * 1.2)
    for _ in range(PipeSD.DEFER_ROUNDS):
        policy.start_round(again)                                        # no idle: stale, but kept ...
    assert policy.plans_made == made + 1
    policy.start_round(again)                                            # ... for DEFER_ROUNDS rounds at most
    assert policy.plans_made == made + 2
    step = dataclasses.replace(again, uplink_per_token=0.02, nav_per_token=0.02)
    policy.start_round(step)
    assert policy.plans_made == made + 3                                 # a step: at once


def test_rounds_stay_short_and_serial_until_a_drafted_token_is_priced():
    """At a client's start the uplink's price is the profiler's prior (0.5 ms a token). On the paper's
    0.29 MB token that is 46x too cheap, and a plan at that price queued seconds of uploads ahead of the
    first verdict -- whose round trips then hid the price. Until a drafted round is priced, a round is a
    probe: a round trip of upload at the believed price, nothing drafted ahead."""
    unpriced = LinkEstimate(0.001, 0.0005, 0.0005, 0.01, 0.7, nav_latency=0.02, nav_empty=0.02, verify_fixed=0.01,
                            verify_per_token=0.0005)
    policy = make_policy("pipesd_model")
    policy.start_round(unpriced)
    policy.start_round(unpriced)
    assert not policy.proactive and policy.max_ahead == 0 and 1 <= policy.max_draft <= PipeSD.PROBE_TOKENS
    assert policy.unpriced_rounds == 2
    priced = dataclasses.replace(unpriced, nav_per_token=0.0005, upload_last=0.0005)
    policy.start_round(priced)
    assert policy.proactive and policy.max_ahead > 0 and policy.unpriced_rounds == 2
