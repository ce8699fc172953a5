"""`pipesd energy --quick`: the energy comparison as a user runs it (a subprocess, a real verifier).

Figures are not asserted against targets (that is docs/energy.md's job); the test checks that every
method was measured with >= 5 repetitions, that every figure carries its method label, that nothing is
silently zero, and that the radio saw the transfers the link emulated.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # Without --out the results go to a new temporary folder, named on stderr (not the working tree).
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "energy", "--quick", "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = [line for line in proc.stderr.splitlines() if line.startswith("pipesd energy: writing to ")]
    assert len(named) == 1, proc.stderr[-3000:]
    out = Path(named[0].split("writing to ")[1].split(" (--out")[0])
    assert out.is_dir() and Path(tempfile.gettempdir()) in out.parents
    yield out
    shutil.rmtree(out, ignore_errors=True)


def test_quick_energy_writes_labelled_results(quick_run):
    for name in ("energy.csv", "energy.json", "energy.md", "energy.png"):
        assert (quick_run / name).stat().st_size > 0
    rows = list(csv.DictReader(open(quick_run / "energy.csv")))
    assert [r["method"] for r in rows] == ["cloud_only", "vanilla", "pipesd_model"]
    for r in rows:
        assert int(r["repetitions"]) >= 5 and int(r["tokens"]) >= 5 * 8
        assert r["edge_method"].startswith("modelled:laptop") and "modelled radio (wifi" in r["edge_method"]
        assert r["cloud_method"] == "modelled:server"
        assert float(r["edge_j_per_token"]) > 0 and float(r["cloud_j_per_token"]) > 0
        assert float(r["edge_radio_up_j_per_token"]) > 0 and float(r["edge_waiting_j_per_token"]) > 0
        phases = sum(float(r[f"edge_{p}_j_per_token"]) for p in
                     ("draft", "radio_up", "radio_down", "waiting", "fallback", "overhead"))
        assert phases == pytest.approx(float(r["edge_j_per_token"]), rel=1e-6)
    assert float(rows[0]["edge_draft_j_per_token"]) == 0.0          # cloud_only drafts nothing
    assert float(rows[1]["edge_draft_j_per_token"]) > 0
    meta = json.loads((quick_run / "energy.json").read_text())["meta"]
    assert meta["command"].startswith("pipesd energy --quick") and meta["meters"]["s1"][0] == "edge: modelled"
    md = (quick_run / "energy.md").read_text()
    assert "pipesd_model vs vanilla" in md and "modelled:server" in md


@pytest.mark.parametrize("args, message", [(["--reps", "3"], ">= 5"), (["--scenarios", "s9"], "unknown scenario"),
                                           (["--methods", "magic"], "unknown method"), (["--r1", "0.5"], "both")])
def test_energy_refuses_bad_arguments(args, message):
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "energy", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
