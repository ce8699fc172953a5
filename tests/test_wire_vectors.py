"""The published wire format (docs/wire-format.md) against fixed-key vectors.

The decoder here follows the spec with bare primitives (no privacy.channel), so the code,
the document and the vectors cannot drift apart silently.
"""

import hashlib
import hmac
import json
import struct
from pathlib import Path

import msgpack
import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .vectors.make_vectors import build

VECTORS = json.loads((Path(__file__).parent / "vectors" / "wire_v1.json").read_text())


def hkdf(ikm, salt, info, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)


def test_code_reproduces_the_vectors_exactly():
    fresh = build()
    for key in ("client_hello", "server_hello", "verifier_static_public"):
        assert fresh[key] == VECTORS[key]
    assert len(fresh["frames"]) == len(VECTORS["frames"])
    for mine, published in zip(fresh["frames"], VECTORS["frames"]):
        if not published["exact"]:       # zstd's bytes depend on its build: the rest must still match
            mine, published = ({k: v for k, v in f.items() if k != "frame"} for f in (mine, published))
        assert mine == published


@pytest.fixture(scope="module")
def keys():
    """Derive the session keys from the spec text alone."""
    hello = msgpack.unpackb(bytes.fromhex(VECTORS["client_hello"]))
    reply = msgpack.unpackb(bytes.fromhex(VECTORS["server_hello"]))
    e = X25519PrivateKey.from_private_bytes(bytes.fromhex(VECTORS["edge_ephemeral_private"]))
    s_pub = bytes.fromhex(VECTORS["verifier_static_public"])
    assert hello["v"] == 1 and hello["e"] == e.public_key().public_bytes_raw()
    transcript = b"PipeSD/1 handshake" + s_pub + hello["e"] + hello["r"] + reply["e"] + reply["sid"]
    ikm = e.exchange(X25519PublicKey.from_public_bytes(s_pub)) + e.exchange(X25519PublicKey.from_public_bytes(reply["e"]))
    okm = hkdf(ikm, hashlib.sha256(transcript).digest(), b"PipeSD/1 keys", 96)
    assert hmac.compare_digest(hmac.new(okm[64:], transcript, hashlib.sha256).digest(), reply["confirm"])
    return {"c2s": okm[:32], "s2c": okm[32:64], "sid": reply["sid"]}


def key_for(base, seq):
    key = base
    for _ in range(seq // VECTORS["rekey_interval"]):
        key = hkdf(key, b"", b"PipeSD/1 rekey", 32)
    return key


@pytest.mark.parametrize("i", range(len(VECTORS["frames"])))
def test_frames_decode_by_the_spec(keys, i):
    v = VECTORS["frames"][i]
    frame = bytes.fromhex(v["frame"])
    magic, version, ftype, flags, sid, seq, ack = struct.unpack(">2sBBB16sQQ", frame[:37])
    assert (magic, version, sid) == (b"PS", 1, keys["sid"])
    nonce = (b"c2s\x00" if v["direction"] == "c2s" else b"s2c\x00") + struct.pack(">Q", seq)
    body = ChaCha20Poly1305(key_for(keys[v["direction"]], seq)).decrypt(nonce, frame[37:], frame[:37])
    if flags & 1:
        assert zstandard.frame_content_size(body) > 0
        body = zstandard.ZstdDecompressor().decompress(body)
    assert msgpack.unpackb(body) == msgpack.unpackb(bytes.fromhex(v["body_msgpack"]))
    assert ack == v["ack"]        # an s2c frame acks the request it answers; a c2s frame acks nothing (0)


def test_pipelined_nav_vectors_carry_the_spec_fields():
    """The conditional final (``cond``, ``after``: the round it was drafted on) and its rebased RESULT, as the
    spec's VERIFY and RESULT rows define them."""
    bodies = [(v, msgpack.unpackb(bytes.fromhex(v["body_msgpack"]))) for v in VECTORS["frames"]]
    (request_v, request), = [(v, b) for v, b in bodies if b.get("cond")]
    (answer_v, answer), = [(v, b) for v, b in bodies if b.get("rebased")]
    assert request_v["direction"] == "c2s" and answer_v["direction"] == "s2c"
    assert request["final"] is True and request["after"] == 2 and request["round"] == 3
    assert len(request["prefix_hash"]) == 16 and request["base_len"] == 7
    assert answer["accepted"] == 0 and answer["committed_len"] == 6
    seq = struct.unpack(">Q", bytes.fromhex(request_v["frame"])[21:29])[0]     # the header's seq field
    assert answer_v["ack"] == seq       # the rebased RESULT answers that conditional request


def test_tree_vectors_carry_the_spec_fields():
    """A token tree's VERIFY (``tree``: each node's parent index + 1, 0 the base) and the RESULT naming the
    deepest accepted node, decoded by the spec's rules alone."""
    bodies = [(v, msgpack.unpackb(bytes.fromhex(v["body_msgpack"]))) for v in VECTORS["frames"]]
    (request_v, request), = [(v, b) for v, b in bodies if "tree" in b]
    (answer_v, answer), = [(v, b) for v, b in bodies if "node" in b]
    draft = struct.unpack(f"<{len(request['draft']) // 4}I", request["draft"])
    parents = [p - 1 for p in struct.unpack(f"<{len(request['tree']) // 4}I", request["tree"])]
    assert draft == (21, 22, 23, 24) and parents == [-1, -1, 0, 2]
    assert all(p < i for i, p in enumerate(parents))           # parents precede their children
    path, node = [], answer["node"]
    while node >= 0:
        path.append(draft[node])
        node = parents[node]
    assert path[::-1] == [21, 23] and answer["accepted"] == 2
    assert answer["committed_len"] == request["base_len"] + answer["accepted"] + 1
    seq = struct.unpack(">Q", bytes.fromhex(request_v["frame"])[21:29])[0]
    assert answer_v["direction"] == "s2c" and answer_v["ack"] == seq


def test_psk_handshake_by_the_spec():
    """PSK mode from the spec alone: psk_id = HMAC over this hello's e and r under a key derived from the
    PSK (not a fixed hash of the key), and the session keys the OPEN frame is sealed with."""
    v = VECTORS["psk"]
    assert build()["psk"] == v                                    # the code reproduces the vector exactly
    psk = bytes.fromhex(v["psk"])
    hello = msgpack.unpackb(bytes.fromhex(v["client_hello"]))
    reply = msgpack.unpackb(bytes.fromhex(v["server_hello"]))
    assert set(hello) == {"v", "e", "r", "psk_id"}
    k_id = hkdf(psk, b"", b"PipeSD/1 psk id key", 32)
    assert hello["psk_id"] == hmac.new(k_id, b"PipeSD/1 psk id" + hello["e"] + hello["r"], hashlib.sha256).digest()
    assert hello["psk_id"] != hashlib.sha256(b"PipeSD/1 psk id" + psk).digest()
    e = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["edge_ephemeral_private"]))
    transcript = b"PipeSD/1 handshake" + hello["psk_id"] + hello["e"] + hello["r"] + reply["e"] + reply["sid"]
    ikm = psk + e.exchange(X25519PublicKey.from_public_bytes(reply["e"]))
    okm = hkdf(ikm, hashlib.sha256(transcript).digest(), b"PipeSD/1 keys", 96)
    assert hmac.compare_digest(hmac.new(okm[64:], transcript, hashlib.sha256).digest(), reply["confirm"])
    frame = bytes.fromhex(v["open_frame"])
    assert frame[3] == 1 and frame[5:21] == reply["sid"]
    nonce = b"c2s\x00" + frame[21:29]
    body = ChaCha20Poly1305(okm[:32]).decrypt(nonce, frame[37:], frame[:37])
    assert body == bytes.fromhex(v["open_body_msgpack"])
