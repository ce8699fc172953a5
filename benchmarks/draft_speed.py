"""Draft tokens per second: llama.cpp (GGUF f16) vs onnxruntime (the same draft, exported) on 1 and 2 threads.

    .venv/bin/python benchmarks/draft_speed.py [--tokens 128] [--repeats 7]

Each repeat sets the context to a prompt (prefill excluded: the cache keeps it) and drafts `tokens`
tokens greedily one by one, the way the engine drafts; the figure is the median over repeats and
prompts. Both backends run in this process, alternating, so machine drift touches both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pipesd_lab.bench import PROMPTS
from edge_sdk.drafter import LlamaCppDrafter, OnnxDrafter
from pipesd_models import draft_onnx_path, draft_path


def rate(drafter, prompt: list[int], tokens: int) -> float:
    drafter.set_context(prompt)
    drafter.next_token()                      # prefill outside the timing
    drafter.set_context(prompt)
    t = time.perf_counter()
    for _ in range(tokens):
        drafter.next_token()
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = []
    for threads in (1, 2):
        backends = {"llama.cpp": LlamaCppDrafter(draft_path(), threads=threads),
                    "onnxruntime": OnnxDrafter(draft_onnx_path(), threads=threads)}
        prompts = [backends["llama.cpp"].tokenize(p) for p in PROMPTS[:4]]
        rates = {name: [] for name in backends}
        for _ in range(args.repeats):
            for p in prompts:
                for name, d in backends.items():
                    rates[name].append(rate(d, p, args.tokens))
        for name, r in rates.items():
            rows.append((name, threads, statistics.median(r), min(r), max(r)))
    print(f"greedy drafting, {args.tokens} tokens x {len(PROMPTS[:4])} prompts x {args.repeats} repeats\n")
    print("| backend | threads | tokens/s (median) | min | max |\n|---|---|---|---|---|")
    for name, threads, med, lo, hi in rows:
        print(f"| {name} | {threads} | {med:,.0f} | {lo:,.0f} | {hi:,.0f} |")


if __name__ == "__main__":
    main()
