"""`pipesd bench --quick`: the whole benchmark path on one scenario, as a user runs it (a subprocess).

Checks that the output is well-formed and that every method's output equals target greedy
(the bench compares each generation with the target's own greedy decoding). Speed figures are
not asserted: they are the benchmark's to report, not a test's.
"""

import csv
import json
import subprocess
import sys

import pytest

from pipesd_lab.bench import MAIN_METHODS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "bench", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_bench_writes_well_formed_results(quick_run):
    out, proc = quick_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(MAIN_METHODS)
    for r in rows:
        assert (r["pair"], r["regime"], r["scenario"]) == ("embedded", "native", "s1")
        assert int(r["tokens"]) >= 96 and float(r["tpt_ms"]) > 0 and int(r["generations"]) >= 3
        if r["method"] not in ("cloud_only", "edge_only"):
            assert int(r["drafted"]) > 0 and 0 < float(r["acceptance"]) <= 1
            assert int(r["bytes_up"]) > 0 and int(r["rounds"]) > 0
            assert 0 < float(r["lower_bound_ms"]) and 0 < float(r["efficiency"]) <= 1.0
            # The stack's floor adds cloud_only's own cost per request beyond RTT and pass: never below the bound.
            assert float(r["lower_bound_ms"]) <= float(r["stack_floor_ms"]) and float(r["stack_efficiency"]) > 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["command"].startswith("pipesd bench --quick")
    md = (out / "results.md").read_text()
    assert "### embedded, native regime: TPT" in md and "PipeSD speed-up vs best baseline" in md
    # The terminal gets the headline, with what its ratio means; stderr no third-party noise.
    assert "speed-up: the fastest baseline's TPT / PipeSD's" in proc.stdout
    assert "embedded/native/s1: pipesd " in proc.stdout and "best baseline " in proc.stdout
    assert "results.md" in proc.stdout.splitlines()[-1] and proc.stdout.rstrip().endswith(f" in {out}")
    for noise in ("llama_", "ggml_", "Converting and de-quantizing", "Traceback"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_quick_bench_every_method_equals_target_greedy(quick_run):
    out, _ = quick_run
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for method, r in rows.items():
        expected = -1 if method == "edge_only" else 0    # edge_only is the draft alone: not checked
        assert int(r["mismatches"]) == expected, method
        assert int(r["unverified"]) == 0, f"{method} went offline during the bench"


def test_bench_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "bench", "--scenarios", "s9", "--no-progress"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown scenario" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, says", [(["rounds", "--prompts", "0"], "--prompts must be positive"),
                                        (["rounds", "--method", "nope"], "unknown method"),
                                        (["grid", "--tokens", "0"], "--tokens must be positive"),
                                        (["stopping", "--tokens", "3"], "--tokens must be in 8..400"),
                                        (["stopping", "--pass", "gpu=20"], "expected NAME=FIXED_MS,PER_TOKEN_MS")])
def test_the_lab_commands_refuse_bad_arguments_before_running(args, says, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
