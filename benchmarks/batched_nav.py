"""Many edges, one verifier: batched NAV across sessions vs one session per forward pass.

    .venv/bin/python benchmarks/batched_nav.py [--sessions 1,4,8,16,32] [--rounds 40] [--out docs/batching]

Two measurements, both on this machine, same run:

1. End to end (the issue's table): a real verifier process (uvicorn, sealed frames, the
   embedded target on transformers) pinned to one core with one thread, and N real edge
   clients (llama.cpp draft, vanilla k = 4, one ``EdgeClient`` per session) in worker
   processes pinned to the other core. Each session runs the same prompts; the verifier
   runs batched (the default) or with ``--max-batch 1`` (one session per pass). Reported:
   output tokens/s over all sessions, draft tokens verified/s, and the NAV latency each edge
   sees (verify round trip: upload, queueing, the pass, the reply) at p50 and p99.
2. The target pass alone (no HTTP, no clients): ``logits_many`` over B sessions with a
   4-token draft each vs B single-session calls, at the prefix length the sessions reach.
   This isolates what batching buys from what the two cores and the HTTP stack cost.

Writes results.json, results.md and batching.png to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_verifier import LocalVerifier  # noqa: E402
from pipesd_lab.bench import PROMPTS, git_commit  # noqa: E402
from benchmarks.timed_verifier import TimedVerifier  # noqa: E402

VERIFIER_CORE, EDGE_CORE = 1, 0


def edge_process(url, key, n_sessions, first, max_new, rounds_per_session, barrier, out):
    """Runs `n_sessions` edge clients in threads; reports latencies, tokens and the busy window."""
    from edge_sdk import EdgeClient
    from edge_sdk.transport import HttpVerifier

    os.sched_setaffinity(0, {EDGE_CORE})
    clients = []
    for i in range(n_sessions):
        timed = TimedVerifier(HttpVerifier(url, verifier_key=key))
        c = EdgeClient(verifier=timed, mode="vanilla", draft_k=4, threads=1)
        c.generate(PROMPTS[0], max_new_tokens=8)                       # handshake, warm caches
        timed.latencies.clear()
        clients.append((c, timed))
    report = []

    def session(i, client, timed):
        rounds = tokens = drafted = 0
        j = first + i
        t0 = time.perf_counter()
        while rounds < rounds_per_session:
            s = client.generate(PROMPTS[j % len(PROMPTS)], max_new_tokens=max_new).stats
            rounds, tokens, drafted, j = rounds + s.nav_rounds, tokens + s.output_tokens, drafted + s.draft_n, j + 1
        report.append({"t0": t0, "t1": time.perf_counter(), "tokens": tokens, "drafted": drafted,
                       "rounds": rounds, "latencies": timed.latencies})

    barrier.wait()
    cpu0 = time.process_time()
    threads = [threading.Thread(target=session, args=(i, c, t)) for i, (c, t) in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report[0]["edge_cpu_s"] = time.process_time() - cpu0     # this process's CPU time, once per process
    for c, _ in clients:
        c.close()
    out.put(report)


def server_histogram(url) -> dict[float, float]:
    """The verifier's NAV-time histogram (``pipesd_nav_seconds``: from the final batch's dispatch to
    the result, the wait for a shared pass included): {bucket upper bound (s): count}."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = r'^pipesd_nav_seconds_bucket\{le="([^"]+)"\} (\S+)'
    return {float(le): float(c) for le, c in re.findall(pattern, text, re.M)}


def bucket_percentile(before: dict, after: dict, q: float) -> float:
    """The upper bound of the histogram bucket holding the q-th percentile (seconds)."""
    counts = {le: after[le] - before.get(le, 0.0) for le in after}
    total = counts[float("inf")]
    return next(le for le in sorted(counts) if counts[le] >= q / 100 * total)


def run_cell(verifier, n, args) -> dict:
    procs_n = min(n, args.processes)
    shares = [n // procs_n + (1 if i < n % procs_n else 0) for i in range(procs_n)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs_n + 1), ctx.Queue()
    procs, first = [], 0
    for share in shares:
        p = ctx.Process(target=edge_process, args=(verifier.url, verifier.public_key, share, first,
                                                   args.max_new_tokens, args.rounds, barrier, out))
        p.start()
        procs.append(p)
        first += share
    server = psutil.Process(verifier.proc.pid)
    barrier.wait(timeout=600)
    cpu0, hist0 = sum(server.cpu_times()[:2]), server_histogram(verifier.url)
    sessions = [s for _ in procs for s in out.get(timeout=1200)]
    cpu, hist = sum(server.cpu_times()[:2]) - cpu0, server_histogram(verifier.url)
    for p in procs:
        p.join(60)
    lat = np.concatenate([s["latencies"] for s in sessions]) * 1e3
    wall = max(s["t1"] for s in sessions) - min(s["t0"] for s in sessions)
    drafted = sum(s["drafted"] for s in sessions)
    return {"sessions": n, "wall_s": wall, "output_tok_s": sum(s["tokens"] for s in sessions) / wall,
            "verified_tok_s": drafted / wall, "verifier_cpu": cpu / wall,
            "edge_cpu": sum(s.get("edge_cpu_s", 0.0) for s in sessions) / wall,
            "verified_per_verifier_cpu_s": drafted / cpu,
            "rounds": int(sum(s["rounds"] for s in sessions)),
            "nav_p50_ms": float(np.percentile(lat, 50)), "nav_p99_ms": float(np.percentile(lat, 99)),
            # inside the verifier (request in to reply out), as histogram bucket bounds: <= this
            "server_p50_ms_le": bucket_percentile(hist0, hist, 50) * 1e3,
            "server_p99_ms_le": bucket_percentile(hist0, hist, 99) * 1e3}


def end_to_end(args) -> dict:
    results = {}
    for name, extra in (("batched", []), ("one_by_one", ["--max-batch", "1"])):
        with LocalVerifier(model="embedded", threads=1, cpus={VERIFIER_CORE}, extra_args=extra) as v:
            results[name] = []
            for n in args.sessions:
                cell = run_cell(v, n, args)
                results[name].append(cell)
                print(f"{name:10s} {n:3d} sessions: {cell['output_tok_s']:7.0f} out tok/s "
                      f"{cell['verified_tok_s']:7.0f} verified tok/s  verifier core {cell['verifier_cpu']:4.0%}  "
                      f"edge core {cell['edge_cpu']:4.0%}  "
                      f"{cell['verified_per_verifier_cpu_s']:6.0f} verified/core-s  NAV p50 {cell['nav_p50_ms']:6.1f} ms "
                      f"p99 {cell['nav_p99_ms']:6.1f} ms (NAV in the verifier: p50 <= {cell['server_p50_ms_le']:.0f}, "
                      f"p99 <= {cell['server_p99_ms_le']:.0f} ms)", flush=True)
    return results


def target_pass(args) -> list[dict]:
    """logits_many over B rows vs B single calls, one thread on the verifier's core."""
    import pipesd_models
    from cloud_verifier.target import TorchTarget

    target = TorchTarget(pipesd_models.target_path(), threads=1, kv_slots=max(args.sessions))
    rng = np.random.default_rng(0)
    rows = []
    for b in args.sessions:
        states = [target.new_state() for _ in range(b)]
        prefixes = [list(map(int, rng.integers(3, 2000, size=args.prefix))) for _ in range(b)]
        target.logits_many([(s, p, len(p) - 1) for s, p in zip(states, prefixes)])
        drafts = [p + list(map(int, rng.integers(3, 2000, size=4))) for p in prefixes]

        def batched():
            target.logits_many([(s, d, len(p) - 1) for s, d, p in zip(states, drafts, prefixes)])

        def one_by_one():
            for s, d, p in zip(states, drafts, prefixes):
                target.logits(s, d, len(p) - 1)

        timing = {}
        for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
                for s, p in zip(states, prefixes):
                    target.rollback(s, len(p))
            timing[name] = float(np.median(samples))
        rows.append({"sessions": b, "batched_ms": timing["batched"] * 1e3, "one_by_one_ms": timing["one_by_one"] * 1e3,
                     "speedup": timing["one_by_one"] / timing["batched"],
                     "batched_verified_tok_s": 4 * b / timing["batched"]})
        print(f"target pass {b:3d} rows: batched {rows[-1]['batched_ms']:6.1f} ms, one by one "
              f"{rows[-1]['one_by_one_ms']:6.1f} ms ({rows[-1]['speedup']:.2f}x)", flush=True)
        for s in states:
            target.release(s)
    return rows


def write(out: Path, meta: dict, e2e: dict, passes: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "end_to_end": e2e, "target_pass": passes}, indent=2))
    single = e2e["batched"][0]
    lines = [f"Commit {meta['commit']}, {meta['date']}, {meta['machine']}.", "",
             "| sessions | batched out tok/s | one-by-one out tok/s | throughput × | verifier core busy "
             "(batched / one-by-one) | verified tok per verifier core-s (batched / one-by-one) | × "
             "| batched NAV p50 / p99 ms | one-by-one NAV p50 / p99 ms | batched p99 / single-session p99 "
             "| NAV in the verifier, batched p50 / p99 ≤ ms | one-by-one ≤ ms | edge core busy (batched / one-by-one) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, o in zip(e2e["batched"], e2e["one_by_one"]):
        lines.append(f"| {b['sessions']} | {b['output_tok_s']:.0f} | {o['output_tok_s']:.0f} | "
                     f"{b['output_tok_s'] / o['output_tok_s']:.2f} | {b['verifier_cpu']:.0%} / {o['verifier_cpu']:.0%} | "
                     f"{b['verified_per_verifier_cpu_s']:.0f} / {o['verified_per_verifier_cpu_s']:.0f} | "
                     f"{b['verified_per_verifier_cpu_s'] / o['verified_per_verifier_cpu_s']:.2f} | "
                     f"{b['nav_p50_ms']:.1f} / {b['nav_p99_ms']:.1f} | "
                     f"{o['nav_p50_ms']:.1f} / {o['nav_p99_ms']:.1f} | {b['nav_p99_ms'] / single['nav_p99_ms']:.2f} | "
                     f"{b['server_p50_ms_le']:.0f} / {b['server_p99_ms_le']:.0f} | "
                     f"{o['server_p50_ms_le']:.0f} / {o['server_p99_ms_le']:.0f} | "
                     f"{b['edge_cpu']:.0%} / {o['edge_cpu']:.0%} |")
    lines += ["", "Target pass alone (k = 4 draft per session, prefix "
              f"{meta['prefix']} tokens, 1 thread, median of {meta['repeats']}):", "",
              "| sessions | batched ms | one-by-one ms | speed-up | batched verified tok/s |", "|---:|---:|---:|---:|---:|"]
    for r in passes:
        lines.append(f"| {r['sessions']} | {r['batched_ms']:.1f} | {r['one_by_one_ms']:.1f} | {r['speedup']:.2f} | "
                     f"{r['batched_verified_tok_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    n = [c["sessions"] for c in e2e["batched"]]
    for name, style in (("batched", "o-"), ("one_by_one", "s--")):
        ax1.plot(n, [c["output_tok_s"] for c in e2e[name]], style, label=name.replace("_", " "))
        ax2.plot(n, [c["nav_p99_ms"] for c in e2e[name]], style, label=f"{name.replace('_', ' ')} p99")
        ax2.plot(n, [c["nav_p50_ms"] for c in e2e[name]], style, alpha=0.4, label=f"{name.replace('_', ' ')} p50")
    ax3.plot([r["sessions"] for r in passes], [r["speedup"] for r in passes], "o-")
    ax1.set(xlabel="concurrent sessions", ylabel="output tokens/s (all sessions)", title="end to end", xscale="log",
            xticks=n, xticklabels=n)
    ax2.set(xlabel="concurrent sessions", ylabel="NAV round trip (ms)", title="latency seen by the edge",
            xscale="log", yscale="log", xticks=n, xticklabels=n)
    ax3.set(xlabel="sessions in the pass", ylabel="speed-up over one by one", title="target pass alone",
            xscale="log", xticks=n, xticklabels=n)
    ax1.legend()
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "batching.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=40, help="NAV rounds per session (at least)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--processes", type=int, default=4, help="edge worker processes (sessions are threads in them)")
    ap.add_argument("--prefix", type=int, default=100, help="prefix length for the target-pass measurement")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "batching")
    args = ap.parse_args()
    args.sessions = [int(s) for s in args.sessions.split(",")]
    if os.cpu_count() < 2:
        sys.exit("this benchmark pins the verifier and the edges to two different cores")
    meta = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "prefix": args.prefix,
            "repeats": args.repeats, "rounds_per_session": args.rounds, "policy": "vanilla k=4"}
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {VERIFIER_CORE})
    passes = target_pass(args)
    os.sched_setaffinity(0, cores)
    e2e = end_to_end(args)
    write(args.out, meta, e2e, passes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
