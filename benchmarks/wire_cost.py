"""Bytes on the wire per drafted token: our sealed greedy channel vs the payloads of the alternatives.

    .venv/bin/python benchmarks/wire_cost.py [--prompts 8] [--max-new-tokens 64] [-k 4] [--temperatures 0.7,1.0]

Measured, not modelled: (1) real generations through a real verifier process, counting the
sealed frame bytes the edge sent and received (HTTP headers excluded), greedy and sampled (the
sampled rounds carry each token's sparse q: support ids + float16 probabilities, at most
``DRAFT_SUPPORT`` candidates), with the acceptance rate each reached; (2) the encoded size
(msgpack, zstd where it pays, AEAD header + tag) of what would travel per drafted token if the
draft's distribution went along: sparse top-k float16 (what the sampling path sends) and the
whole vocabulary as float32 (what the paper's code sent), from real draft distributions.
"""

from __future__ import annotations

import argparse

import numpy as np

from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient
from pipesd_lab.bench import PROMPTS as BENCH_PROMPTS
from privacy import ChannelLimits, ClientHandshake, FrameType, StaticKey, pack_tokens, server_handshake

PROMPTS = BENCH_PROMPTS[:8]   # the bench's prompt set, so both measure the same text


def sealed_size(body: dict) -> int:
    static = StaticKey.generate()
    client = ClientHandshake(server_public=static.public_bytes)
    reply, _ = server_handshake(client.hello(), static=static, psk=None)
    return len(client.finish(reply, ChannelLimits(max_frame_bytes=1 << 30)).seal(FrameType.VERIFY, body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--temperatures", default="0.7,1.0")
    args = ap.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",") if t]

    with LocalVerifier(model="embedded", threads=1) as v, \
            EdgeClient(v.url, verifier_key=v.public_key, mode="vanilla", draft_k=args.k, threads=1) as client:
        measured = {}
        for t in [0.0] + temperatures:
            up = down = drafted = accepted = out = rounds = 0
            for i, p in enumerate(PROMPTS[: args.prompts]):
                s = client.generate(p, max_new_tokens=args.max_new_tokens, temperature=t, seed=i).stats
                up, down, drafted, accepted, out, rounds = (
                    up + s.bytes_up, down + s.bytes_down, drafted + s.draft_n, accepted + s.draft_n_accepted,
                    out + s.output_tokens, rounds + s.nav_rounds)
            measured[t] = (up, down, drafted, accepted, out, rounds)
        up, down, drafted, _, out, rounds = measured[0.0]
        # Real draft distributions for the payload alternatives.
        drafter = client.drafter
        drafter.set_context(drafter.tokenize(PROMPTS[0]))
        dists = []
        for _ in range(args.k):
            logits = np.array(drafter._logits(), dtype=np.float64)
            p = np.exp(logits - logits.max())
            dists.append(p / p.sum())
            drafter.next_token()
    vocab = len(dists[0])
    ids = pack_tokens(range(args.k))
    base = {"base_len": 100, "prefix_hash": b"h" * 16, "append": b"", "draft": ids}
    rows = [("sealed greedy round, measured (ids only)", up / drafted)]
    for t in temperatures:
        t_up, _, t_drafted, t_acc, t_out, _ = measured[t]
        rows.append((f"sealed sampled round at T={t:g}, measured (ids + sparse q; acceptance "
                     f"{t_acc / t_drafted:.3f}, {t_up / t_out:.1f} B up per output token)", t_up / t_drafted))
    for top in (8, 32):
        idx = [np.argsort(-d)[:top] for d in dists]
        body = dict(base, q_ids=pack_tokens(np.concatenate(idx)),
                    q_probs=np.concatenate([d[i] for d, i in zip(dists, idx)]).astype("<f2").tobytes())
        rows.append((f"sparse top-{top} float16 per token", sealed_size(body) / args.k))
    full = dict(base, q=np.stack(dists).astype("<f4").tobytes())
    rows.append((f"full vocabulary float32 per token (V={vocab})", sealed_size(full) / args.k))
    rows.append(("paper's payload (32k vocab, per the paper)", 0.29e6))
    print(f"{len(PROMPTS[:args.prompts])} prompts x {args.max_new_tokens} tokens, vanilla k={args.k}: "
          f"{rounds} NAV rounds, {drafted} drafted, {out} output tokens")
    print(f"greedy acceptance {measured[0.0][3] / drafted:.3f}; measured: {up / drafted:.1f} B up per drafted token, {up / out:.1f} B up and {down / out:.1f} B down "
          "per output token (sealed frame bodies; HTTP headers excluded)")
    print("\n| payload | bytes per drafted token |\n|---|---|")
    for name, b in rows:
        print(f"| {name} | {b:,.1f} |")


if __name__ == "__main__":
    main()
