"""What Ray Serve adds per request: the same verifier on plain uvicorn and on Ray Serve (one replica).

    .venv/bin/python benchmarks/ray_overhead.py [--tokens 40] [--prompts 4]

One edge client, one session at a time: ``cloud_only`` (every token is one NAV request with no
draft, so the round trip is almost all transport) and ``vanilla`` k = 4, milliseconds per output
token (median over prompts), plus the resident memory of Ray's processes. Needs ``pipesd[ray]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_verifier import LocalVerifier  # noqa: E402
from edge_sdk import EdgeClient  # noqa: E402
from pipesd_lab.bench import PROMPTS  # noqa: E402


def per_token_ms(verifier, mode, prompts, tokens) -> float:
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, threads=1, mode=mode) as c:
        c.generate(prompts[0], max_new_tokens=8)                      # handshake, warm
        samples = []
        for p in prompts:
            t0 = time.perf_counter()
            r = c.generate(p, max_new_tokens=tokens)
            samples.append((time.perf_counter() - t0) / len(r.tokens) * 1e3)
    return statistics.median(samples)


def ray_rss_mb() -> float:
    total = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or "")
            if "ray" in text.lower() and "ray_overhead" not in text:
                total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()
    prompts = PROMPTS[: args.prompts]
    rows = {}
    for name, kwargs in (("uvicorn", {}),
                         ("ray_serve", {"module": "cloud_verifier.ray_serve", "stop_timeout": 90, "ready_timeout": 240,
                                        "extra_args": ["--replicas", "1", "--cpus-per-replica", "0.5"]})):
        with LocalVerifier(model="embedded", threads=1, **kwargs) as v:
            rows[name] = {mode: per_token_ms(v, mode, prompts, args.tokens) for mode in ("cloud_only", "vanilla")}
            if name == "ray_serve":
                rows[name]["rss_mb"] = ray_rss_mb()
        print(name, {k: round(x, 2) for k, x in rows[name].items()}, flush=True)
    for mode in ("cloud_only", "vanilla"):
        print(f"{mode}: +{rows['ray_serve'][mode] - rows['uvicorn'][mode]:.2f} ms per output token on Ray Serve")


if __name__ == "__main__":
    main()
