"""The measurement harness: warm-up, idle baseline, repetitions, mean with a 95% interval.

    harness = Harness(edge=ModelledMeter("laptop"), cloud=ModelledMeter("server", CpuClock(verifier_pid)))
    m = harness.measure(run_one_request, label="pipesd s1")     # a callable returning an Activity
    m = harness.measure_command(["pipesd", "bench", "--quick"])  # or any command (a whole bench run)
    print(m.edge_per_token)      # Stat(mean, half-width of the 95% interval, n)

Procedure, per ``measure``:

1. ``warmup`` unmeasured calls (caches, JIT, connection set-up).
2. An **idle baseline** (once per harness, `idle_s` seconds of doing nothing) gives each meter's idle
   power; every reading then has idle power × its duration subtracted (the *net* energy the work added).
   The baseline is reported with the results.
3. ``repetitions`` (≥ 5) measured calls; each yields a ``Sample``.

The workload tells the harness what it did through an ``Activity`` (tokens, seconds per phase,
transfers): the harness never looks inside the SDK. From it the edge's net energy is split by phase:

- ``draft``, ``fallback``, ``overhead``: the compute energy shared out by seconds of compute (drafting,
  drafting offline, everything else the process did: sealing, HTTP, the tuner);
- ``radio_up``, ``radio_down``: the radio model's energy for the transfers (``radio.py``);
- ``waiting``: the radio's tail while the device waits for the cloud (and its promotions).

Compute that the workload *emulated* by sleeping (a slow device's drafting, ``emulated_compute_s``) is
charged at the edge CPU model's active power per core, and the label says so.
"""

from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .meters import CPU_MODELS, CpuPowerModel, Meter, MeterError, Reading
from .radio import RADIOS, RadioEnergy, RadioModel, Transfer, radio_energy

PHASES = ("draft", "radio_up", "radio_down", "waiting", "fallback", "overhead")


@dataclass
class Activity:
    """What one measured call did, as the workload reports it."""

    output_tokens: int = 0
    draft_s: float = 0.0              # device seconds spent drafting (emulated compute included)
    fallback_s: float = 0.0           # of those, seconds drafting alone while the cloud was unreachable
    wait_s: float = 0.0               # seconds blocked on the cloud
    emulated_compute_s: float = 0.0   # compute modelled as done by the device but slept in this run
    transfers: list[Transfer] = field(default_factory=list)
    emulated_link: bool = False       # the transfers crossed an emulated link, not this device's radio


@dataclass(frozen=True)
class Stat:
    mean: float
    ci95: float           # half-width of the 95% t-interval
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.ci95:.2g}"


def mean_ci(values: Sequence[float]) -> Stat:
    """Mean and the half-width of its 95% Student-t interval."""
    n = len(values)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Stat(mean, math.inf, 1)
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Baseline:
    edge_w: float
    cloud_w: float | None
    seconds: float
    edge_method: str
    cloud_method: str | None


@dataclass
class Sample:
    """One repetition: raw readings, and the net energy split."""

    seconds: float
    edge: Reading
    cloud: Reading | None
    activity: Activity | None
    edge_net_j: float
    edge_phases_j: dict[str, float]
    cloud_net_j: float | None
    radio: RadioEnergy | None

    @property
    def tokens(self) -> int:
        return self.activity.output_tokens if self.activity else 0


@dataclass
class Measurement:
    label: str
    samples: list[Sample]
    baseline: Baseline
    edge_method: str
    cloud_method: str | None

    def _per_token(self, pick: Callable[[Sample], float | None]) -> Stat:
        vals = [pick(s) / s.tokens for s in self.samples if s.tokens and pick(s) is not None]
        return mean_ci(vals)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def edge_j(self) -> Stat:
        return mean_ci([s.edge_net_j for s in self.samples])

    @property
    def cloud_j(self) -> Stat | None:
        vals = [s.cloud_net_j for s in self.samples if s.cloud_net_j is not None]
        return mean_ci(vals) if vals else None

    @property
    def edge_per_token(self) -> Stat:
        return self._per_token(lambda s: s.edge_net_j)

    @property
    def cloud_per_token(self) -> Stat | None:
        return self._per_token(lambda s: s.cloud_net_j) if self.cloud_method else None

    @property
    def edge_gross_per_token(self) -> Stat:
        """Net plus the device's idle power over the run: what the battery actually paid."""
        return self._per_token(lambda s: s.edge_net_j + self.baseline.edge_w * s.edge.seconds)

    def phase_per_token(self, phase: str) -> Stat:
        return self._per_token(lambda s: s.edge_phases_j.get(phase, 0.0))

    @property
    def seconds(self) -> Stat:
        return mean_ci([s.seconds for s in self.samples])

    def row(self) -> dict:
        """Flat figures for a CSV/markdown table (J per output token unless named otherwise)."""
        d = {"label": self.label, "repetitions": len(self.samples), "tokens": self.tokens,
             "seconds_mean": self.seconds.mean,
             "edge_j_per_token": self.edge_per_token.mean, "edge_j_per_token_ci95": self.edge_per_token.ci95,
             "edge_gross_j_per_token": self.edge_gross_per_token.mean,
             "edge_idle_w": self.baseline.edge_w, "edge_method": self.edge_method}
        for p in PHASES:
            d[f"edge_{p}_j_per_token"] = self.phase_per_token(p).mean
        c = self.cloud_per_token
        d.update(cloud_j_per_token=c.mean if c else math.nan, cloud_j_per_token_ci95=c.ci95 if c else math.nan,
                 cloud_idle_w=self.baseline.cloud_w, cloud_method=self.cloud_method)
        if not self.tokens:    # a command: energy per run
            d.update(edge_j_per_run=self.edge_j.mean, edge_j_per_run_ci95=self.edge_j.ci95,
                     cloud_j_per_run=self.cloud_j.mean if self.cloud_j else math.nan)
        return d


class Harness:
    """Measures callables and commands with an edge meter and (optionally) a cloud meter."""

    def __init__(self, edge: Meter, cloud: Meter | None = None, *, radio: RadioModel | str | None = "wifi",
                 edge_model: CpuPowerModel | str = "laptop", repetitions: int = 5, warmup: int = 1,
                 idle_s: float = 2.0, progress: bool = False):
        if repetitions < 5:
            raise ValueError("repetitions must be >= 5 (a 95% interval from fewer is not worth printing)")
        if warmup < 0 or idle_s <= 0:
            raise ValueError("warmup must be >= 0 and idle_s > 0")
        self.edge, self.cloud = edge, cloud
        self.radio = RADIOS[radio] if isinstance(radio, str) else radio
        self.edge_model = CPU_MODELS[edge_model] if isinstance(edge_model, str) else edge_model
        self.repetitions, self.warmup, self.idle_s = repetitions, warmup, idle_s
        self.progress = progress
        self._baseline: Baseline | None = None

    # -- the idle baseline -------------------------------------------------------------------
    def baseline(self) -> Baseline:
        if self._baseline is None:
            e = self.edge.start()
            c = self.cloud.start() if self.cloud else None
            t0 = time.perf_counter()
            time.sleep(self.idle_s)
            edge = self._stop_lenient(self.edge, e, t0)
            cloud = self._stop_lenient(self.cloud, c, t0) if self.cloud else None
            self._baseline = Baseline(edge.watts, cloud.watts if cloud else None, edge.seconds, edge.method,
                                      cloud.method if cloud else None)
        return self._baseline

    @staticmethod
    def _stop_lenient(meter: Meter, token, t0: float) -> Reading:
        """A period in which the metered side did nothing measurable (idle, or a cloud that an
        edge-only request never called) reads as zero joules, and the label says why."""
        try:
            return meter.stop(token)
        except MeterError as exc:
            if "below its resolution" not in str(exc):
                raise
            return Reading(0.0, time.perf_counter() - t0, f"{meter.name} (nothing measurable: below resolution)",
                           "no measurable activity", cpu_seconds=0.0)

    # -- measuring -------------------------------------------------------------------------------
    def _split(self, reading: Reading, activity: Activity | None, net: float,
               cpu_used: float) -> tuple[float, dict, RadioEnergy | None]:
        """The edge's net energy with emulated compute and the radio added, and its phase split."""
        phases = dict.fromkeys(PHASES, 0.0)
        if activity is None:
            phases["overhead"] = net
            return net, phases, None
        emulated_j = activity.emulated_compute_s * self.edge_model.active_w
        radio = radio_energy(activity.transfers, self.radio) if (self.radio and activity.transfers) else None
        radio_j = radio.total if radio else 0.0
        # A meter that covers the radio (a battery) already holds the radio's energy, unless the
        # transfers only crossed an emulated link: then the model's figure is added, not carved out.
        inside = reading.includes_radio and not activity.emulated_link
        compute_j = net + emulated_j - (radio_j if inside else 0.0)
        total = compute_j + radio_j
        # Share the compute energy by seconds of compute: drafting (wall ≈ CPU for a 1-thread
        # drafter), drafting offline, and the rest of the process's CPU time.
        cpu_s = (reading.cpu_seconds if reading.cpu_seconds is not None else cpu_used) + activity.emulated_compute_s
        drafting = activity.draft_s
        compute_s = max(cpu_s, drafting)
        if compute_s > 0:
            phases["fallback"] = compute_j * min(activity.fallback_s, drafting) / compute_s
            phases["draft"] = compute_j * (drafting - min(activity.fallback_s, drafting)) / compute_s
        phases["overhead"] = compute_j - phases["draft"] - phases["fallback"]
        if radio:
            phases.update(radio_up=radio.up, radio_down=radio.down, waiting=radio.tail)
        return total, phases, radio

    def _sample(self, fn: Callable[[], Activity | None]) -> Sample:
        base = self.baseline()
        c = self.cloud.start() if self.cloud else None
        e = self.edge.start()
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            activity = fn()
        except BaseException:
            for meter, token in ((self.edge, e), (self.cloud, c)):   # stop samplers; the error wins
                if meter is not None:
                    try:
                        meter.stop(token)
                    except MeterError:
                        pass
            raise
        seconds, cpu_used = time.perf_counter() - t0, time.process_time() - cpu0
        edge = self.edge.stop(e)
        cloud = self._stop_lenient(self.cloud, c, t0) if self.cloud else None
        net = edge.joules - base.edge_w * edge.seconds
        total, phases, radio = self._split(edge, activity, net, cpu_used)
        cloud_net = cloud.joules - (base.cloud_w or 0.0) * cloud.seconds if cloud else None
        return Sample(seconds, edge, cloud, activity, total, phases, cloud_net, radio)

    def _method(self, reading: Reading, activity: Activity | None) -> str:
        label = reading.method
        if activity is not None and activity.emulated_compute_s:
            label += f" + emulated compute at {self.edge_model.active_w:g} W ({self.edge_model.name} model)"
        if self.radio and activity is not None and activity.transfers and not reading.includes_radio:
            label += f" + modelled radio ({self.radio.name}, {self.radio.source})"
        return label

    def measure(self, fn: Callable[[], Activity | None], label: str = "") -> Measurement:
        """`fn` is called warmup + repetitions times; it returns an ``Activity`` (or None if it cannot say)."""
        for _ in range(self.warmup):
            fn()
        base = self.baseline()
        reps = range(self.repetitions)
        if self.progress:
            from tqdm import tqdm

            reps = tqdm(reps, desc=label or "energy", unit="rep", leave=False)
        samples = [self._sample(fn) for _ in reps]
        first = samples[0]
        return Measurement(label, samples, base, self._method(first.edge, first.activity),
                           first.cloud.method if first.cloud else None)

    def measure_command(self, argv: Sequence[str], label: str = "", timeout: float | None = None) -> Measurement:
        """Runs `argv` per repetition. Use an edge meter that sees the child: a hardware counter, or
        ``ModelledMeter(cpu=CpuClock(children=True))``. A failing command raises ``MeterError``."""
        def run() -> None:
            try:
                proc = subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                raise MeterError(f"{' '.join(argv)} ran past its timeout of {timeout} s") from None
            if proc.returncode != 0:
                raise MeterError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr[-500:]}")
            return None

        return self.measure(run, label or " ".join(argv))
