"""Energy meters against fake sysfs trees and a fake NVML module; the model and detection for real."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from energy import (Apportioned, BatteryMeter, CpuClock, MeterError, MeterUnavailable, ModelledMeter, NvmlMeter,
                    RaplMeter, Reading, detect_meter)
from energy import meters as meters_mod


def _write(path: Path, value) -> None:
    """Atomically, as sysfs reads are: a background sampler never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def _rapl_tree(root: Path, pkg_uj=1_000_000, dram_uj=50_000, max_uj=2_000_000) -> Path:
    for zone, name, uj in (("intel-rapl:0", "package-0", pkg_uj), ("intel-rapl:0/intel-rapl:0:0", "core", 700_000),
                           ("intel-rapl:0/intel-rapl:0:1", "dram", dram_uj)):
        _write(root / zone / "name", name)
        _write(root / zone / "energy_uj", uj)
        _write(root / zone / "max_energy_range_uj", max_uj)
    return root


def test_rapl_sums_package_and_dram_not_core(tmp_path):
    root = _rapl_tree(tmp_path)
    meter = RaplMeter(root, poll_s=60)
    assert [z.label for z in meter.zones] == ["intel-rapl:0 package-0", "intel-rapl:0:1 dram"]
    token = meter.start()
    _write(root / "intel-rapl:0/energy_uj", 500_000)      # wrapped at 2 J: +1.5 J
    _write(root / "intel-rapl:0/intel-rapl:0:1/energy_uj", 250_000)    # +0.2 J
    _write(root / "intel-rapl:0/intel-rapl:0:0/energy_uj", 9_999_999)  # core is inside the package: ignored
    r = meter.stop(token)
    assert r.joules == pytest.approx(1.7)
    assert r.components == pytest.approx({"intel-rapl:0 package-0": 1.5, "intel-rapl:0:1 dram": 0.2})
    assert r.method == "rapl" and "whole machine" in r.source


def test_rapl_background_poll_counts_every_wrap(tmp_path):
    root = _rapl_tree(tmp_path, pkg_uj=0, dram_uj=0, max_uj=1_000_000)
    meter = RaplMeter(root, poll_s=0.02)
    token = meter.start()
    value = 0
    for _ in range(5):                      # 5 × 0.8 J: the counter wraps several times
        value = (value + 800_000) % 1_000_000
        _write(root / "intel-rapl:0/energy_uj", value)
        time.sleep(0.1)
    assert meter.stop(token).joules == pytest.approx(4.0)


def test_rapl_still_counter_is_an_error_not_zero(tmp_path):
    meter = RaplMeter(_rapl_tree(tmp_path), poll_s=60)
    with pytest.raises(MeterError, match="below its resolution"):
        meter.stop(meter.start())


def test_rapl_unreadable_counter_says_why(tmp_path, monkeypatch):
    root = _rapl_tree(tmp_path)
    real = meters_mod._read_int

    def denied(path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(meters_mod, "_read_int", denied)
    with pytest.raises(MeterUnavailable, match="CVE-2020-8694.*root-only"):
        RaplMeter(root)


def test_rapl_missing_interface(tmp_path):
    with pytest.raises(MeterUnavailable, match="no powercap"):
        RaplMeter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeterUnavailable, match="no RAPL zones"):
        RaplMeter(tmp_path / "empty")


def _battery(root: Path, status="Discharging", **files) -> Path:
    bat = root / "BAT0"
    _write(bat / "type", "Battery")
    _write(bat / "status", status)
    _write(root / "AC" / "type", "Mains")
    for k, v in files.items():
        _write(bat / k, v)
    return bat


def test_battery_energy_counter(tmp_path):
    bat = _battery(tmp_path, energy_now=50_000_000)                  # µWh
    meter = BatteryMeter(tmp_path)
    token = meter.start()
    _write(bat / "energy_now", 50_000_000 - 1_000)                   # 1000 µWh = 3.6 J
    r = meter.stop(token)
    assert r.joules == pytest.approx(3.6) and r.method == "battery:energy_now" and r.includes_radio


def test_battery_charge_times_voltage(tmp_path):
    bat = _battery(tmp_path, charge_now=3_000_000, voltage_now=4_000_000)   # µAh, µV
    meter = BatteryMeter(tmp_path)
    token = meter.start()
    _write(bat / "charge_now", 3_000_000 - 500)                              # 500 µAh at 4 V = 7.2 J
    _write(bat / "voltage_now", 4_000_000)
    assert meter.stop(token).joules == pytest.approx(7.2)


def test_battery_android_style_current_times_voltage_is_integrated(tmp_path):
    _battery(tmp_path, current_now=-500_000, voltage_now=4_000_000)         # 0.5 A (sign varies) × 4 V = 2 W
    meter = BatteryMeter(tmp_path, poll_s=0.02)
    assert meter.kind == "current"
    token = meter.start()
    time.sleep(0.3)
    r = meter.stop(token)
    assert r.joules == pytest.approx(2.0 * r.seconds, rel=0.05) and 0.3 <= r.seconds < 1.3   # the window sampled
    assert "sampled" in r.method


def test_battery_refuses_when_not_discharging_or_charging_up(tmp_path):
    bat = _battery(tmp_path, status="Charging", energy_now=1000)
    with pytest.raises(MeterUnavailable, match="not discharging"):
        BatteryMeter(tmp_path).start()
    _write(bat / "status", "Discharging")
    meter = BatteryMeter(tmp_path)
    token = meter.start()
    _write(bat / "energy_now", 2000)
    with pytest.raises(MeterError, match="gained charge"):
        meter.stop(token)


def test_battery_absent(tmp_path):
    _write(tmp_path / "AC" / "type", "Mains")
    with pytest.raises(MeterUnavailable, match="no battery"):
        BatteryMeter(tmp_path)


class FakeNvml:
    """The subset of pynvml the meter uses: an energy counter in mJ, power in mW."""

    class NVMLError(Exception):
        pass

    def __init__(self, counter=True, power_mw=150_000, fail_init=False):
        self.counter, self.power_mw, self.fail_init, self.mj = counter, power_mw, fail_init, 10_000

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise self.NVMLError("Not Supported")
        return self.mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw


def test_nvml_energy_counter():
    nvml = FakeNvml()
    meter = NvmlMeter(nvml=nvml)
    token = meter.start()
    nvml.mj += 2_500
    r = meter.stop(token)
    assert r.joules == pytest.approx(2.5) and r.method == "nvml:energy counter" and "H100" in r.source


def test_nvml_power_sampling_when_no_counter():
    meter = NvmlMeter(nvml=FakeNvml(counter=False, power_mw=100_000), poll_s=0.02)
    token = meter.start()
    time.sleep(0.2)
    r = meter.stop(token)
    assert r.joules == pytest.approx(100.0 * r.seconds, rel=0.05) and 0.2 <= r.seconds < 1.2
    assert "power sampled" in r.method


def test_nvml_without_driver_or_module():
    with pytest.raises(MeterUnavailable, match="Driver Not Loaded"):
        NvmlMeter(nvml=FakeNvml(fail_init=True))


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_modelled_meter_is_cpu_time_times_power_plus_idle():
    meter = ModelledMeter("laptop")
    token = meter.start()
    _burn(0.2)
    r = meter.stop(token)
    assert r.cpu_seconds == pytest.approx(0.2, abs=0.05)
    assert r.components["cpu_active"] == pytest.approx(r.cpu_seconds * 7.0)
    assert r.components["idle"] == pytest.approx(r.seconds * 2.0)
    assert r.joules == pytest.approx(sum(r.components.values()))
    assert r.method == "modelled:laptop"


def test_modelled_meter_of_another_process():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()+0.3\n"
                             "while time.process_time()<t: pass\ntime.sleep(5)"])
    try:
        meter = ModelledMeter("server", CpuClock(proc.pid))
        token = meter.start()
        time.sleep(0.6)
        r = meter.stop(token)
        assert r.cpu_seconds > 0.1 and r.components["idle"] == 0.0 and f"pid {proc.pid}" in r.source
    finally:
        proc.kill()
        proc.wait()


class FixedMeter:
    name = "fake"

    def __init__(self, joules):
        self.joules = joules

    def start(self):
        return None

    def stop(self, token):
        return Reading(self.joules, 1.0, "fake", "whole machine", {"pkg": self.joules})


def test_apportioned_shares_by_cpu_time():
    clocks = iter([1.0, 4.0])          # the process used 3 CPU-s ...
    machine = iter([10.0, 22.0])       # ... of the machine's 12
    meter = Apportioned(FixedMeter(24.0), cpu=lambda: next(clocks), machine=lambda: next(machine))
    meter.cpu.describe = lambda: "pid 1"
    r = meter.stop(meter.start())
    assert r.joules == pytest.approx(6.0) and "apportioned by CPU time (25.0%)" in r.method


def test_detection_prefers_counters_and_says_why(tmp_path):
    none = tmp_path / "none"
    meter, skipped = detect_meter("edge", powercap_root=none, power_supply_root=none)
    assert meter.name == "modelled" and len(skipped) == 2
    _rapl_tree(tmp_path / "powercap")
    meter, _ = detect_meter("edge", powercap_root=tmp_path / "powercap", power_supply_root=none)
    assert isinstance(meter, RaplMeter)
    meter, _ = detect_meter("edge", powercap_root=tmp_path / "powercap", power_supply_root=none, shared_machine=True)
    assert isinstance(meter, Apportioned)
    _battery(tmp_path / "ps", energy_now=100)
    meter, _ = detect_meter("edge", powercap_root=tmp_path / "powercap", power_supply_root=tmp_path / "ps")
    assert isinstance(meter, BatteryMeter)
    meter, skipped = detect_meter("cloud", powercap_root=none, nvml=FakeNvml())
    assert isinstance(meter, NvmlMeter) and not skipped
    meter, skipped = detect_meter("cloud", powercap_root=none, nvml=FakeNvml(fail_init=True))
    assert meter.name == "modelled" and skipped[0].startswith("nvml: ")


def test_forcing_an_unavailable_meter_fails_loudly(tmp_path):
    with pytest.raises(MeterUnavailable):
        detect_meter("edge", "rapl", powercap_root=tmp_path / "none")
    with pytest.raises(ValueError, match="unknown meter"):
        detect_meter("edge", "joulescope")


def test_rapl_leaves_out_psys_which_contains_everything(tmp_path):
    root = _rapl_tree(tmp_path)
    for f, v in (("name", "psys"), ("energy_uj", 5), ("max_energy_range_uj", 2_000_000)):
        _write(root / "intel-rapl:1" / f, v)
    assert all("psys" not in z.label for z in RaplMeter(root).zones)


def test_apportioned_idle_process_is_below_resolution_not_an_abort():
    clocks, machine = iter([1.0, 1.0]), iter([10.0, 12.0])
    meter = Apportioned(FixedMeter(5.0), cpu=lambda: next(clocks), machine=lambda: next(machine))
    meter.cpu.describe = lambda: "pid 1"
    with pytest.raises(MeterError, match="below its resolution"):
        meter.stop(meter.start())


def test_battery_on_a_shared_machine_is_apportioned(tmp_path):
    _battery(tmp_path / "ps", energy_now=100)
    meter, _ = detect_meter("edge", powercap_root=tmp_path / "none", power_supply_root=tmp_path / "ps",
                            shared_machine=True)
    assert isinstance(meter, Apportioned) and isinstance(meter.inner, BatteryMeter)
