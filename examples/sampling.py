"""Sampling through the pipeline: the target's distribution exactly, reproducible with a seed.

    .venv/bin/python examples/sampling.py [--temperature 0.8] [--top-p 0.95]

Generates the same prompt with three seeds (and one seed twice), then prints acceptance and the
bytes each drafted token cost on the wire: under sampling each token travels with the draft's sparse
distribution q (support ids + float16 probabilities) so the verifier can apply the speculative
sampling rule.
"""

from __future__ import annotations

import argparse

from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--prompt", default="class Stack:\n    def __init__(self):\n")
    args = ap.parse_args()
    with LocalVerifier(model="embedded") as verifier, \
            EdgeClient(verifier.url, verifier_key=verifier.public_key, mode="pipesd_fixed", r1=0.3, r2=0.4) as client:
        for seed in (1, 2, 3, 1):
            r = client.generate(args.prompt, max_new_tokens=48, temperature=args.temperature, top_p=args.top_p,
                                seed=seed)
            s = r.stats
            print(f"--- seed {seed}: acceptance {s.acceptance_rate:.2f}, "
                  f"{s.bytes_up / max(1, s.draft_n):.0f} B up per drafted token\n{r.text}")


if __name__ == "__main__":
    main()
