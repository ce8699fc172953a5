"""A generation that survives a link cut.

    .venv/bin/python examples/offline.py [--offline continue|wait|verify_late]

Starts a verifier on loopback, puts an emulated link between it and the edge, and cuts the link
for a moment in the middle of a generation. Unverified tokens (drafted while the cloud was
gone) are printed in brackets; with verify_late, a revision replaces the unverified tail where the
target disagrees once the link is back.
"""

from __future__ import annotations

import argparse
import threading

import pipesd_models
from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient, LlamaCppDrafter
from pipesd_lab.emulation import EmulatedLink, LinkProfile, SlowedDrafter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--offline", default="verify_late", choices=["continue", "wait", "verify_late"])
    ap.add_argument("--prompt", default="class Stack:\n    def __init__(self):\n")
    args = ap.parse_args()
    # A device drafting at 5 ms/token, so the cut lands mid-generation.
    drafter = SlowedDrafter(LlamaCppDrafter(pipesd_models.draft_path(), threads=1), 0.005)
    with LocalVerifier(model="embedded") as verifier, \
            EdgeClient(verifier=EmulatedLink.http(verifier.url, LinkProfile(rtt_ms=20), verifier_key=verifier.public_key),
                       drafter=drafter, offline=args.offline, offline_wait_s=2.0) as client:
        link = client.verifier
        reference = client.generate(args.prompt, max_new_tokens=96, mode="cloud_only")
        threading.Timer(0.15, link.set_down).start()                    # the link drops ...
        threading.Timer(0.45, link.set_down, args=(False,)).start()     # ... and comes back
        print(f"offline={args.offline}; [bracketed] = unverified, drafted while the link was down\n")
        gen = client.stream(args.prompt, max_new_tokens=96, mode="pipesd")
        for event in gen:
            if event.revise_from is not None:
                print(f"\n<< revision: the target replaces the output from token {event.revise_from} >>\n")
            print(event.text if event.verified else f"[{event.text}]", end="", flush=True)
        result = gen.result
        print("\n\n" + result.stats.summary())
        print(f"final text equals the target's own greedy decoding: {result.tokens == reference.tokens}")


if __name__ == "__main__":
    main()
