"""What the OpenAI endpoint costs: concurrent streaming clients through ``pipesd serve`` next to
llama-cpp-python's own server (``llama_cpp.server``) serving the same draft GGUF alone.

    .venv/bin/python benchmarks/serve_bench.py [--clients 1,4,16] [--requests 3] [--tokens 64] [--out docs/serve]

Servers, one at a time, each on loopback with one draft thread pinned to core 0 (the verifier, when
there is one, on core 1):
  - ``llama_cpp.server``  -- the draft GGUF alone, one sequence at a time, requests queued
    (``--interrupt_requests False``; its default, True, cuts a streaming request short whenever another
    arrives: measured too, as ``interrupting``, to show why it is not the comparison);
  - ``serve edge_only``   -- ``pipesd serve --mode edge_only``: the same work (the draft alone), so the
    difference to the line above is what our endpoint, queue and engine cost;
  - ``serve pipesd``      -- ``pipesd serve`` in its default mode with a real verifier (embedded target):
    what a user gets, every token verified;
  - ``serve pipesd q4``   -- the same with ``--max-queue 4``, to show what 429 + Retry-After does to 16 clients.
Each of N concurrent clients (asyncio + httpx) sends ``--requests`` streaming completions one after
another (greedy, ``max_tokens`` = ``--tokens``, prompts from the bench). TTFT: request sent -> first
non-empty text chunk, over all requests; output tokens/s: all clients' tokens (the text re-tokenised
with the draft's tokenizer, the same count for every server) / wall time; 429s: refused requests
(a refused client waits its Retry-After and tries again, at most 20 times).
Needs ``pipesd[bench]`` (it installs ``llama-cpp-python[server]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_verifier import LocalVerifier  # noqa: E402
from edge_sdk.serve.local import LocalServe  # noqa: E402
from pipesd_lab.bench import PROMPTS  # noqa: E402
from pipesd_models import pair_paths  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """``python -m llama_cpp.server`` on a free loopback port, pinned like our server."""

    def __init__(self, model: Path, n_ctx: int, interrupt: bool = False):
        self.model, self.n_ctx, self.port, self.interrupt = model, n_ctx, free_port(), interrupt
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", "embedded",
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", "1",
             "--n_threads_batch", "1", "--verbose", "False", "--interrupt_requests", str(self.interrupt)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("llama_cpp.server did not start")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_client(http: httpx.AsyncClient, url: str, index: int, requests: int, tokens: int, out: dict):
    for r in range(requests):
        body = {"model": "embedded", "prompt": PROMPTS[(index * requests + r) % len(PROMPTS)], "max_tokens": tokens,
                "temperature": 0, "stream": True}
        for _attempt in range(20):
            t0 = time.perf_counter()
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code == 429:
                    out["429"] += 1
                    await resp.aread()
                    await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                    continue
                resp.raise_for_status()
                text, first = [], None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
                    if piece and first is None:
                        first = time.perf_counter() - t0
                    text.append(piece)
                out["ttft"].append(first if first is not None else time.perf_counter() - t0)
                out["texts"].append("".join(text))
                break


async def load(url: str, clients: int, requests: int, tokens: int) -> dict:
    out = {"ttft": [], "texts": [], "429": 0}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(http, url, i, requests, tokens, out) for i in range(clients)))
        out["wall"] = time.perf_counter() - t0
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="write results.md / results.json here")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    draft = pair_paths("embedded")[0]
    from llama_cpp import Llama
    tokenizer = Llama(model_path=str(draft), vocab_only=True, verbose=False)
    n_ctx = int(tokenizer.metadata.get("llama.context_length", 512))

    def count(text: str) -> int:
        return len(tokenizer.tokenize(text.encode(), add_bos=False)) if text else 0

    rows = []

    def measure(name: str, url: str):
        asyncio.run(load(url, 1, 1, 8))                      # warm: first load, handshake
        for n in clients:
            r = asyncio.run(load(url, n, args.requests, args.tokens))
            toks = sum(count(t) for t in r["texts"])
            row = {"server": name, "clients": n, "requests": len(r["ttft"]), "tokens_per_request": toks / len(r["ttft"]),
                   "ttft_p50_ms": 1e3 * statistics.median(r["ttft"]), "ttft_p99_ms": 1e3 * percentile(r["ttft"], 0.99),
                   "tokens_per_s": toks / r["wall"], "rejected_429": r["429"], "wall_s": r["wall"]}
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    with LlamaCppServer(draft, n_ctx) as s:
        measure("llama_cpp.server (draft alone)", s.url)
    with LlamaCppServer(draft, n_ctx, interrupt=True) as s:
        measure("llama_cpp.server interrupting (its default)", s.url)
    with LocalServe(["--mode", "edge_only", "--threads", "1"], cpus={0}) as s:
        measure("pipesd serve edge_only (draft alone)", s.url)
    with LocalVerifier(model="embedded", threads=1, cpus={1}) as v:
        key = ["--verifier", v.url, "--verifier-key", v.public_key, "--threads", "1"]
        with LocalServe(key, cpus={0}) as s:
            measure("pipesd serve pipesd (verified)", s.url)
        with LocalServe(key + ["--max-queue", "4"], cpus={0}) as s:
            measure("pipesd serve pipesd --max-queue 4", s.url)

    lines = ["| server | clients | requests | tokens/request | TTFT p50 ms | TTFT p99 ms | output tok/s | 429s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_request']:.1f} "
              f"| {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
              f"| {r['tokens_per_s']:.0f} | {r['rejected_429']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:])
        (args.out / "results.md").write_text(f"# pipesd serve vs llama_cpp.server\n\n`{cmd}`, "
                                             f"{args.tokens} tokens per request, greedy.\n\n{table}\n")
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
