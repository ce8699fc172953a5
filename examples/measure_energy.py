"""Measure the energy of your own code with the harness: a callable, then a command.

    .venv/bin/python examples/measure_energy.py

Picks the best meter this machine has (battery > RAPL > modelled) and says why it skipped the
others, then measures 5 edge-only generations (the device alone, no network) after a warm-up and an
idle baseline, and prints J per output token with its 95% interval and how it was obtained.
"""

from __future__ import annotations

import sys

from edge_sdk import EdgeClient
from energy import Activity, CpuClock, Harness, ModelledMeter, detect_meter


def main() -> None:
    meter, skipped = detect_meter("edge", model="laptop")
    for reason in skipped:
        print(f"skipped {reason}")
    with EdgeClient(mode="edge_only", threads=1) as client:
        def one_request() -> Activity:
            s = client.generate("def fibonacci(n):\n", max_new_tokens=64).stats
            return Activity(output_tokens=s.output_tokens, draft_s=s.draft_s)

        m = Harness(meter, radio=None, idle_s=1.0).measure(one_request, label="edge_only")
    print(f"edge_only: {m.edge_per_token} J per output token (net of {m.baseline.edge_w:.2f} W idle) "
          f"[{m.edge_method}]")

    # Any command: the meter must see the child process (a counter does; the model needs its CPU time).
    cmd = ModelledMeter("laptop", CpuClock(children=True)) if meter.name == "modelled" else meter
    c = Harness(cmd, radio=None, idle_s=1.0).measure_command([sys.executable, "-c", "sum(range(10**7))"])
    print(f"a 10**7 sum in a child process: {c.edge_j} J per run [{c.edge_method}]")


if __name__ == "__main__":
    main()
