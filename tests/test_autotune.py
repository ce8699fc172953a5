"""The BO autotuner: finds the optimum of a known objective within its budget, online and per regime."""

import math

import pytest

from edge_sdk.autotune import PAPER_BOUNDS, R1_BOUNDS, R2_BOUNDS, OnlineAutotuner, SkoptTuner
from edge_sdk.triggers import DEFAULT_R1, DEFAULT_R2


def native(r1, r2):
    """TPT-like: a round trip dominates, long drafts pay (low thresholds). Minimum at (0.01, 0.1)."""
    return 0.02 + 0.01 * math.log10(r1 / 0.01) ** 2 + 0.02 * math.log10(r2 / 0.1) ** 2


def paper(r1, r2):
    """TPT-like: every uploaded token costs, so verify almost at once (R2 near 1)."""
    return 0.1 + 0.05 * (1 - r2) + 0.01 * math.log10(r1 / 0.3) ** 2


bowl = native


@pytest.mark.parametrize("objective", [native, paper])
@pytest.mark.parametrize("seed", [0, 1])
def test_skopt_tuner_finds_the_optimum_of_either_regime(objective, seed):
    tuner = SkoptTuner(budget=16, seed=seed)
    while not tuner.done:
        p = tuner.ask()
        assert R1_BOUNDS[0] <= p[0] <= R1_BOUNDS[1] and R2_BOUNDS[0] <= p[1] <= R2_BOUNDS[1]
        tuner.tell(p, objective(*p))
    best = tuner.best()
    assert len(tuner.evaluations) == 16
    floor = min(objective(r1, r2) for r1 in (0.001, 0.01, 0.1, 0.3, 0.9) for r2 in (0.02, 0.1, 0.5, 0.99))
    assert objective(*best) < objective(0.3, 0.7) and objective(*best) < objective(DEFAULT_R1, DEFAULT_R2)
    assert objective(*best) - floor < 0.01


def run_online(auto, regime, rounds, acceptance=0.6):
    for _ in range(rounds):
        r1, r2 = auto.thresholds()
        auto.record(tokens=5, seconds=5 * bowl(r1, r2), regime=regime, acceptance=acceptance)
        auto.wait()


def test_online_tuning_completes_and_remembers_the_regime():
    auto = OnlineAutotuner(make_tuner=lambda: SkoptTuner(budget=8, seed=2))
    run_online(auto, regime=3, rounds=8 * 4 + 2)      # 4 rounds of 5 tokens per 20-token trial
    assert not auto.tuning and 3 in auto.memory
    tuned = auto.thresholds()
    assert bowl(*tuned) < bowl(*auto.default)
    run_online(auto, regime=6, rounds=3)              # a blip: not yet a new regime
    assert not auto.tuning
    run_online(auto, regime=6, rounds=16)             # it persists: a new tuning run
    assert auto.tuning
    run_online(auto, regime=3, rounds=16)             # back in the known regime: its best, no tuning
    assert auto.thresholds() == tuned and not auto.tuning


def test_acceptance_drift_restarts_tuning():
    auto = OnlineAutotuner(make_tuner=lambda: SkoptTuner(budget=6, seed=3), settle_rounds=10, drift_patience=5)
    run_online(auto, regime=1, rounds=6 * 4 + 2, acceptance=0.3)
    assert not auto.tuning
    # The tuned thresholds change the acceptance itself: the baseline is taken after they settle.
    run_online(auto, regime=1, rounds=12, acceptance=0.6)
    assert not auto.tuning
    run_online(auto, regime=1, rounds=3, acceptance=0.2)   # a few bad rounds: noise
    assert not auto.tuning
    run_online(auto, regime=1, rounds=5, acceptance=0.2)   # it persists: retune
    assert auto.tuning


def test_paper_bounds_are_available():
    tuner = SkoptTuner(budget=4, seed=4, bounds=PAPER_BOUNDS)
    for _ in range(4):
        p = tuner.ask()
        assert 0.05 <= p[0] <= 0.9 and 0.6 <= p[1] <= 0.99
        tuner.tell(p, bowl(*p))


def test_grid_and_random_search_baselines_share_the_budget_and_bounds():
    from edge_sdk.autotune import DEFAULT_BOUNDS, GridTuner, RandomTuner

    (lo1, hi1), (lo2, hi2) = DEFAULT_BOUNDS
    grid, rand = GridTuner(), RandomTuner(seed=5)
    assert grid.budget == rand.budget == 16
    seen = []
    for tuner in (grid, rand):
        while not tuner.done:
            r1, r2 = tuner.ask()
            assert lo1 <= r1 <= hi1 * (1 + 1e-9) and lo2 <= r2 <= hi2 * (1 + 1e-9)
            tuner.tell((r1, r2), abs(r1 - 0.01) + abs(r2 - 0.1))     # best near (0.01, 0.1)
            seen.append((r1, r2))
    assert len(set(seen[:16])) == 16, "the grid visits 16 distinct points"
    assert min(p[0] for p in seen[:16]) == pytest.approx(lo1) and max(p[1] for p in seen[:16]) == pytest.approx(hi2)
    assert RandomTuner(seed=5)._candidates == rand._candidates != RandomTuner(seed=6)._candidates
    best = grid.best()
    assert best == min(grid.evaluations, key=lambda e: e[1])[0]


def test_without_scikit_optimize_pipesd_tunes_by_grid(monkeypatch, caplog):
    """The bare edge install has no scikit-optimize: the default tuner is the grid over the same bounds,
    with the same budget, and the log says so once."""
    import importlib.util

    from edge_sdk import autotune

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skopt" else real(name, *a))
    monkeypatch.setattr(autotune, "_said_grid", False)
    with caplog.at_level("WARNING", logger="edge_sdk"):
        first, second = autotune.default_tuner(), autotune.default_tuner()
    assert isinstance(first, autotune.GridTuner) and first.budget == 16
    assert sum("grid search" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert isinstance(autotune.default_tuner(), SkoptTuner)


def test_the_gps_convergence_warnings_never_reach_the_app():
    """scikit-optimize silences the GP fit's ConvergenceWarning with warnings.catch_warnings, which is not
    thread-safe: with the next candidate fitted on a background thread, the warning leaked to stderr now
    and then (seen in test runs). A tuner installs a filter for warnings from sklearn's GP module only."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    def caught(module: str) -> list:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            SkoptTuner(budget=4)                  # installs the filter (again: the list holds it once)
            warnings.warn_explicit("length scale close to its bound", ConvergenceWarning, "kernels.py", 455,
                                   module=module)
        return seen

    assert caught("sklearn.gaussian_process.kernels") == []
    assert len(caught("sklearn.linear_model._sag")) == 1        # anyone else's convergence warnings stay
