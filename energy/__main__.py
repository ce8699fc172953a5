"""python -m energy: which meters this machine has, and the energy of any command.

    python -m energy detect                                   # each meter: usable, or why not
    python -m energy measure -- pipesd bench --quick --out /tmp/b   # a whole bench run, 5 repetitions
    python -m energy measure --meter modelled --model iot --reps 5 -- python my_app.py
"""

from __future__ import annotations

import argparse
import json
import sys

from .harness import Harness
from .meters import CPU_MODELS, METERS, CpuClock, MeterError, detect_meter


def _detect(args) -> int:
    for side in ("edge", "cloud"):
        meter, skipped = detect_meter(side, cpu=CpuClock(children=True))
        print(f"{side}: {meter.name}")
        for s in skipped:
            print(f"  skipped {s}")
    return 0


def _measure(args) -> int:
    if not args.command:
        print("energy: give the command after --", file=sys.stderr)
        return 2
    # The child's CPU time, for the modelled meter; hardware counters see it anyway.
    meter, skipped = detect_meter("edge", args.meter, cpu=CpuClock(children=True), model=args.model)
    for s in skipped:
        print(f"energy: skipped {s}", file=sys.stderr)
    harness = Harness(meter, radio=None, edge_model=args.model, repetitions=args.reps, warmup=args.warmup,
                      idle_s=args.idle_s, progress=not args.no_progress)
    m = harness.measure_command(args.command, timeout=args.timeout)
    row = m.row()
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{' '.join(args.command)}: {m.edge_j} J per run (net of idle {m.baseline.edge_w:.3g} W; "
              f"{len(m.samples)} runs, 95% interval; {m.seconds.mean:.2f} s each) [{m.edge_method}]")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m energy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("detect", help="list the meters this machine offers").set_defaults(func=_detect)
    m = sub.add_parser("measure", help="measure a command (after --)")
    m.add_argument("--meter", choices=METERS, default="auto")
    m.add_argument("--model", choices=sorted(CPU_MODELS), default="laptop", help="CPU model for the modelled meter")
    m.add_argument("--reps", type=int, default=5)
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--idle-s", type=float, default=2.0)
    m.add_argument("--timeout", type=float, default=None, help="seconds per run")
    m.add_argument("--json", action="store_true")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("command", nargs=argparse.REMAINDER)
    m.set_defaults(func=_measure)
    args = ap.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return args.func(args)
    except (MeterError, ValueError, OSError) as exc:
        print(f"energy: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
