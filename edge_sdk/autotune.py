"""Online tuning of the dual-threshold trigger (R1, R2) by Bayesian optimisation.

``Tuner`` is the small ask/tell interface a backend implements; ``SkoptTuner`` is a
Gaussian process (Matérn kernel) with expected improvement (xi = 0.1) from scikit-optimize,
16 evaluations over the paper's bounds. ``OnlineAutotuner`` runs it while the app generates:
each candidate is used for about 20 accepted tokens and scored by their time per token; the
next candidate is computed on a background thread, so generation never waits for the GP.
The best thresholds are remembered per network regime, and tuning restarts when the regime
or the acceptance rate drifts.

scikit-optimize (with scipy and scikit-learn, ~200 MB) is the ``tune`` extra, not part of the bare
edge install: without it ``default_tuner`` searches the same bounds on a grid with the same budget
(measured on S1, docs/bench: best TPT 74.9 ms by grid, 76.3 ms by BO) and says so once in the log.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .triggers import DEFAULT_R1, DEFAULT_R2

# The paper's search space. Its drafts (1.1-1.3B) were confident when right; ours are not: on the
# embedded pair 63% of draft tokens have P(d_n) < 0.6 and tokens at P(d_n) in [0.2, 0.4) are still
# accepted 74% of the time (docs/pipeline.md), so with R2 >= 0.6 the trigger fires after ~1 token.
# The default space therefore reaches lower; PAPER_BOUNDS restores the paper's.
PAPER_BOUNDS = ((0.05, 0.9), (0.6, 0.99))
DEFAULT_BOUNDS = ((0.001, 0.9), (0.02, 0.99))
R1_BOUNDS, R2_BOUNDS = DEFAULT_BOUNDS


class Tuner(Protocol):
    def ask(self) -> tuple[float, float]:
        """Next (R1, R2) to evaluate."""

    def tell(self, params: tuple[float, float], objective: float) -> None:
        """Objective (lower is better: seconds per token) of an evaluated candidate."""

    @property
    def done(self) -> bool: ...

    def best(self) -> tuple[float, float] | None: ...


class _Budgeted:
    """What every tuner keeps: its evaluations in order, a budget, and the best seen."""

    budget: int
    evaluations: list[tuple[tuple[float, float], float]]

    def tell(self, params, objective) -> None:
        self.evaluations.append((tuple(params), float(objective)))

    @property
    def done(self) -> bool:
        return len(self.evaluations) >= self.budget

    def best(self):
        return min(self.evaluations, key=lambda e: e[1])[0] if self.evaluations else None


def _quiet_gp_fits() -> None:
    """The GP's hyper-parameter fit warns (sklearn's ConvergenceWarning) when a length scale or the noise
    level sits on its bound -- routine with a few noisy evaluations, and nothing the app can act on, so
    it should not reach the app's stderr. scikit-optimize silences it with ``warnings.catch_warnings``,
    which is not thread-safe, and the tuners fit on a background thread; a filter installed once, before
    that thread starts, does not depend on it. Only warnings from sklearn's GP module (matched by name,
    so that sklearn need not be imported before the tuner needs it)."""
    warnings.filterwarnings("ignore", module=r"sklearn\.gaussian_process")


class SkoptTuner(_Budgeted):
    def __init__(self, budget: int = 16, seed: int = 0, initial_points: int = 5,
                 bounds: tuple[tuple[float, float], tuple[float, float]] = DEFAULT_BOUNDS):
        from skopt import Optimizer
        from skopt.learning import GaussianProcessRegressor
        from skopt.space import Real
        from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        _quiet_gp_fits()

        # Matern(2.5) over (R1, R2) plus a white-noise term for measurement noise; its lower bound is
        # far below any real TPT noise, so the hyper-parameter fit does not sit on it.
        kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * Matern(length_scale=[0.3, 0.1], length_scale_bounds=(1e-3, 1e2),
                                                              nu=2.5)
                  + WhiteKernel(1e-3, (1e-12, 1e1)))
        gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed)
        # Log-uniform: the useful thresholds of an under-confident draft sit near the low ends, where
        # a linear space spends almost no evaluations.
        space = [Real(*bounds[0], prior="log-uniform"), Real(*bounds[1], prior="log-uniform")]
        self._opt = Optimizer(space, base_estimator=gp, acq_func="EI",
                              acq_func_kwargs={"xi": 0.1}, n_initial_points=initial_points, random_state=seed)
        self.budget = budget
        self.evaluations: list[tuple[tuple[float, float], float]] = []

    def ask(self) -> tuple[float, float]:
        r1, r2 = self._opt.ask()
        return float(r1), float(r2)

    def tell(self, params, objective) -> None:
        self._opt.tell(list(params), float(objective))
        super().tell(params, objective)


log = logging.getLogger("edge_sdk")
_said_grid = False


def default_tuner() -> Tuner:
    """The tuner ``pipesd`` uses: BO (``SkoptTuner``) when scikit-optimize is installed, else ``GridTuner``."""
    global _said_grid
    if importlib.util.find_spec("skopt") is not None:
        return SkoptTuner()
    if not _said_grid:
        _said_grid = True
        log.warning("scikit-optimize is not installed: PipeSD tunes its thresholds by grid search "
                    "(pip install 'pipesd[tune]' for Bayesian optimisation)")
    return GridTuner()


class _ListTuner(_Budgeted):
    """Evaluates a fixed list of candidates in order (the grid and random baselines of BO)."""

    def __init__(self, candidates: list[tuple[float, float]]):
        self._candidates = candidates
        self.budget = len(candidates)
        self.evaluations: list[tuple[tuple[float, float], float]] = []

    def ask(self) -> tuple[float, float]:
        return self._candidates[min(len(self.evaluations), self.budget - 1)]


def _log_points(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [(lo * hi) ** 0.5]


class GridTuner(_ListTuner):
    """A log-spaced grid over the same bounds as the BO, with the same budget (4 x 4 = 16)."""

    def __init__(self, budget: int = 16, bounds=DEFAULT_BOUNDS):
        side = max(1, round(budget ** 0.5))
        super().__init__([(r1, r2) for r1 in _log_points(*bounds[0], side) for r2 in _log_points(*bounds[1], side)])


class RandomTuner(_ListTuner):
    """Log-uniform random candidates over the same bounds as the BO, with the same budget."""

    def __init__(self, budget: int = 16, seed: int = 0, bounds=DEFAULT_BOUNDS):
        import random

        rng = random.Random(seed)
        draw = lambda lo, hi: lo * (hi / lo) ** rng.random()   # noqa: E731
        super().__init__([(draw(*bounds[0]), draw(*bounds[1])) for _ in range(budget)])


@dataclass
class _Trial:
    params: tuple[float, float]
    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float, needed: int) -> bool:
        """Count a round; True once the trial has its `needed` tokens."""
        self.tokens += tokens
        self.seconds += seconds
        return self.tokens >= needed


@dataclass
class OnlineAutotuner:
    """Feeds a Tuner with live measurements; never blocks the caller.

    The engine asks ``thresholds()`` before each round and reports each round with
    ``record(tokens, seconds, regime, acceptance)``.
    """

    default: tuple[float, float] = (DEFAULT_R1, DEFAULT_R2)
    tokens_per_trial: int = 20
    acceptance_drift: float = 0.25
    drift_patience: int = 64      # consecutive rounds the acceptance must stay off its baseline to retune
    settle_rounds: int = 64       # rounds at the tuned thresholds before their acceptance becomes the baseline
    regime_patience: int = 16     # rounds a new network regime must persist before it counts
    make_tuner: Callable[[], Tuner] = default_tuner
    # regime -> [best params, baseline acceptance, rounds since tuned, consecutive rounds off the baseline]
    memory: dict = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._regime = None
        self._candidate, self._candidate_rounds = None, 0
        self._tuner: Tuner | None = None
        self._trial: _Trial | None = None
        self._pending: threading.Thread | None = None
        self._starting = None
        self.trials_done = 0

    def thresholds(self) -> tuple[float, float]:
        with self._lock:
            if self._trial is not None:
                return self._trial.params
            remembered = self.memory.get(self._regime)
            if remembered:
                return remembered[0]
            best = self._tuner.best() if self._tuner else None
            return best or self.default

    def best_thresholds(self) -> tuple[float, float]:
        """The best thresholds known now: remembered for this regime, else the best evaluated so
        far (tuning unfinished), else the defaults. Unlike ``thresholds()``, never a trial."""
        with self._lock:
            remembered = self.memory.get(self._regime)
            if remembered:
                return remembered[0]
            best = self._tuner.best() if self._tuner else None
            return best or self.default

    @property
    def evaluations(self) -> list[tuple[tuple[float, float], float]]:
        """(candidate, seconds per token) of the current or last tuning run, in order."""
        return list(getattr(self._tuner, "evaluations", None) or [])

    @property
    def tuning(self) -> bool:
        return self._starting is not None and (self._tuner is None or not self._tuner.done)

    def record(self, tokens: int, seconds: float, regime, acceptance: float) -> None:
        with self._lock:
            regime = self._settled(regime)
            if regime != self._regime or (self._starting is None and regime not in self.memory):
                self._regime = regime
                known = [r for r in self.memory if r is not None and abs(r - regime) <= 1]
                if known and regime not in self.memory:
                    self.memory[regime] = self.memory.pop(known[0])
                if regime in self.memory:   # a known regime: its best thresholds, no tuning
                    self._tuner, self._trial, self._starting = None, None, None
                else:
                    self._start()
            elif regime in self.memory:
                # Acceptance depends on the thresholds, so the baseline is what the tuned ones give
                # once the acceptance window holds only their rounds; a drift from it means retune.
                entry = self.memory[regime]
                entry[2] += 1
                if entry[1] is None and entry[2] >= self.settle_rounds:
                    entry[1] = acceptance
                elif entry[1] is not None:
                    entry[3] = entry[3] + 1 if abs(acceptance - entry[1]) > self.acceptance_drift else 0
                    if entry[3] >= self.drift_patience:
                        del self.memory[regime]
                        self._start()
            trial = self._trial
            if trial is None or not trial.add(tokens, seconds, self.tokens_per_trial):
                return
            self._trial = None
            tuner = self._tuner
            self.trials_done += 1
            objective = trial.seconds / trial.tokens
            regime_now = self._regime

        def advance():   # GP fit + acquisition: tens of ms, kept off the generation path
            tuner.tell(trial.params, objective)
            with self._lock:
                if tuner is not self._tuner:
                    return
                if tuner.done:
                    self.memory[regime_now] = [tuner.best(), None, 0, 0]
                else:
                    self._trial = _Trial(tuner.ask())

        self._pending = threading.Thread(target=advance, name="autotune", daemon=True)
        self._pending.start()

    def _settled(self, observed):
        """The regime in force: a new one only after `regime_patience` consecutive rounds in it.

        None (nothing measured yet) never replaces a regime, and the first measured regime takes
        over what was learnt under None instead of starting again.
        """
        if observed is not None and self._regime is not None and abs(observed - self._regime) <= 1:
            observed = self._regime    # a neighbouring bucket: the same regime (hysteresis)
        if observed is None or observed == self._regime:
            self._candidate, self._candidate_rounds = None, 0
            return self._regime
        if self._regime is None and self._starting is not None:
            if None in self.memory:
                self.memory[observed] = self.memory.pop(None)
            self._regime = observed
            return observed
        if observed != self._candidate:
            self._candidate, self._candidate_rounds = observed, 0
        self._candidate_rounds += 1
        return observed if self._candidate_rounds >= self.regime_patience else self._regime

    def _start(self) -> None:
        """Begin a tuning run; building the optimiser (and importing skopt) happens off-thread."""
        self._tuner, self._trial = None, None
        token = object()
        self._starting = token

        def build():
            tuner = self.make_tuner()
            first = _Trial(tuner.ask())
            with self._lock:
                if self._starting is token:
                    self._tuner, self._trial = tuner, first

        self._pending = threading.Thread(target=build, name="autotune-start", daemon=True)
        self._pending.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background tuner step (tests and benchmarks)."""
        if self._pending is not None:
            self._pending.join(timeout)


class CorrectionTuner:
    """BO over a small correction of the round controller's model point, never over the thresholds.

    The controller (``controller.py``) already puts its thresholds where its cost model says; what
    the model gets wrong is a bias, the same under every link: how optimistic it is about tokens not
    yet drafted, and how much it values a token against a second of cost. The tuner searches
    (log-scale of rho, logit bias of the acceptance model) in [-bound, bound]^2, starting at (0, 0)
    -- the model's own point -- so it never starts from scratch, and it runs once: a link change
    moves the model's point, not the correction. Each candidate runs for `tokens_per_trial`
    committed tokens, scored by seconds per token; the GP step runs on a background thread.
    Trials are noisy, and the best of ten noisy trials is flattered by its own luck (the winner's
    curse): a candidate that beat (0, 0) by more than `margin` is run once more, and (0, 0) with it,
    and replaces it only if it still does over both trials each.
    """

    def __init__(self, budget: int = 10, tokens_per_trial: int = 64, bound: float = 0.7, margin: float = 0.08,
                 seed: int = 0, use_bo: bool | None = None):
        self.budget, self.tokens_per_trial, self.bound, self.margin = budget, tokens_per_trial, bound, margin
        self.evaluations: list[tuple[tuple[float, float], float]] = []
        self._lock = threading.Lock()
        self._pending: threading.Thread | None = None
        self._trial = _Trial((0.0, 0.0))
        self._best = (0.0, 0.0)
        # The first trial is the model's own point, so the optimiser (and scikit-optimize's ~1 s import)
        # is only built on the background thread, once that trial has been scored.
        self._use_bo = importlib.util.find_spec("skopt") is not None if use_bo is None else use_bo
        if self._use_bo:
            _quiet_gp_fits()     # here, not on the thread that fits: a catch_warnings ending there could undo it
        self._seed = seed
        self._optimizer = None
        self.confirmations: list[tuple[tuple[float, float], float]] = []   # the re-runs of (0, 0) and the winner
        self._confirm: list[tuple[float, float]] = []                      # re-runs still to do
        self._decided = False
        h = bound / 2
        self._list = [(-h, 0.0), (h, 0.0), (0.0, -h), (0.0, h), (-h, -h), (h, h), (-h, h), (h, -h),
                      (-bound, 0.0), (bound, 0.0), (0.0, bound), (0.0, -bound)]

    @property
    def tuning(self) -> bool:
        """True until the correction is decided (the budget spent, and a winner's re-runs done)."""
        return not self._decided

    def correction(self) -> tuple[float, float]:
        """The correction to apply now: a candidate while tuning, then the best found."""
        with self._lock:
            return self._trial.params if self._trial is not None else self._best

    def best(self) -> tuple[float, float]:
        with self._lock:
            return self._best

    def record(self, tokens: int, seconds: float) -> None:
        with self._lock:
            trial = self._trial
            if trial is None or not trial.add(tokens, seconds, self.tokens_per_trial):
                return
            self._trial = None
            if len(self.evaluations) >= self.budget:         # a confirmation re-run
                self.confirmations.append((trial.params, trial.seconds / trial.tokens))
                if self._confirm:
                    self._trial = _Trial(self._confirm.pop(0))
                else:
                    self._best, self._decided = self._confirmed(), True
                return
            self.evaluations.append((trial.params, trial.seconds / trial.tokens))
            done = len(self.evaluations) >= self.budget

        def advance():
            with self._lock:
                evaluations = list(self.evaluations)
            if self._use_bo and self._optimizer is None:
                from skopt import Optimizer
                from skopt.space import Real

                b = self.bound
                self._optimizer = Optimizer([Real(-b, b), Real(-b, b)], base_estimator="GP", acq_func="EI",
                                            acq_func_kwargs={"xi": 0.1}, n_initial_points=3,
                                            random_state=self._seed)
                for params, score in evaluations[:-1]:
                    self._optimizer.tell(list(params), score)
            if self._optimizer is not None:
                self._optimizer.tell(list(evaluations[-1][0]), evaluations[-1][1])
            if done:
                origin = evaluations[0][1]
                params, score = min(evaluations, key=lambda e: e[1])
                with self._lock:
                    if score < origin * (1 - self.margin):      # a winner, if its luck holds: re-run both
                        self._confirm = [params]
                        self._trial = _Trial((0.0, 0.0))
                    else:
                        self._best, self._decided = (0.0, 0.0), True
                return
            if self._optimizer is not None:
                nxt = tuple(float(v) for v in self._optimizer.ask())
            else:
                nxt = self._list[(len(evaluations) - 1) % len(self._list)]
            with self._lock:
                self._trial = _Trial(nxt)

        self._pending = threading.Thread(target=advance, name="correction-tune", daemon=True)
        self._pending.start()

    def _confirmed(self) -> tuple[float, float]:
        """After the re-runs (lock held): the winner if it beats (0, 0) by `margin` over both trials of each."""
        def mean(params):
            scores = [s for p, s in self.evaluations + self.confirmations if p == params]
            return sum(scores) / len(scores)

        winner = next(p for p, _ in self.confirmations if p != (0.0, 0.0))
        return winner if mean(winner) < mean((0.0, 0.0)) * (1 - self.margin) else (0.0, 0.0)

    def wait(self, timeout: float | None = None) -> None:
        if self._pending is not None:
            self._pending.join(timeout)
