"""The radio model by hand, the harness's arithmetic with a scripted meter, and the two CLIs for real."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from energy import (RADIOS, Activity, CpuClock, Harness, MeterError, ModelledMeter, Reading, Transfer, mean_ci,
                    radio_energy)

WIFI = RADIOS["wifi"]


def test_one_upload_costs_throughput_base_tail_and_promotion():
    e = radio_energy([Transfer(0.0, 0.4, "up", 1_000_000)], "wifi")      # 8 Mb in 0.4 s
    assert e.up == pytest.approx(WIFI.alpha_up * 8 + WIFI.beta * 0.4)
    assert e.down == 0.0
    assert e.tail == pytest.approx(WIFI.tail_s * WIFI.tail_w + WIFI.promotion_s * WIFI.promotion_w)
    assert e.promotions == 1 and e.active_s == pytest.approx(0.4)


def test_gaps_are_tail_until_the_radio_sleeps_then_a_new_promotion():
    short = radio_energy([Transfer(0, 0.1, "up", 100), Transfer(0.2, 0.3, "down", 100)], "lte")
    lte = RADIOS["lte"]
    assert short.promotions == 1
    assert short.tail == pytest.approx(0.1 * lte.tail_w + lte.tail_s * lte.tail_w + lte.promotion_s * lte.promotion_w)
    long = radio_energy([Transfer(0, 0.1, "up", 100), Transfer(30.0, 30.1, "up", 100)], "lte")
    assert long.promotions == 2
    assert long.tail == pytest.approx(2 * lte.tail_s * lte.tail_w + 2 * lte.promotion_s * lte.promotion_w)


def test_overlapping_directions_pay_the_base_power_once():
    e = radio_energy([Transfer(0, 1.0, "up", 0), Transfer(0.5, 1.5, "down", 0)], "wifi")
    assert e.up == pytest.approx(WIFI.beta * 1.0)
    assert e.down == pytest.approx(WIFI.beta * 0.5)          # only the half-second not already sending
    assert e.active_s == pytest.approx(1.5)


def test_radio_rejects_nonsense_and_nothing_costs_nothing():
    with pytest.raises(ValueError):
        radio_energy([Transfer(1.0, 0.5, "up", 10)])
    with pytest.raises(ValueError):
        radio_energy([Transfer(0, 1, "sideways", 10)])
    assert radio_energy([]).total == 0.0


def test_mean_ci_matches_student_t():
    s = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.mean == 3.0 and s.n == 5
    assert s.ci95 == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)
    assert math.isinf(mean_ci([1.0]).ci95)


class ScriptedMeter:
    """Idle 1 W; a measured call reads 10 J over 2 s, 1 CPU-s (so net 8 J)."""

    name = "scripted"

    def __init__(self, includes_radio=False):
        self.includes_radio = includes_radio
        self.calls = 0

    def start(self):
        return time.perf_counter()

    def stop(self, t0):
        self.calls += 1
        if self.calls == 1:                                  # the idle baseline
            return Reading(2.0, 2.0, "scripted", "test")
        return Reading(10.0, 2.0, "scripted", "test", includes_radio=self.includes_radio, cpu_seconds=1.0)


def test_harness_subtracts_idle_adds_emulated_compute_and_radio_and_splits_phases():
    activity = Activity(output_tokens=10, draft_s=1.5, fallback_s=0.5, wait_s=0.3, emulated_compute_s=1.0,
                        transfers=[Transfer(0, 0.4, "up", 1_000_000)])
    h = Harness(ScriptedMeter(), edge_model="phone", radio="wifi", repetitions=5, warmup=2, idle_s=0.01)
    m = h.measure(lambda: activity, label="t")
    assert h.baseline().edge_w == pytest.approx(1.0)
    radio = radio_energy(activity.transfers, "wifi")
    compute = 10.0 - 1.0 * 2.0 + 1.0 * 1.5                   # net + emulated second at the phone's 1.5 W
    s = m.samples[0]
    assert s.edge_net_j == pytest.approx(compute + radio.total)
    # Compute energy shared by seconds: 2 s of compute (1 CPU-s + 1 emulated), 1.5 drafting of which 0.5 offline.
    assert s.edge_phases_j["draft"] == pytest.approx(compute * 1.0 / 2.0)
    assert s.edge_phases_j["fallback"] == pytest.approx(compute * 0.5 / 2.0)
    assert s.edge_phases_j["overhead"] == pytest.approx(compute * 0.5 / 2.0)
    assert s.edge_phases_j["radio_up"] == pytest.approx(radio.up)
    assert s.edge_phases_j["waiting"] == pytest.approx(radio.tail)
    assert sum(s.edge_phases_j.values()) == pytest.approx(s.edge_net_j)
    assert len(m.samples) == 5 and m.edge_per_token.mean == pytest.approx(s.edge_net_j / 10)
    assert m.edge_per_token.ci95 == pytest.approx(0.0, abs=1e-12)
    assert m.edge_gross_per_token.mean == pytest.approx((s.edge_net_j + 2.0) / 10)
    assert "emulated compute at 1.5 W (phone model)" in m.edge_method and "modelled radio (wifi" in m.edge_method
    row = m.row()
    assert row["edge_draft_j_per_token"] == pytest.approx(s.edge_phases_j["draft"] / 10)


def test_a_meter_that_includes_the_radio_is_not_charged_twice():
    activity = Activity(output_tokens=4, transfers=[Transfer(0, 0.4, "up", 1_000_000)])
    m = Harness(ScriptedMeter(includes_radio=True), radio="wifi", idle_s=0.01).measure(lambda: activity)
    assert m.samples[0].edge_net_j == pytest.approx(8.0)
    assert "modelled radio" not in m.edge_method


def test_harness_refuses_fewer_than_five_repetitions():
    with pytest.raises(ValueError, match=">= 5"):
        Harness(ScriptedMeter(), repetitions=3)


def test_harness_measures_a_real_callable_with_the_model():
    def work():
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
        return Activity(output_tokens=5, draft_s=0.05)

    m = Harness(ModelledMeter("laptop"), idle_s=0.2, repetitions=5).measure(work)
    # ~0.05 CPU-s at 7 W: about 0.35 J per call, 0.07 J per token, all of it drafting.
    assert 0.03 < m.edge_per_token.mean < 0.2
    assert m.phase_per_token("draft").mean == pytest.approx(m.edge_per_token.mean, rel=0.3)
    assert m.edge_method == "modelled:laptop"


def test_harness_measures_a_command_and_reports_a_failing_one():
    meter = ModelledMeter("iot", CpuClock(children=True))
    h = Harness(meter, radio=None, idle_s=0.2)
    m = h.measure_command([sys.executable, "-c", "sum(range(2_000_000))"])
    assert m.edge_j.mean > 0 and m.row()["edge_j_per_run"] == m.edge_j.mean
    with pytest.raises(MeterError, match="exited with 3"):
        h.measure_command([sys.executable, "-c", "raise SystemExit(3)"])


def test_energy_cli_detect_and_measure():
    out = subprocess.run([sys.executable, "-m", "energy", "detect"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("edge: ") and "cloud: " in out.stdout
    out = subprocess.run([sys.executable, "-m", "energy", "measure", "--meter", "modelled", "--idle-s", "0.2",
                          "--json", "--no-progress", "--", sys.executable, "-c", "sum(range(1_000_000))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["repetitions"] == 5 and row["edge_j_per_run"] > 0 and row["edge_method"] == "modelled:laptop"
    bad = subprocess.run([sys.executable, "-m", "energy", "measure", "--meter", "rapl", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("energy: ")


class SilentMeter:
    """A side that did nothing measurable (the cloud during an edge-only request)."""

    name = "silent"

    def start(self):
        return None

    def stop(self, token):
        raise MeterError("silent: the counter did not move in 0.1 s (below its resolution); measure a longer run")


def test_a_cloud_that_did_nothing_reads_zero_with_a_label():
    m = Harness(ScriptedMeter(), SilentMeter(), idle_s=0.01).measure(lambda: Activity(output_tokens=3))
    assert m.cloud_per_token.mean == 0.0
    assert "nothing measurable" in m.cloud_method


def test_a_battery_does_not_hold_the_energy_of_an_emulated_link():
    transfers = [Transfer(0, 0.4, "up", 1_000_000)]
    radio = radio_energy(transfers, "wifi").total
    m = Harness(ScriptedMeter(includes_radio=True), idle_s=0.01).measure(
        lambda: Activity(output_tokens=4, transfers=transfers, emulated_link=True))
    assert m.samples[0].edge_net_j == pytest.approx(8.0 + radio)


def test_a_failing_workload_stops_the_meters_and_raises():
    class Boom(Exception):
        pass

    calls = []

    class Tracking(ScriptedMeter):
        def stop(self, t0):
            calls.append(1)
            return super().stop(t0)

    h = Harness(Tracking(), idle_s=0.01, warmup=0)
    h.baseline()
    n = len(calls)

    def fail():
        raise Boom()

    with pytest.raises(Boom):
        h.measure(fail)
    assert len(calls) == n + 1


def test_a_command_past_its_timeout_is_a_meter_error():
    h = Harness(ModelledMeter("laptop", CpuClock(children=True)), radio=None, idle_s=0.05, warmup=0)
    with pytest.raises(MeterError, match="timeout"):
        h.measure_command([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.3)
