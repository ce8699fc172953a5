"""Regenerate wire_v1.json: fixed keys -> exact handshake and frame bytes (docs/wire-format.md).

    python -m tests.vectors.make_vectors > tests/vectors/wire_v1.json

Only when the wire format changes on purpose (and then the protocol version too).
"""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import ChannelLimits, ClientHandshake, FrameType, StaticKey, encode, pack_tokens, server_handshake
from privacy.messages import VerifyRequest, VerifyResponse, prefix_hash


def fixed(label: str, n: int = 32) -> bytes:
    return hashlib.sha256(b"pipesd test vector " + label.encode()).digest()[:n]


def build() -> dict:
    static = StaticKey.from_private_bytes(fixed("verifier static"))
    client = ClientHandshake(server_public=static.public_bytes,
                             ephemeral=X25519PrivateKey.from_private_bytes(fixed("edge ephemeral")),
                             random=fixed("edge random", 16))
    hello = client.hello()
    limits = ChannelLimits(rekey_interval=4)   # small, so the vectors cross a key epoch
    reply, server = server_handshake(hello, static=static, psk=None, limits=limits,
                                     ephemeral=X25519PrivateKey.from_private_bytes(fixed("verifier ephemeral")),
                                     session_id=fixed("session id", 16))
    edge = client.finish(reply, limits)
    frames = []
    verify = {"base_len": 0, "prefix_hash": b"", "append": pack_tokens([0, 1, 2]), "draft": pack_tokens([3, 4])}
    frames.append(("c2s", edge.seal(FrameType.VERIFY, verify, compress=False), verify, 0))
    result = {"accepted": 1, "token": 9, "committed_len": 5, "verify_ms": 1.5}
    frames.append(("s2c", server.seal(FrameType.RESULT, result, ack=1, compress=False), result, 1))
    for seq in range(2, 6):      # seq 4 and 5 use the epoch-1 key
        body = {"base_len": 0, "prefix_hash": b"", "append": pack_tokens(list(range(seq))), "draft": b""}
        frames.append(("c2s", edge.seal(FrameType.VERIFY, body, compress=False), body, 0))
    big = {"base_len": 0, "prefix_hash": b"", "append": pack_tokens([7] * 300), "draft": b""}
    frames.append(("c2s", edge.seal(FrameType.VERIFY, big), big, 0))   # zstd: decode-only vector
    # Pipelined NAV: round 3, sent before round 2's verdict, conditional on it and naming it (after); the
    # verdict kept 5 tokens, not its assumed 7, so the verifier answers it rebased (the target's next token
    # on the 5 it holds, committed 6) and acks its sequence number (7).
    base = [0, 1, 2, 3, 4, 5, 6]
    cond = VerifyRequest(len(base), (), (11, 12), prefix_hash(base), round=3, conditional=True, after=2).to_dict()
    frames.append(("c2s", edge.seal(FrameType.VERIFY, cond, compress=False), cond, 0))
    rebased = VerifyResponse(0, 13, 6, 1.25, rebased=True).to_dict()
    frames.append(("s2c", server.seal(FrameType.RESULT, rebased, ack=7, compress=False), rebased, 7))
    # A token tree on the 6 committed tokens: two candidates for the first position (21, 22), 21 -> 23 -> 24.
    # The target follows 21 -> 23 and then wants 25: accepted 2, the deepest accepted node 2, committed 9.
    committed = [0, 1, 2, 3, 4, 5]
    tree = VerifyRequest(len(committed), (), (21, 22, 23, 24), prefix_hash(committed), round=4,
                         parents=(-1, -1, 0, 2)).to_dict()
    frames.append(("c2s", edge.seal(FrameType.VERIFY, tree, compress=False), tree, 0))
    answer = VerifyResponse(2, 25, 9, 2.5, node=2).to_dict()
    frames.append(("s2c", server.seal(FrameType.RESULT, answer, ack=8, compress=False), answer, 8))
    return {
        "description": "PipeSD wire format v1: fixed keys -> exact bytes (hex). See docs/wire-format.md.",
        "rekey_interval": limits.rekey_interval,
        "verifier_static_private": static.private.private_bytes_raw().hex(),
        "verifier_static_public": static.public_bytes.hex(),
        "edge_ephemeral_private": fixed("edge ephemeral").hex(),
        "verifier_ephemeral_private": fixed("verifier ephemeral").hex(),
        "client_hello": encode(hello).hex(),
        "server_hello": encode(reply).hex(),
        "frames": [{"direction": d, "frame": f.hex(), "body_msgpack": encode(b).hex(), "exact": not (f[4] & 1),
                    "ack": ack} for d, f, b, ack in frames],
        "psk": build_psk(),
    }


def build_psk() -> dict:
    """PSK mode: the per-handshake psk_id (an HMAC over the hello's own e and r) and the keys' confirm."""
    psk = fixed("pre-shared key")
    client = ClientHandshake(psk=psk, ephemeral=X25519PrivateKey.from_private_bytes(fixed("edge ephemeral psk")),
                             random=fixed("edge random psk", 16))
    hello = client.hello()
    reply, server = server_handshake(hello, static=None, psk=psk,
                                     ephemeral=X25519PrivateKey.from_private_bytes(fixed("verifier ephemeral psk")),
                                     session_id=fixed("session id psk", 16))
    edge = client.finish(reply)
    body = {"v": 1, "vocab_fingerprint": "0" * 32, "vocab_size": 2048}
    return {
        "psk": psk.hex(),
        "edge_ephemeral_private": fixed("edge ephemeral psk").hex(),
        "client_hello": encode(hello).hex(),
        "server_hello": encode(reply).hex(),
        "open_frame": edge.seal(FrameType.OPEN, body, compress=False).hex(),
        "open_body_msgpack": encode(body).hex(),
    }


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
