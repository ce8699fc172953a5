"""TPT per decoding policy over an emulated link, all against one real verifier on loopback.

    .venv/bin/python benchmarks/policies.py [--prompts 12] [--tokens 64] [--rtt 40] [--up 20] [--down 200]
        [--payload 8224] [--gamma-ms 10] [--modes pipesd,vanilla,...] [--repeat 1]

Every policy runs the same prompts on the same machine in one process, interleaved round-robin
per prompt so drift in machine load touches them alike. TPT = total end-to-end time / output
tokens (DESIGN.md §4). --payload adds emulated uplink bytes per draft token (8224 = our draft's
full-vocabulary float32 distribution, the paper's protocol applied to our 2048-token vocabulary;
290000 = the paper's own payload); --gamma-ms adds draft time per token (a slower device).

First the BO autotuner of `pipesd` runs until it has finished its 16 evaluations (the paper tuned
offline before measuring); the PipeSD ablations then run at the thresholds it found, so each one
differs from `pipesd` in one respect only. Baselines use their own published settings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from cloud_verifier import LocalVerifier
import pipesd_models
from edge_sdk import EdgeClient, LinkProfile, LlamaCppDrafter
from edge_sdk.emulation import SlowedDrafter

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\n", "class Stack:\n    def __init__(self):\n",
           "    def __repr__(self):\n        return ", "for i in range(10):\n", 'if __name__ == "__main__":\n',
           "def read_file(path):\n    with open(path) as f:\n", "try:\n    import threading\nexcept ImportError:\n",
           '        raise ValueError("', '"""Utilities for', "def _check_arg(name, value):\n", "        return self._",
           "from collections import", "class Error(Exception):\n", "    @property\n    def name(self):\n",
           "def main(argv=None):\n    parser = argparse."]
DEFAULT_MODES = ["cloud_only", "vanilla", "hsl", "edgellm", "pipesd", "pipesd_fixed", "pipesd_per_token",
                 "pipesd_at_trigger", "pipesd_no_proactive", "pipesd_c_only", "pipesd_p_only"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rtt", type=float, default=40.0)
    ap.add_argument("--up", type=float, default=20.0)
    ap.add_argument("--down", type=float, default=200.0)
    ap.add_argument("--payload", type=int, default=8224)
    ap.add_argument("--gamma-ms", type=float, default=10.0)
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--r1", type=float, help="fixed R1 for the PipeSD variants without BO")
    ap.add_argument("--r2", type=float, help="fixed R2 for the PipeSD variants without BO (and HSL)")
    ap.add_argument("--warmup", type=int, default=1, help="prompts run per mode before measuring (profiler, DP)")
    ap.add_argument("--max-tune-prompts", type=int, default=60, help="cap on prompts spent tuning pipesd first")
    ap.add_argument("--verifier-args", default="", help="extra pipesd-verifier flags, e.g. --no-eager-forward")
    args = ap.parse_args()
    modes = args.modes.split(",")
    link = LinkProfile(args.up, args.down, args.rtt, args.payload)
    prompts = (PROMPTS * 4)[: args.prompts]

    def new_client(v, r1=None, r2=None):
        drafter = SlowedDrafter(LlamaCppDrafter(pipesd_models.draft_path(), threads=1), args.gamma_ms / 1e3)
        return EdgeClient(v.url, verifier_key=v.public_key, link=link, drafter=drafter, r1=r1, r2=r2)

    with LocalVerifier(model="embedded", threads=1, extra_args=args.verifier_args.split()) as v, \
            new_client(v) as tuned_client:
        tuner = tuned_client.engine.autotuner
        warm = 0
        if "pipesd" in modes and args.r1 is None and args.r2 is None:
            while (tuner.tuning or not tuner.memory) and warm < args.max_tune_prompts:
                tuned_client.generate(prompts[warm % len(prompts)], max_new_tokens=args.tokens, mode="pipesd")
                warm += 1
                tuner.wait()
        r1, r2 = (args.r1, args.r2) if args.r1 is not None or args.r2 is not None else tuner.thresholds()
        fixed_client = new_client(v, r1, r2)
        # Baselines keep their own settings; only the PipeSD ablations take the tuned thresholds.
        clients = {m: (fixed_client if m.startswith("pipesd_") else tuned_client) for m in modes}
        for mode in modes:   # warm-up: the profiler and the DP plan
            for p in prompts[: args.warmup]:
                clients[mode].generate(p, max_new_tokens=args.tokens, mode=mode)
        acc = defaultdict(lambda: defaultdict(float))
        outputs = defaultdict(dict)
        for _ in range(args.repeat):
            for p in prompts:
                for mode in modes:
                    r = clients[mode].generate(p, max_new_tokens=args.tokens, mode=mode)
                    s = r.stats
                    outputs[p][mode] = r.tokens
                    a = acc[mode]
                    a["time"] += s.total_s
                    a["tokens"] += s.output_tokens
                    a["drafted"] += s.draft_n
                    a["accepted"] += s.draft_n_accepted
                    a["rounds"] += s.nav_rounds
                    a["batches"] += s.batches_sent
                    a["draft"] += s.draft_s
                    a["upload"] += s.upload_s
                    a["wait"] += s.wait_s
                    a["verify"] += s.verify_s
                    a["kept"] += s.proactive_kept
        fixed_client.close()
    print(f"link: {link.describe()}; added draft time {args.gamma_ms:g} ms/token; "
          f"{len(prompts)} prompts x {args.tokens} tokens x {args.repeat}; {time.strftime('%Y-%m-%d')}")
    print(f"thresholds for the PipeSD ablations: R1={r1:.3f} R2={r2:.3f}"
          + (f" (BO {'finished' if tuner.memory else 'NOT finished'} after {warm} warm-up prompts, "
             f"{tuner.trials_done} candidates tried)" if warm else " (given)"))
    mismatched = sorted({m for per in outputs.values() for m, t in per.items()
                         if "cloud_only" in per and t != per["cloud_only"]})
    print("lossless: every policy token-identical to cloud_only" if not mismatched
          else f"NOT LOSSLESS: {mismatched}")
    base = acc["cloud_only"]["time"] / acc["cloud_only"]["tokens"] if "cloud_only" in acc else None
    print("\n| policy | TPT ms | speed-up vs cloud_only | acceptance | mean draft len | accepted/round + 1 "
          "| batches/round | draft / upload / wait / verify (s) | proactive kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        a = acc[mode]
        tpt = a["time"] / a["tokens"]
        rounds = max(a["rounds"], 1)
        print(f"| {mode} | {tpt * 1e3:.1f} | {base / tpt:.2f}x | "
              f"{a['accepted'] / a['drafted'] if a['drafted'] else 0:.2f} | {a['drafted'] / rounds:.1f} | "
              f"{1 + a['accepted'] / rounds:.2f} | {a['batches'] / rounds:.2f} | "
              f"{a['draft']:.1f} / {a['upload']:.1f} / {a['wait']:.1f} / {a['verify']:.1f} | {int(a['kept'])} |"
              if base else f"| {mode} | {tpt * 1e3:.1f} |")


if __name__ == "__main__":
    main()
