"""Policies answer the engine's questions; plain objects, checked on hand-made drafts (no model, no I/O)."""

import dataclasses
import math

import pytest

from edge_sdk import ConfigError
from edge_sdk.autotune import OnlineAutotuner
from edge_sdk.drafter import DraftToken
from edge_sdk.policies import MODES, CloudOnly, EdgeOnly, PaperPipeSD, PipeSD, Policy, RoundVerdict, Speculative, make_policy
from edge_sdk.profiler import LinkEstimate
from edge_sdk.scheduling import AtTrigger, DPSchedule, PerToken
from edge_sdk.triggers import AdaptiveCumulative, DualThreshold

LINK = LinkEstimate(alpha=0.01, beta=0.002, gamma=0.001, verify=0.005, acceptance=0.6, nav_network=0.02)


def draft(*ps):
    return tuple(DraftToken(i, p, p) for i, p in enumerate(ps))


def verdict(d, accepted, seconds=0.01):
    return RoundVerdict(d, accepted, seconds, LINK)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_builds_and_is_a_policy(mode):
    policy = make_policy(mode)
    assert isinstance(policy, Policy) and policy.name == mode
    assert policy.uses_cloud == (mode != "edge_only")
    assert (policy.max_draft == 0) == (mode == "cloud_only")


@pytest.mark.parametrize("mode, settings", [
    ("pipesd", {"draft_k": 4}), ("edgellm", {"draft_k": 8}), ("cloud_only", {"draft_k": 8}),
    ("edge_only", {"r1": 0.1}), ("vanilla", {"r2": 0.5}), ("hsl", {"r1": 0.1}), ("pipesd_c_only", {"r2": 0.3}),
    ("pipesd_p_only", {"r1": 0.3}), ("pipesd_fixed", {"tuner": OnlineAutotuner()}), ("pipesd", {"r1": 0.3}),
    ("pipesd_bo", {"objective": "latency"}), ("pipesd_model", {"r2": 0.3}),
])
def test_a_setting_the_mode_has_no_use_for_is_refused(mode, settings):
    with pytest.raises(ConfigError, match="has no use for"):
        make_policy(mode, **settings)


@pytest.mark.parametrize("settings", [{"draft_k": 0}, {"draft_k": 65}, {"draft_k": 2.5}, {"draft_k": True}])
def test_vanilla_needs_a_sane_k(settings):
    with pytest.raises(ConfigError, match="draft length"):
        make_policy("vanilla", **settings)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, math.nan, "0.3", True])
def test_thresholds_are_confidences(value):
    with pytest.raises(ConfigError, match="threshold"):
        make_policy("pipesd_fixed", r1=value)


def test_unknown_mode_and_conflicting_settings():
    with pytest.raises(ConfigError, match="unknown mode"):
        make_policy("fastest")
    with pytest.raises(ConfigError, match="not both"):
        make_policy("pipesd_bo", r1=0.1, tuner=OnlineAutotuner())
    with pytest.raises(ConfigError, match="CorrectionTuner"):
        make_policy("pipesd", tuner=OnlineAutotuner())


def test_vanilla_verifies_every_k_and_sends_the_draft_whole():
    p = make_policy("vanilla", draft_k=3)
    assert [p.verify_now(draft(*[0.9] * n)) for n in (1, 2, 3)] == [False, False, True]
    assert p.max_draft == 3 and not p.proactive and not any(p.closes_batch(n) for n in range(1, 4))


def test_hsl_verifies_on_a_low_latest_token():
    p = make_policy("hsl", r2=0.6)
    assert not p.verify_now(draft(0.1, 0.7)) and p.verify_now(draft(0.9, 0.5))


def test_pipesd_variants_differ_in_one_respect():
    base = make_policy("pipesd_model")
    assert isinstance(base, PipeSD) and isinstance(base.schedule, DPSchedule) and base.proactive and base.tuner is None
    assert make_policy("pipesd").tuner is not None
    assert isinstance(make_policy("pipesd_per_token").schedule, PerToken)
    assert isinstance(make_policy("pipesd_at_trigger").schedule, AtTrigger)
    assert not make_policy("pipesd_no_proactive").proactive
    paper = make_policy("pipesd_fixed")
    assert isinstance(paper, PaperPipeSD) and isinstance(paper.schedule, DPSchedule) and paper.tuner is None
    assert make_policy("pipesd_c_only").trigger.r2 is None and make_policy("pipesd_p_only").trigger.r1 is None
    assert make_policy("pipesd_bo").tuner is not None
    assert make_policy("pipesd_bo", r1=0.1, r2=0.5).tuner is None     # fixed thresholds switch BO off
    assert make_policy("pipesd_fixed", r1=0.1).thresholds == (0.1, 0.2)


def test_the_controllers_branches_are_priced_from_its_costs():
    """pipesd_chain sends chains, pipesd runner-ups (one level, nothing drafted), pipesd_tree drafted
    branches; a node must pay for its verifier row and upload at the plan's rate, an expansion for a
    token's drafting too; a slower uplink or verifier raises both floors; edge_energy sends none."""
    shapes = {}
    for mode in ("pipesd_chain", "pipesd", "pipesd_tree"):
        policy = make_policy(mode)
        policy.start_round(LINK)
        shapes[mode] = policy.branches
    assert shapes["pipesd_chain"] is None
    assert shapes["pipesd"].max_depth == 1 and shapes["pipesd_tree"].max_depth == PipeSD.TREE_DEPTH
    tree = shapes["pipesd_tree"]
    assert 0 < tree.min_value < tree.min_expand < 1
    policy = make_policy("pipesd_tree")
    dear = dataclasses.replace(LINK, beta=0.02)
    policy.start_round(dear)
    assert policy.branches.min_value > tree.min_value
    energy = make_policy("pipesd_tree", objective="edge_energy")
    energy.start_round(LINK)
    assert energy.branches is None
    with pytest.raises(ConfigError):
        PipeSD(branch_depth=-1)


def test_the_dp_schedule_closes_the_planned_batches_and_follows_the_window():
    p = make_policy("pipesd_fixed")
    slow_uplink = LinkEstimate(alpha=0.005, beta=0.01, gamma=0.002, verify=0.005, acceptance=0.5)
    p.start_round(slow_uplink)
    sizes = p.schedule.sizes
    assert sum(sizes) == 20 and len(sizes) > 1          # N-hat starts at 20; a slow uplink wants batches
    ends = {sum(sizes[: i + 1]) for i in range(len(sizes))}
    assert {n for n in range(1, 21) if p.closes_batch(n)} == ends
    for _ in range(8):                                   # rounds of 6 tokens: N-hat follows
        p.on_verdict(verdict(draft(*[0.9] * 6), 6))
    p.start_round(slow_uplink)
    assert sum(p.schedule.sizes) == 6


def test_per_token_and_at_trigger_schedules():
    assert all(make_policy("pipesd_per_token").closes_batch(n) for n in range(1, 10))
    assert not any(make_policy("pipesd_at_trigger").closes_batch(n) for n in range(1, 10))


def test_edgellm_learns_from_verdicts_and_its_reproducible_copy_starts_fresh():
    p = make_policy("edgellm")
    assert isinstance(p.trigger, AdaptiveCumulative) and p.proactive
    p.on_verdict(verdict(draft(0.9, 0.9, 0.9, 0.9), 4))
    assert p.trigger.threshold == pytest.approx(0.475)
    copy = p.reproducible()
    assert copy is not p and copy.trigger.threshold == 0.5
    copy.on_verdict(verdict(draft(0.9, 0.9), 2))
    assert p.trigger.threshold == pytest.approx(0.475)   # the copy teaches the original nothing


class FixedTuner(OnlineAutotuner):
    """An autotuner whose proposals are known (no BO): (0.01, 0.5) while "exploring", best (0.02, 0.3)."""

    def __post_init__(self):
        super().__post_init__()
        self.recorded = []

    def thresholds(self):
        return (0.01, 0.5)

    def best_thresholds(self):
        return (0.02, 0.3)

    def record(self, tokens, seconds, regime, acceptance):
        self.recorded.append((tokens, seconds, regime, acceptance))


def test_the_papers_pipesd_owns_its_tuning():
    tuner = FixedTuner()
    p = make_policy("pipesd_bo", tuner=tuner)
    assert isinstance(p, PaperPipeSD) and isinstance(p.trigger, DualThreshold)
    p.start_round(LINK)
    assert (p.trigger.r1, p.trigger.r2) == (0.01, 0.5)      # the tuner's candidate is what decides
    assert p.verify_now(draft(0.9, 0.4)) and not p.verify_now(draft(0.9, 0.6))
    p.on_verdict(verdict(draft(0.9, 0.6, 0.6), 2, seconds=0.03))
    assert tuner.recorded == [(3, 0.03, LINK.regime(), LINK.acceptance)]   # scored per committed token
    seeded = p.reproducible()
    assert seeded.tuner is None and (seeded.trigger.r1, seeded.trigger.r2) == (0.02, 0.3)
    seeded.start_round(LINK)
    seeded.on_verdict(verdict(draft(0.9), 1))
    assert (seeded.trigger.r1, seeded.trigger.r2) == (0.02, 0.3) and len(tuner.recorded) == 1


def test_cloud_only_and_edge_only_are_plain_facts():
    c, e = CloudOnly(), EdgeOnly()
    assert c.max_draft == 0 and c.uses_cloud and not c.proactive and c.reproducible().max_draft == 0
    assert not e.uses_cloud


def test_an_app_can_bring_its_own_policy():
    class EveryThird(Speculative):
        def verify_now(self, d):
            return len(d) % 3 == 0

    p = EveryThird("every_third", DualThreshold(None, None), PerToken())
    assert [p.verify_now(draft(*[0.9] * n)) for n in (1, 2, 3)] == [False, False, True] and p.closes_batch(1)
