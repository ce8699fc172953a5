"""Does the round controller's branch pricing leave speed on the table? (issue 19)

    .venv/bin/python benchmarks/branch_pricing.py [--tokens 1280] [--regime native] [--scenario s1]

`pipesd` prices each branch node (docs/pipeline.md, "Branches on chains"): a runner-up goes up only
where its chance of being kept pays for its verifier row and upload. This runs, in one bench cell
(edge and verifier pinned to a core each, methods interleaved prompt by prompt as `pipesd bench`
does), the chain controller, `pipesd` as shipped, and `pipesd` with every branch let through:
a runner-up sibling at every chain position (twice, as a noise gauge) and, with `--deep`, branches
drafted four levels deep under every runner-up. If letting every branch through were faster, the
pricing would be too strict. Prints one line per method: TPT, committed tokens per NAV round,
branch nodes sent, rounds whose verdict kept a branch.
"""

from __future__ import annotations

import argparse

from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient
from edge_sdk.trees import TreeShape
from pipesd_lab.bench import Bench, BenchConfig, Tally
from pipesd_lab.scenarios import get_scenario

EVERY_SIBLING = TreeShape(nodes=32, width=2, batch=4, min_value=0.0, max_depth=1, min_expand=0.0)
EVERY_BRANCH_4_DEEP = TreeShape(nodes=32, width=2, batch=4, min_value=0.0, max_depth=4, min_expand=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1280, help="output tokens per method")
    ap.add_argument("--regime", default="native")
    ap.add_argument("--scenario", default="s1")
    ap.add_argument("--deep", action="store_true", help="also every branch, four levels deep")
    args = ap.parse_args()

    bench = Bench(BenchConfig(pin=True, min_tokens=args.tokens, progress=False))
    cpus = bench.pin_cores()
    pair, scenario = "embedded", get_scenario(args.scenario)
    bench.prepare(pair)
    methods = [("pipesd_chain", "pipesd_chain", None), ("pipesd", "pipesd", None),
               ("every sibling", "pipesd", EVERY_SIBLING), ("every sibling (again)", "pipesd", EVERY_SIBLING)]
    if args.deep:
        methods.append(("every branch, 4 deep", "pipesd_tree", EVERY_BRANCH_4_DEEP))
    with LocalVerifier(model=pair, threads=1, cpus=cpus) as verifier, \
            EdgeClient(verifier.url, verifier_key=verifier.public_key, pair=pair, mode="cloud_only",
                       threads=1) as reference:
        bench._ref_clients[pair] = reference
        clients, tallies = {}, {}
        try:
            for name, method, forced in methods:
                client = clients[name] = bench.client(verifier, pair, scenario, args.regime, method)
                if forced is not None:       # every branch goes, whatever its price
                    client.policy()._branches = lambda link, plan, shape=forced: shape
                bench.tune(client, bench.prompts[pair])
                client.generate(bench.prompts[pair][-1], max_new_tokens=bench.config.tokens_per_prompt)  # warm-up
                tallies[name] = Tally(pair, args.regime, args.scenario, method)
            bench._interleave(pair, clients, tallies, args.tokens)
        finally:
            for client in clients.values():
                client.close()
    for name, tally in tallies.items():
        row = tally.row()
        print(f"{name:24s} TPT {row['tpt_ms']:6.2f} ms  committed/round {row['committed_per_round']:.2f}  "
              f"branch nodes {row['branch_nodes']:5d}  rounds keeping a branch {row['branches_taken']:4d}  "
              f"lossless {'yes' if tally.mismatches == 0 else 'NO'}")


if __name__ == "__main__":
    main()
