"""Energy meters: hardware counters where the machine has them, a labelled model where it does not.

Every meter has the same two-call contract::

    token = meter.start()
    ...                      # the work being measured
    reading = meter.stop(token)

and every ``Reading`` says how it was obtained (``method``) and what it covers (``source``). A meter
never returns a silent zero: a counter that did not move over a measurable interval raises
``MeterError`` ("below resolution"), and a counter that cannot be read raises ``MeterUnavailable``
with the reason (permissions, on AC power, no such device).

Meters:

- ``RaplMeter``      Linux powercap (``/sys/class/powercap/intel-rapl*``): package and DRAM counters,
                     wraparound handled, polled in the background so long runs cannot wrap twice.
- ``BatteryMeter``   Linux ``/sys/class/power_supply``: the energy counter (µWh), else the charge
                     counter (µAh) × voltage, else sampled power or current × voltage (Android-style).
- ``NvmlMeter``      an NVIDIA GPU through NVML (``pynvml``): the total-energy counter where the GPU has
                     one (Volta and later), else sampled power × time.
- ``ModelledMeter``  no counter at all: process CPU time × active power per core + idle power × wall
                     time, from a named ``CpuPowerModel``. Its readings are labelled ``modelled``.
- ``Apportioned``    a whole-machine counter (RAPL) shared out to one process by its share of the
                     machine's CPU time, for when edge and cloud run on the same machine.

``detect_meter`` picks the best meter available for a side (edge or cloud) and says why it skipped the
others; a user can force one by name.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

POWERCAP_ROOT = Path("/sys/class/powercap")
POWER_SUPPLY_ROOT = Path("/sys/class/power_supply")


class MeterError(Exception):
    """A measurement could not be made (counter did not move, bad values, device lost)."""


class MeterUnavailable(MeterError):
    """This meter cannot run on this machine; the message says why (and how to fix it if one can)."""


@dataclass(frozen=True)
class Reading:
    joules: float
    seconds: float                       # wall time covered
    method: str                          # how: "rapl", "battery:energy", "nvml:counter", "modelled", ...
    source: str                          # what: "intel-rapl:0 package-0 + dram", "pid 1234 on laptop model"
    components: dict[str, float] = field(default_factory=dict)   # joules per domain or model term
    includes_radio: bool = False         # True when the radio's energy is inside `joules` (a battery)
    cpu_seconds: float | None = None     # CPU time the measured process(es) used, when known

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")


class Meter(Protocol):
    name: str

    def start(self) -> object: ...

    def stop(self, token: object) -> Reading: ...


# -- CPU time of processes ------------------------------------------------------------------
class CpuClock:
    """CPU seconds (user + system, all threads) used so far by one process, or by its waited-for
    children (``children=True``: what ``resource.getrusage(RUSAGE_CHILDREN)`` counts)."""

    def __init__(self, pid: int | None = None, children: bool = False):
        self.pid = pid or os.getpid()
        self.children = children

    def __call__(self) -> float:
        if self.children:
            import resource

            r = resource.getrusage(resource.RUSAGE_CHILDREN)
            return r.ru_utime + r.ru_stime
        import psutil

        try:
            t = psutil.Process(self.pid).cpu_times()
        except psutil.Error as exc:
            raise MeterError(f"cannot read the CPU time of pid {self.pid}: {exc}") from None
        return t.user + t.system

    def describe(self) -> str:
        return "waited-for child processes" if self.children else f"pid {self.pid}"


def machine_cpu_seconds() -> float:
    """CPU seconds used by every process on the machine (all cores, busy time only)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


# -- a background sampler (counters that wrap, power that must be integrated) ---------------------
class _Sampler:
    """Calls `sample()` every `interval` seconds on a daemon thread until stopped."""

    def __init__(self, sample: Callable[[], None], interval: float):
        self._sample, self._interval = sample, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="energy-sampler")
        self.error: Exception | None = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sample()
            except Exception as exc:    # noqa: BLE001 - reported by stop()
                self.error = exc
                return

    def start(self) -> "_Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise MeterError(f"sampling failed: {self.error}") from self.error


class _PowerIntegral:
    """Energy from a power reading sampled every `interval` seconds (trapezoid rule), for meters
    that expose watts but no energy counter (battery current × voltage, NVML without a counter)."""

    def __init__(self, watts: Callable[[], float], interval: float):
        self._watts = watts
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last = (time.perf_counter(), watts())
        self._first = self._last[0]
        self._sampler = _Sampler(self._step, interval).start()

    def _step(self) -> None:
        with self._lock:
            now, w = time.perf_counter(), self._watts()
            t0, w0 = self._last
            self._joules += (w0 + w) / 2 * (now - t0)
            self._last = (now, w)

    def stop(self) -> tuple[float, float]:
        """(joules, seconds): the energy and the window it was integrated over, first sample to last --
        the reading's own seconds, so that joules / seconds is the mean power sampled even when the caller
        is late (a pause between taking its own time and stopping the sampler is outside both)."""
        self._sampler.stop()
        self._step()
        return self._joules, self._last[0] - self._first


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError:
        raise
    except (OSError, ValueError) as exc:
        raise MeterError(f"cannot read {path}: {exc}") from None


def _below_resolution(name: str, seconds: float) -> MeterError:
    return MeterError(f"{name}: the counter did not move in {seconds:.3f} s (below its resolution); "
                      f"measure a longer run")


# -- RAPL ------------------------------------------------------------------------------------------
@dataclass
class _RaplZone:
    path: Path
    label: str
    max_uj: int


class RaplMeter:
    """Package (+ DRAM) energy from the Linux powercap interface.

    The package counter does not include DRAM, and the core/uncore sub-zones are inside the package:
    so the total is packages + DRAM zones. A ``psys`` zone (the whole platform, on recent Intel laptops)
    contains both and is left out rather than counted twice. A counter
    that went down has wrapped at ``max_energy_range_uj``; the background poll (every `poll_s`) makes
    sure no more than one wrap happens between two reads.
    """

    name = "rapl"

    def __init__(self, root: Path | str = POWERCAP_ROOT, poll_s: float = 5.0):
        self.root = Path(root)
        self.poll_s = poll_s
        self.zones = self._discover()

    def _discover(self) -> list[_RaplZone]:
        if not self.root.is_dir():
            raise MeterUnavailable(f"no powercap interface at {self.root} (not Linux, or no RAPL driver)")
        zones = []
        for top in sorted(self.root.glob("intel-rapl:*")):
            if top.name.count(":") != 1 or not (top / "energy_uj").exists():
                continue
            if (top / "name").exists() and (top / "name").read_text().strip() == "psys":
                continue      # the whole platform: it already contains the packages and DRAM
            zones.append(self._zone(top))
            for sub in sorted(top.glob(f"{top.name}:*")):
                if (sub / "name").exists() and (sub / "name").read_text().strip().startswith("dram"):
                    zones.append(self._zone(sub))
        if not zones:
            raise MeterUnavailable(f"no RAPL zones under {self.root}")
        for z in zones:                     # fail now, with the reason, rather than mid-measurement
            try:
                _read_int(z.path / "energy_uj")
            except PermissionError:
                raise MeterUnavailable(
                    f"{z.path / 'energy_uj'} is not readable: since Linux 5.10 (CVE-2020-8694) RAPL counters are "
                    f"root-only; run as root or grant read access (sudo chmod a+r {self.root}/intel-rapl:*/energy_uj "
                    f"{self.root}/intel-rapl:*/*/energy_uj)") from None
        return zones

    def _zone(self, path: Path) -> _RaplZone:
        name = (path / "name").read_text().strip() if (path / "name").exists() else path.name
        max_uj = _read_int(path / "max_energy_range_uj") if (path / "max_energy_range_uj").exists() else 2 ** 32
        return _RaplZone(path, f"{path.name} {name}", max_uj)

    def _read(self) -> list[int]:
        return [_read_int(z.path / "energy_uj") for z in self.zones]

    def start(self) -> dict:
        state = {"t": time.perf_counter(), "last": self._read(), "total": [0] * len(self.zones),
                 "lock": threading.Lock()}

        def poll():
            with state["lock"]:
                self._advance(state, self._read())

        state["sampler"] = _Sampler(poll, self.poll_s).start()
        return state

    def _advance(self, state: dict, now: list[int]) -> None:
        for i, (z, before, after) in enumerate(zip(self.zones, state["last"], now)):
            state["total"][i] += after - before if after >= before else after + z.max_uj - before
        state["last"] = now

    def stop(self, state: dict) -> Reading:
        state["sampler"].stop()
        with state["lock"]:
            self._advance(state, self._read())
        seconds = time.perf_counter() - state["t"]
        components = {z.label: uj / 1e6 for z, uj in zip(self.zones, state["total"])}
        joules = sum(components.values())
        if joules <= 0:
            raise _below_resolution("rapl", seconds)
        return Reading(joules, seconds, "rapl", " + ".join(z.label for z in self.zones) + " (whole machine)",
                       components)


# -- battery ---------------------------------------------------------------------------------------
class BatteryMeter:
    """Discharge energy of a battery from ``/sys/class/power_supply/<BAT>``.

    In order of preference: ``energy_now`` (µWh, a counter), ``charge_now`` (µAh) × ``voltage_now``,
    then sampled ``power_now`` (µW) or ``current_now`` (µA) × ``voltage_now`` (µV), integrated every
    `poll_s` (Android kernels expose only these). Only valid while discharging: on AC power the battery
    counters measure charging, not consumption. Battery gauges update every few seconds, so short runs
    raise "below resolution" rather than report zero. The reading covers the whole device, radio included.
    """

    name = "battery"

    def __init__(self, root: Path | str = POWER_SUPPLY_ROOT, poll_s: float = 0.5):
        self.root = Path(root)
        self.poll_s = poll_s
        self.path = self._find()
        self.kind = self._kind()

    def _find(self) -> Path:
        if not self.root.is_dir():
            raise MeterUnavailable(f"no power_supply class at {self.root}")
        for dev in sorted(self.root.iterdir()):
            t = dev / "type"
            if t.exists() and t.read_text().strip() == "Battery":
                return dev
        raise MeterUnavailable(f"no battery under {self.root}")

    def _kind(self) -> str:
        have = lambda f: (self.path / f).exists()   # noqa: E731
        if have("energy_now"):
            return "energy"
        if have("charge_now") and have("voltage_now"):
            return "charge"
        if have("power_now"):
            return "power"
        if have("current_now") and have("voltage_now"):
            return "current"
        raise MeterUnavailable(f"battery {self.path.name} exposes no energy, charge, power or current reading")

    def _status(self) -> str:
        s = self.path / "status"
        return s.read_text().strip() if s.exists() else "Unknown"

    def _check_discharging(self) -> None:
        status = self._status()
        if status != "Discharging":
            raise MeterUnavailable(f"battery {self.path.name} is {status!r}, not discharging: on AC power its "
                                   f"counters do not measure consumption (unplug, or use another meter)")

    def probe(self) -> "BatteryMeter":
        """Self, if it can measure now (discharging); else ``MeterUnavailable``."""
        self._check_discharging()
        return self

    def _watts(self) -> float:
        if self.kind == "power":
            return abs(_read_int(self.path / "power_now")) / 1e6
        return abs(_read_int(self.path / "current_now")) * _read_int(self.path / "voltage_now") / 1e12

    def start(self) -> dict:
        self._check_discharging()
        state = {"t": time.perf_counter()}
        if self.kind == "energy":
            state["e"] = _read_int(self.path / "energy_now")
        elif self.kind == "charge":
            state["q"] = _read_int(self.path / "charge_now")
            state["v"] = [_read_int(self.path / "voltage_now")]
        else:
            state["power"] = _PowerIntegral(self._watts, self.poll_s)
        return state

    def stop(self, state: dict) -> Reading:
        seconds = time.perf_counter() - state["t"]
        if self.kind == "energy":
            joules = (state["e"] - _read_int(self.path / "energy_now")) * 3.6e-3   # µWh -> J
            method = "battery:energy_now"
        elif self.kind == "charge":
            volts = (state["v"][0] + _read_int(self.path / "voltage_now")) / 2e6
            joules = (state["q"] - _read_int(self.path / "charge_now")) * 3.6e-3 * volts   # µAh × V -> J
            method = "battery:charge_now×voltage"
        else:
            joules, seconds = state["power"].stop()
            method = f"battery:{self.kind}_now sampled every {self.poll_s:g}s"
        if joules < 0:
            raise MeterError(f"battery {self.path.name} gained charge during the measurement (plugged in?)")
        if joules == 0:
            raise _below_resolution(f"battery {self.path.name}", seconds)
        return Reading(joules, seconds, method, f"battery {self.path.name} (whole device)", {"battery": joules},
                       includes_radio=True)


# -- NVML ------------------------------------------------------------------------------------------
class NvmlMeter:
    """GPU energy through NVML: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ, a counter, Volta and
    later) where supported, else ``nvmlDeviceGetPowerUsage`` (mW) sampled every `poll_s` × time.

    `nvml` is the ``pynvml`` module (``pip install nvidia-ml-py``); tests pass a fake one.
    """

    name = "nvml"

    def __init__(self, index: int = 0, poll_s: float = 0.1, nvml=None):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise MeterUnavailable("NVML needs the pynvml module: pip install nvidia-ml-py") from None
        self.nvml, self.index, self.poll_s = nvml, index, poll_s
        try:
            nvml.nvmlInit()
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(self.handle)
        except Exception as exc:    # noqa: BLE001 - NVMLError and friends: no driver, no GPU
            raise MeterUnavailable(f"NVML has no GPU {index}: {exc}") from None
        self.gpu = name.decode() if isinstance(name, bytes) else str(name)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except Exception:   # noqa: BLE001 - NVML_ERROR_NOT_SUPPORTED on older GPUs
            self.counter = False

    def _watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3

    def start(self) -> dict:
        state = {"t": time.perf_counter()}
        if self.counter:
            state["mj"] = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        else:
            state["power"] = _PowerIntegral(self._watts, self.poll_s)
        return state

    def stop(self, state: dict) -> Reading:
        seconds = time.perf_counter() - state["t"]
        if self.counter:
            joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - state["mj"]) / 1e3
            method = "nvml:energy counter"
        else:
            joules, seconds = state["power"].stop()
            method = f"nvml:power sampled every {self.poll_s:g}s × time"
        if joules <= 0:
            raise _below_resolution(f"nvml GPU {self.index}", seconds)
        return Reading(joules, seconds, method, f"GPU {self.index} {self.gpu} (whole GPU)", {"gpu": joules})


# -- the model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuPowerModel:
    """Power of a device's CPU: `active_w` per busy core on top of `idle_w` for the powered-on device.

    These are assumptions, not measurements of this machine; docs/energy.md gives where each comes from.
    """

    name: str
    active_w: float        # W per core while busy
    idle_w: float          # W for the whole device while idle (screen off, SoC awake)
    source: str


CPU_MODELS: dict[str, CpuPowerModel] = {m.name: m for m in (
    CpuPowerModel("laptop", 7.0, 2.0, "Intel Core i7-1165G7 class: 28 W TDP over 4 cores; ~2 W idle package+board"),
    CpuPowerModel("phone", 1.5, 0.3, "2.5 GHz big Arm core ~1.5 W at full clock; screen-off awake SoC ~0.3 W"),
    CpuPowerModel("iot", 0.58, 1.4, "Raspberry Pi 3 B (1.2 GHz): 1.4 W idle, 3.7 W with 4 cores busy "
                                    "(pidramble.com power benchmarks)"),
    CpuPowerModel("server", 6.75, 0.0, "Xeon Platinum 8380 class: 270 W TDP over 40 cores; a shared server's "
                                       "idle power is not charged to one session"),
)}


class ModelledMeter:
    """Energy = CPU seconds of the measured process × `active_w` + `idle_w` × wall time.

    Used where the machine has no energy counter. `cpu` says whose CPU time counts (this process by
    default; a verifier's pid; waited-for children for a CLI command). Readings are labelled
    ``modelled`` with the model's name; ``extra_cpu_seconds`` lets the harness charge compute that was
    emulated by sleeping (the paper regime's slow-device drafting).
    """

    name = "modelled"

    def __init__(self, model: CpuPowerModel | str = "laptop", cpu: CpuClock | None = None):
        self.model = CPU_MODELS[model] if isinstance(model, str) else model
        self.cpu = cpu or CpuClock()

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), self.cpu()

    def stop(self, token: tuple[float, float]) -> Reading:
        t0, c0 = token
        seconds, cpu = time.perf_counter() - t0, self.cpu() - c0
        active, idle = cpu * self.model.active_w, seconds * self.model.idle_w
        joules = active + idle
        if joules <= 0:
            raise _below_resolution(f"modelled meter ({self.cpu.describe()})", seconds)
        return Reading(joules, seconds, f"modelled:{self.model.name}",
                       f"{self.cpu.describe()}: CPU time × {self.model.active_w:g} W/core + "
                       f"{self.model.idle_w:g} W idle", {"cpu_active": active, "idle": idle}, cpu_seconds=cpu)


class Apportioned:
    """A whole-machine meter shared out to one process by its share of the machine's CPU time.

    Needed when edge and cloud run on the same machine and the only counter (RAPL, or a battery)
    covers both. The process is charged its CPU share of everything the meter saw, static power
    included (the attribution tools such as Scaphandre use). The label says so; the share comes
    from ``psutil`` CPU times (process vs all processes).
    """

    def __init__(self, inner: Meter, cpu: CpuClock, machine: Callable[[], float] = machine_cpu_seconds):
        self.inner, self.cpu, self.machine = inner, cpu, machine
        self.name = f"{inner.name}-apportioned"

    def start(self) -> tuple:
        return self.inner.start(), self.cpu(), self.machine()

    def stop(self, token: tuple) -> Reading:
        inner_token, c0, m0 = token
        r = self.inner.stop(inner_token)
        cpu, machine = self.cpu() - c0, self.machine() - m0
        share = min(1.0, cpu / machine) if machine > 0 else 0.0
        if share <= 0:
            raise _below_resolution(f"{self.cpu.describe()} (no measurable CPU time to apportion by)", r.seconds)
        return Reading(r.joules * share, r.seconds, f"{r.method} apportioned by CPU time ({share:.1%})",
                       f"{self.cpu.describe()} share of {r.source}",
                       {k: v * share for k, v in r.components.items()}, r.includes_radio, cpu)


# -- detection ---------------------------------------------------------------------------------------
METERS = ("auto", "rapl", "battery", "nvml", "modelled")


def detect_meter(side: str = "edge", force: str = "auto", *, cpu: CpuClock | None = None,
                 model: CpuPowerModel | str | None = None, powercap_root: Path | str = POWERCAP_ROOT,
                 power_supply_root: Path | str = POWER_SUPPLY_ROOT, nvml=None,
                 shared_machine: bool = False) -> tuple[Meter, list[str]]:
    """The best meter for `side` ("edge" or "cloud"), and why each better one was skipped.

    Edge: battery (whole device, radio included) > RAPL > modelled. Cloud: NVML > RAPL > modelled.
    `force` names one meter; if it cannot run, ``MeterUnavailable`` says why (no silent fallback).
    `shared_machine`: edge and cloud share this machine, so a whole-machine reading (RAPL, battery)
    is apportioned by CPU time.
    """
    if side not in ("edge", "cloud"):
        raise ValueError(f"side must be 'edge' or 'cloud', not {side!r}")
    if force not in METERS:
        raise ValueError(f"unknown meter {force!r}; choose from {', '.join(METERS)}")
    cpu = cpu or CpuClock()
    model = model or ("laptop" if side == "edge" else "server")
    builders: dict[str, Callable[[], Meter]] = {
        "battery": lambda: (Apportioned(BatteryMeter(power_supply_root).probe(), cpu) if shared_machine
                            else BatteryMeter(power_supply_root).probe()),
        "rapl": lambda: (Apportioned(RaplMeter(powercap_root), cpu) if shared_machine else RaplMeter(powercap_root)),
        "nvml": lambda: NvmlMeter(nvml=nvml),
        "modelled": lambda: ModelledMeter(model, cpu),
    }
    if force != "auto":
        return builders[force](), []
    order = ("battery", "rapl", "modelled") if side == "edge" else ("nvml", "rapl", "modelled")
    skipped = []
    for name in order:
        try:
            return builders[name](), skipped
        except MeterUnavailable as exc:
            skipped.append(f"{name}: {exc}")
    raise AssertionError("unreachable: the modelled meter is always available")
