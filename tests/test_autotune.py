"""The BO autotuner: finds the optimum of a known objective within its budget, online and per regime."""

import pytest

from edge_sdk.autotune import PAPER_BOUNDS, R1_BOUNDS, R2_BOUNDS, OnlineAutotuner, SkoptTuner


def bowl(r1, r2):
    """A smooth TPT-like objective with its minimum at R1 = 0.35, R2 = 0.85 (inside both search spaces)."""
    return 0.05 + (r1 - 0.35) ** 2 + 2 * (r2 - 0.85) ** 2


def test_skopt_tuner_finds_the_bowl():
    tuner = SkoptTuner(budget=16, seed=1)
    while not tuner.done:
        p = tuner.ask()
        assert R1_BOUNDS[0] <= p[0] <= R1_BOUNDS[1] and R2_BOUNDS[0] <= p[1] <= R2_BOUNDS[1]
        tuner.tell(p, bowl(*p))
    best = tuner.best()
    assert len(tuner.evaluations) == 16
    assert bowl(*best) < bowl(0.3, 0.7)                   # better than a middle-of-the-road guess
    assert bowl(*best) - 0.05 < 0.02


def run_online(auto, regime, rounds, acceptance=0.6):
    for _ in range(rounds):
        r1, r2 = auto.thresholds()
        auto.record(tokens=5, seconds=5 * bowl(r1, r2), regime=regime, acceptance=acceptance)
        auto.wait()


def test_online_tuning_completes_and_remembers_the_regime():
    auto = OnlineAutotuner(make_tuner=lambda: SkoptTuner(budget=8, seed=2))
    run_online(auto, regime=(3, 1), rounds=8 * 4 + 2)      # 4 rounds of 5 tokens per 20-token trial
    assert not auto.tuning and (3, 1) in auto.memory
    tuned = auto.thresholds()
    assert bowl(*tuned) < bowl(*auto.default)
    run_online(auto, regime=(6, 4), rounds=3)              # a blip: not yet a new regime
    assert not auto.tuning
    run_online(auto, regime=(6, 4), rounds=16)             # it persists: a new tuning run
    assert auto.tuning
    run_online(auto, regime=(3, 1), rounds=16)             # back in the known regime: its best, no tuning
    assert auto.thresholds() == tuned and not auto.tuning


def test_acceptance_drift_restarts_tuning():
    auto = OnlineAutotuner(make_tuner=lambda: SkoptTuner(budget=6, seed=3), settle_rounds=10, drift_patience=5)
    run_online(auto, regime=(1, 1), rounds=6 * 4 + 2, acceptance=0.3)
    assert not auto.tuning
    # The tuned thresholds change the acceptance itself: the baseline is taken after they settle.
    run_online(auto, regime=(1, 1), rounds=12, acceptance=0.6)
    assert not auto.tuning
    run_online(auto, regime=(1, 1), rounds=3, acceptance=0.2)   # a few bad rounds: noise
    assert not auto.tuning
    run_online(auto, regime=(1, 1), rounds=5, acceptance=0.2)   # it persists: retune
    assert auto.tuning


def test_paper_bounds_are_available():
    tuner = SkoptTuner(budget=4, seed=4, bounds=PAPER_BOUNDS)
    for _ in range(4):
        p = tuner.ask()
        assert 0.05 <= p[0] <= 0.9 and 0.6 <= p[1] <= 0.99
        tuner.tell(p, bowl(*p))
