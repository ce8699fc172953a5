"""Attacks on the handshake against a real verifier process (loopback only, bounded in count and time).

Issue 20: a malformed handshake answered 500 (integers for keys, low-order points, a PSK id of the wrong
type); a handshake flood evicted honest sessions (every handshake made a session-table entry before the
client proved anything); a sniffed PSK id replayed with fresh ephemerals was "accepted 300 of 300" -- the
verifier answered each with a ServerHello and a session entry (unusable without the PSK, but each one
pushed an honest session out of the LRU); key files were written 0644 and overwritten silently.

Now: every field is checked for type and length (typed 4xx, never 500); a handshake makes no session
until its client seals a frame (``VerifierService.pending``, bounded, never evicting a session); the PSK
id is an HMAC over the hello's own ephemeral key (a replay with other ephemerals is refused, nothing is
kept); handshakes are rate limited per client IP and per affinity token (429 + Retry-After). Flooders
use other loopback source addresses (127.0.0.x) so that the honest client's IP bucket is its own.
"""

from __future__ import annotations

import base64
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time

import httpx
import msgpack
import psutil
import pytest

from cloud_verifier import LocalVerifier
from cloud_verifier.ratelimit import HandshakeLimiter, TokenBuckets
from privacy import (AFFINITY_HEADER, ClientHandshake, ErrorCode, FrameType, OpenSession, StaticKey, WireError,
    generate_psk, key_file_exposure, parse_psk, server_handshake, write_key_file)
from privacy.channel import _psk_id

integration = pytest.mark.integration

MSGPACK = "application/msgpack"
FRAME = "application/x-pipesd-frame"
# 10,000 in `make test` (~20-40 s on 2 cores); PIPESD_FUZZ_HANDSHAKES scales it.
N_HANDSHAKES = int(os.environ.get("PIPESD_FUZZ_HANDSHAKES", "10000"))

# X25519 points of small order (libsodium's blacklist) and their high-bit twins: all give an all-zero secret.
LOW_ORDER = [bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]
LOW_ORDER += [p[:31] + bytes([p[31] | 0x80]) for p in LOW_ORDER]


# -- helpers ---------------------------------------------------------------------------------------------
def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", re.M)
    for m in pattern.finditer(text):
        if (m.group(1) or "") == want:
            return float(m.group(2))
    return 0.0


def post_hello(http: httpx.Client, hello, headers: dict | None = None) -> httpx.Response:
    body = hello if isinstance(hello, bytes) else msgpack.packb(hello, use_bin_type=True)
    return http.post("/v1/handshake", content=body, headers={"content-type": MSGPACK, **(headers or {})})


def psk_hello(psk: bytes, e: bytes | None = None, r: bytes | None = None) -> dict:
    hs = ClientHandshake(psk=psk)
    hello = hs.hello()
    if e is not None or r is not None:
        hello["e"], hello["r"] = e or hello["e"], r or hello["r"]
        hello["psk_id"] = _psk_id(psk, hello["e"], hello["r"])
    return hello


def from_address(url: str, address: str, **kw) -> httpx.Client:
    """A client whose connections leave from `address` (another loopback IP: another source to the limits)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), **kw)


def assert_typed(resp: httpx.Response, statuses=(400,), codes=("handshake_failed", "malformed")) -> str:
    assert resp.status_code in statuses, (resp.status_code, resp.text[:200])
    assert resp.headers["content-type"].startswith("application/json")
    code = resp.json()["error"]["code"]
    assert code in codes, code
    return code


@pytest.fixture(scope="module")
def psk_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("psk") / "shared.psk"
    write_key_file(path, generate_psk())
    return path


@pytest.fixture(scope="module")
def psk(psk_file):
    return parse_psk(psk_file.read_bytes())


@pytest.fixture(scope="module")
def open_verifier(psk_file):
    """Static key and PSK both, no rate limit: the malformed cases and the fuzzer."""
    args = ["--psk-file", str(psk_file), "--handshake-rate", "0", "--client-handshake-rate", "0"]
    with LocalVerifier(model="embedded", backend="llamacpp", threads=1, extra_args=args) as v:
        yield v


@pytest.fixture(scope="module")
def limited_verifier():
    """Tight limits: 4 sessions, 8 pending handshakes, 10 handshakes a burst per IP, 3 per client."""
    args = ["--max-sessions", "4", "--max-pending-handshakes", "8", "--handshake-rate", "5", "--handshake-burst", "10",
            "--client-handshake-rate", "1", "--client-handshake-burst", "3"]
    with LocalVerifier(model="embedded", backend="llamacpp", threads=1, extra_args=args) as v:
        yield v


# -- in-process: the channel's own checks ------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("e", 32), ("e", 2**40), ("e", 2**63), ("e", -1), ("e", b"x" * 31), ("e", b"x" * 33), ("e", "x" * 32),
    ("r", 16), ("r", 2**40), ("r", 2**63), ("r", b"x" * 15), ("r", b"x" * 17), ("r", None),
    ("v", True), ("v", 1.0), ("v", "1"), ("v", 2), ("psk_id", "x" * 32), ("psk_id", 2**63), ("psk_id", {"a": 1}),
    ("psk_id", b"x" * 31), ("extra", 1),
])
def test_server_handshake_refuses_every_malformed_field(field, value):
    static = StaticKey.generate()
    hello = ClientHandshake(server_public=static.public_bytes).hello()
    hello[field] = value
    with pytest.raises(WireError) as err:
        server_handshake(hello, static=static, psk=os.urandom(32))
    assert err.value.code is ErrorCode.HANDSHAKE_FAILED


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p[:2].hex() + p[-1:].hex())
def test_low_order_points_refused_in_both_modes(point):
    static, psk = StaticKey.generate(), os.urandom(32)
    hello = ClientHandshake(server_public=static.public_bytes).hello()
    hello["e"] = point
    for h in (hello, psk_hello(psk, e=point)):
        with pytest.raises(WireError) as err:
            server_handshake(h, static=static, psk=psk)
        assert err.value.code is ErrorCode.HANDSHAKE_FAILED


def test_the_edge_refuses_a_low_order_or_mistyped_server_reply():
    from privacy.channel import HandshakeError

    static = StaticKey.generate()
    client = ClientHandshake(server_public=static.public_bytes)
    reply, _ = server_handshake(client.hello(), static=static, psk=None)
    for bad in ({**reply, "e": LOW_ORDER[0]}, {**reply, "e": 32}, {**reply, "sid": 2**63}, [1, 2], {}):
        with pytest.raises(HandshakeError):
            client.finish(bad)
    client.finish(reply)


def test_psk_id_is_per_handshake_and_replays_with_other_ephemerals_are_refused():
    psk = os.urandom(32)
    a, b = psk_hello(psk), psk_hello(psk)
    assert a["psk_id"] != b["psk_id"]                                  # links nothing between sessions
    import hashlib
    assert hashlib.sha256(b"PipeSD/1 psk id" + psk).digest() not in (a["psk_id"], b["psk_id"])
    sniffed = dict(b, psk_id=a["psk_id"])                             # a's id on b's ephemeral key
    with pytest.raises(WireError) as err:
        server_handshake(sniffed, static=None, psk=psk)
    assert err.value.code is ErrorCode.HANDSHAKE_FAILED
    hs = ClientHandshake(psk=psk)                                      # the honest hello works end to end
    reply, server = server_handshake(hs.hello(), static=None, psk=psk)
    edge = hs.finish(reply)
    assert server.open(edge.seal(FrameType.OPEN, {"x": 1}))[1] == {"x": 1}


# -- PSK material and key files ------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "correct horse battery staple correct horse battery staple",   # a passphrase
    "k" * 64,                                                        # printable
    base64.b64encode(b"a passphrase that is long enough to pass").decode(),   # base64 of text
    base64.b64encode(bytes(32)).decode(),                            # zeros
    base64.b64encode(bytes(range(16))).decode(),                     # too short (16 bytes)
    "пароль пароль пароль пароль пароль пароль",                     # text, not ASCII
])
def test_passphrase_like_psks_are_refused(text):
    with pytest.raises(ValueError, match="--generate-psk"):
        parse_psk(text)


def test_generated_psks_parse_on_both_sides(tmp_path):
    text = generate_psk()
    assert len(base64.b64decode(text)) == 32
    assert parse_psk(text) == parse_psk(text.encode() + b"\n") == base64.b64decode(text)
    raw = os.urandom(48)
    assert parse_psk(raw.strip()) == raw.strip()                     # raw random bytes, as the Python API takes


def test_edge_refuses_a_passphrase_psk():
    from edge_sdk.errors import ConfigError
    from edge_sdk.transport import HttpVerifier

    with pytest.raises(ConfigError, match="passphrase"):
        HttpVerifier("http://127.0.0.1:9", psk="my secret passphrase is long enough, surely")


def test_key_files_are_private_and_never_overwritten(tmp_path):
    path = tmp_path / "k"
    key = StaticKey.generate()
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and key_file_exposure(path) is None
    with pytest.raises(FileExistsError):
        StaticKey.generate().save(path)
    assert StaticKey.load(path).public_bytes == key.public_bytes
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):                            # O_EXCL: a planted link is not followed
        write_key_file(link, "x")
    assert not (tmp_path / "elsewhere").exists()
    path.chmod(0o644)
    assert "0644" in key_file_exposure(path)
    other = StaticKey.generate()
    other.save(path, force=True)                                     # replaced atomically, 0600 again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and StaticKey.load(path).public_bytes == other.public_bytes


def verifier_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "cloud_verifier", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_generate_key_and_psk(tmp_path):
    key, psk = tmp_path / "v.key", tmp_path / "v.psk"
    done = verifier_cli("--generate-key", str(key))
    assert done.returncode == 0 and "public key:" in done.stdout
    again = verifier_cli("--generate-key", str(key))
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    assert verifier_cli("--generate-key", str(key), "--force").returncode == 0
    assert verifier_cli("--generate-psk", str(psk)).returncode == 0
    assert verifier_cli("--generate-psk", str(psk)).returncode == 2
    for path in (key, psk):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(parse_psk(psk.read_text())) == 32


def test_cli_warns_about_an_exposed_key_and_refuses_a_passphrase(tmp_path):
    key, weak = tmp_path / "v.key", tmp_path / "weak.psk"
    StaticKey.generate().save(key)
    key.chmod(0o644)
    missing = str(tmp_path / "no-model.gguf")          # the run stops after the key checks, before any model
    done = verifier_cli("--key-file", str(key), "--model", missing, "--port", "0")
    assert done.returncode == 2
    assert "warning: key file" in done.stderr and "0644" in done.stderr and "chmod 600" in done.stderr
    weak.write_text("correct horse battery staple and then some more words\n")
    weak.chmod(0o600)
    done = verifier_cli("--psk-file", str(weak), "--model", missing, "--port", "0")
    assert done.returncode == 2 and "passphrase" in done.stderr and "--generate-psk" in done.stderr


# -- the rate limiter, on a fake clock ---------------------------------------------------------------------
def test_token_buckets_refill_and_say_when():
    now = [0.0]
    limiter = HandshakeLimiter(2.0, 4, 1.0, 2, clock=lambda: now[0])
    assert [limiter.admit("a", None) for _ in range(5)] == [0, 0, 0, 0, 1]
    now[0] += 0.5                                     # one token back at 2/s
    assert limiter.admit("a", None) == 0 and limiter.admit("a", None) == 1
    assert [limiter.admit("b", "t") for _ in range(3)] == [0, 0, 1]     # the client's own bucket (2)
    assert limiter.admit("b", "u") == 0 and limiter.admit("b", None) == 0   # others from that IP: still fine
    assert TokenBuckets(0, 1).wait("x") == 0.0        # rate 0: no limit


def test_bucket_table_is_bounded():
    buckets = TokenBuckets(1.0, 1, max_keys=100)
    for i in range(1000):
        buckets.take(str(i))
    assert len(buckets._buckets) == 100


# -- against a real verifier -----------------------------------------------------------------------------
MALFORMED = {
    "e_int_32": {"v": 1, "e": 32, "r": b"r" * 16},
    "e_int_2_40": {"v": 1, "e": 2**40, "r": b"r" * 16},
    "e_int_2_63": {"v": 1, "e": 2**63, "r": b"r" * 16},
    "e_negative": {"v": 1, "e": -(2**63), "r": b"r" * 16},
    "r_int_2_40": {"v": 1, "e": b"e" * 32, "r": 2**40},
    "r_int_2_63": {"v": 1, "e": b"e" * 32, "r": 2**63},
    "e_short": {"v": 1, "e": b"e" * 31, "r": b"r" * 16},
    "e_long": {"v": 1, "e": b"e" * 33, "r": b"r" * 16},
    "e_empty": {"v": 1, "e": b"", "r": b"r" * 16},
    "e_str": {"v": 1, "e": "e" * 32, "r": b"r" * 16},
    "r_short": {"v": 1, "e": b"e" * 32, "r": b"r" * 15},
    "r_long": {"v": 1, "e": b"e" * 32, "r": b"r" * 17},
    "r_list": {"v": 1, "e": b"e" * 32, "r": [1] * 16},
    "psk_id_str": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, "psk_id": "i" * 32},
    "psk_id_big_int": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, "psk_id": 2**64 - 1},
    "psk_id_map": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, "psk_id": {"a": b"b"}},
    "psk_id_short": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, "psk_id": b"i" * 16},
    "psk_id_nil": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, "psk_id": None},
    "missing_all": {},
    "missing_v": {"e": b"e" * 32, "r": b"r" * 16},
    "missing_e": {"v": 1, "r": b"r" * 16},
    "missing_r": {"v": 1, "e": b"e" * 32},
    "extra_field": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, "x": 1},
    "extra_bin_key": {"v": 1, "e": b"e" * 32, "r": b"r" * 16, b"e": b"e" * 32},
    "v_true": {"v": True, "e": b"e" * 32, "r": b"r" * 16},
    "v_float": {"v": 1.0, "e": b"e" * 32, "r": b"r" * 16},
    "v_2": {"v": 2, "e": b"e" * 32, "r": b"r" * 16},
    "not_a_map": [1, 2, 3],
    "int_body": 2**63,
    "nil_body": None,
    "not_msgpack": b"\xc1\xc1\xc1",
    "truncated": msgpack.packb({"v": 1, "e": b"e" * 32, "r": b"r" * 16})[:-5],
}
for i, point in enumerate(LOW_ORDER):
    MALFORMED[f"low_order_{i}"] = {"v": 1, "e": point, "r": b"r" * 16}


@integration
def test_malformed_handshakes_get_typed_4xx(open_verifier, psk):
    with httpx.Client(base_url=open_verifier.url, timeout=30.0) as http:
        for name, hello in MALFORMED.items():
            resp = post_hello(http, hello)
            assert resp.status_code == 400, (name, resp.status_code, resp.text[:200])
            assert_typed(resp)
        for point in LOW_ORDER:                            # a PSK holder's hello on a low-order key
            assert_typed(post_hello(http, psk_hello(psk, e=point)))
        assert_typed(post_hello(http, b"\x80" * 2000), (413,), ("payload_too_large",))
        resp = http.post("/v1/handshake", content=b"{}", headers={"content-type": "application/json"})
        assert_typed(resp, (415,), ("unsupported_media",))
        assert post_hello(http, psk_hello(psk)).status_code == 200           # and honest ones still work
        assert post_hello(http, ClientHandshake(server_public=base64.b64decode(open_verifier.public_key)).hello()
                          ).status_code == 200
        assert http.get("/health/ready").status_code == 200
        metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics
    assert not any("Traceback" in line for line in open_verifier.output)


def fuzz_cases(public_key: bytes, psk: bytes, rng: random.Random):
    """Mutations of valid hellos: (body bytes or message, allowed statuses)."""
    junk = [None, True, False, 0, -1, 1, 16, 32, 2**31, 2**40, 2**63, 2**64 - 1, -(2**63), 1.5, float("inf"), "",
            "x" * 32, "x" * 64, [], [b"x"], {}, {"a": 1}, b"", b"\x00" * 15, b"\x00" * 31, b"\x00" * 33, b"\x00" * 64]

    def valid():
        if rng.random() < 0.5:
            return ClientHandshake(server_public=public_key).hello(), False
        return psk_hello(psk), True

    def replace_value():
        hello, is_psk = valid()
        field = rng.choice(list(hello))
        value = hello[field] = rng.choice(junk + [rng.randbytes(rng.randint(0, 64))])
        # Only a value as good as the original can pass: 1 for v, or (static mode) other bytes of the right size.
        fine = (field == "v" and type(value) is int and value == 1) or (
            not is_psk and isinstance(value, bytes) and len(value) == {"e": 32, "r": 16}.get(field))
        return hello, ({200, 400} if fine else {400})

    def drop_field():
        hello, _ = valid()
        field = rng.choice(list(hello))
        del hello[field]
        return hello, ({200} if field == "psk_id" else {400})   # no psk_id: a static-key hello (this verifier has both)

    def extra_field():
        hello, _ = valid()
        hello[rng.choice(["x", "psk", "E", "sid", "confirm", "v2", "e "])] = rng.choice(junk)
        return hello, {400}

    def low_order():
        hello, is_psk = valid()
        point = rng.choice(LOW_ORDER)
        return (psk_hello(psk, e=point) if is_psk else {**hello, "e": point}), {400}

    def flip_key_bits():
        hello, is_psk = valid()
        field = rng.choice(["e", "r", "psk_id"] if is_psk else ["e", "r"])
        value = bytearray(hello[field])
        value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        hello[field] = bytes(value)
        # A static-mode hello with another e or r is just another client (unless the flip made a low-order point).
        return hello, ({400} if is_psk else {200, 400})

    def sniffed_psk_id():
        a, b = psk_hello(psk), psk_hello(psk)
        return dict(b, psk_id=a["psk_id"]), {400}

    def wrong_psk():
        return psk_hello(os.urandom(32)), {400}

    def byte_mutation():
        hello, _ = valid()
        data = bytearray(msgpack.packb(hello, use_bin_type=True))
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            data = data[: rng.randrange(len(data))]
        else:
            data += rng.randbytes(rng.randint(1, 40))
        return bytes(data), {200, 400, 413}

    def random_bytes():
        return rng.randbytes(rng.randint(0, 1100)), {400, 413}

    def nested():
        return b"\x81\xa1a" * rng.randint(1, 600) + b"\xc0", {400, 413}

    def huge_declared():
        return rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                           b"\x83\xa1v\x01\xa1e\xc6\x7f\xff\xff\xff"]), {400}

    def honest():
        hello, _ = valid()
        return hello, {200}

    return [replace_value, drop_field, extra_field, low_order, flip_key_bits, sniffed_psk_id, wrong_psk,
            byte_mutation, random_bytes, nested, huge_declared, honest]


@integration
def test_fuzzed_handshakes_never_answer_500(open_verifier, psk):
    rng = random.Random(20261206)
    public_key = base64.b64decode(open_verifier.public_key)
    proc = psutil.Process(open_verifier.proc.pid)
    table = fuzz_cases(public_key, psk, rng)
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    with httpx.Client(base_url=open_verifier.url, timeout=30.0) as http:
        sessions_before = metric(http.get("/metrics").text, "pipesd_sessions")
        rss_start = proc.memory_info().rss
        for _ in range(N_HANDSHAKES):
            mutate = rng.choice(table)
            hello, allowed = mutate()
            resp = post_hello(http, hello)
            assert resp.status_code in allowed, (mutate.__name__, resp.status_code, resp.text[:200])
            if resp.status_code != 200:
                assert resp.json()["error"]["code"] in ("handshake_failed", "malformed", "payload_too_large")
            counts[mutate.__name__] = counts.get(mutate.__name__, 0) + 1
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        elapsed = time.perf_counter() - t0
        rss_growth = proc.memory_info().rss - rss_start
        assert http.get("/health/ready").status_code == 200
        info = http.get("/v1/info").json()
        metrics = http.get("/metrics").text
    print(f"{N_HANDSHAKES} handshakes in {elapsed:.1f} s: {statuses}")
    assert len(counts) == len(table) and sum(statuses.values()) == N_HANDSHAKES
    assert 'status="500"' not in metrics
    # Thousands of answered handshakes, not one session: none of them sealed a frame.
    assert info["pending_handshakes"] <= 1024 and metric(metrics, "pipesd_sessions") == sessions_before
    assert rss_growth < 100 << 20, f"verifier memory grew by {rss_growth >> 20} MiB"


@integration
def test_replayed_psk_id_creates_no_state(open_verifier, psk):
    """What 'accepted 300 of 300' was: the old verifier answered a sniffed id replayed with fresh
    ephemerals with a ServerHello and a session entry each time (unusable without the PSK, but each one
    evicting an honest session). Now such replays are refused at once; even an exact replay of a whole
    sniffed hello gets only a pending handshake, never a session."""
    with httpx.Client(base_url=open_verifier.url, timeout=30.0) as http:
        info = http.get("/v1/info").json()
        honest = ClientHandshake(psk=psk)
        hello = honest.hello()
        resp = post_hello(http, hello)
        assert resp.status_code == 200
        edge = honest.finish(msgpack.unpackb(resp.content))
        opened = http.post("/v1/frames", content=edge.seal(FrameType.OPEN, OpenSession(
            info["vocab_fingerprint"], info["vocab_size"]).to_dict()), headers={"content-type": FRAME})
        assert opened.status_code == 200
        before = http.get("/metrics").text
        pending_before = http.get("/v1/info").json()["pending_handshakes"]
        for _ in range(300):        # the sniffed id on the attacker's own ephemeral keys
            fresh = ClientHandshake(psk=os.urandom(32)).hello()
            assert_typed(post_hello(http, {**fresh, "psk_id": hello["psk_id"]}), codes=("handshake_failed",))
        assert http.get("/v1/info").json()["pending_handshakes"] == pending_before
        replies = [post_hello(http, hello) for _ in range(20)]     # the whole hello, byte for byte
        assert all(r.status_code == 200 for r in replies)
        for r in replies:           # the replayer cannot seal a frame; a forged one changes nothing
            sid = msgpack.unpackb(r.content)["sid"]
            forged = b"PS\x01\x01\x00" + sid + (1).to_bytes(8, "big") + bytes(8) + os.urandom(40)
            resp = http.post("/v1/frames", content=forged, headers={"content-type": FRAME})
            assert resp.status_code == 401
        after = http.get("/metrics").text
    for name in ("pipesd_sessions", "pipesd_sessions_opened_total"):
        assert metric(after, name) == metric(before, name), name


@integration
def test_handshake_rate_limits_answer_429_with_retry_after(limited_verifier):
    url = limited_verifier.url
    key = base64.b64decode(limited_verifier.public_key)
    with from_address(url, "127.0.1.9", timeout=30.0) as http:
        statuses = [post_hello(http, ClientHandshake(server_public=key).hello()).status_code for _ in range(14)]
        assert statuses[:10] == [200] * 10 and 429 in statuses[10:], statuses
        resp = post_hello(http, ClientHandshake(server_public=key).hello())
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "overloaded"
        assert int(resp.headers["retry-after"]) >= 1
    with from_address(url, "127.0.1.10", timeout=30.0) as http:      # per client: its affinity token
        token = {AFFINITY_HEADER: "a1b2c3d4e5f60718"}
        statuses = [post_hello(http, ClientHandshake(server_public=key).hello(), token).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429], statuses
        other = post_hello(http, ClientHandshake(server_public=key).hello(), {AFFINITY_HEADER: "ffffffffffffffff"})
        assert other.status_code == 200                               # another client behind the same IP


@integration
def test_handshake_flood_never_evicts_an_honest_session(limited_verifier):
    """Flooders on four other loopback addresses send handshakes while an honest client generates. The verifier holds 4 sessions and 8 pending handshakes: the
    old design evicted the honest session after 4 flood handshakes. Now the honest session stays, its
    text equals the target's own greedy text, and every flood 429 carries Retry-After."""
    from edge_sdk import EdgeClient

    from .conftest import PROMPTS

    url = limited_verifier.url
    key = base64.b64decode(limited_verifier.public_key)
    prompts, max_new = PROMPTS[:3], 32
    with EdgeClient(url, verifier_key=limited_verifier.public_key, threads=1) as client:
        reference = {p: client.generate(p, max_new_tokens=max_new, mode="cloud_only").tokens for p in prompts}
        before = httpx.get(url + "/metrics").text
        stop = threading.Event()
        tally = {"200": 0, "429": 0, "other": [], "no_retry_after": 0}
        lock = threading.Lock()

        def flood(address: str):
            with from_address(url, address, timeout=10.0) as http:
                while not stop.is_set():
                    # A fresh affinity token every time: only the IP's bucket holds the flood back.
                    resp = post_hello(http, ClientHandshake(server_public=key).hello(),
                                      {AFFINITY_HEADER: os.urandom(8).hex()})
                    with lock:
                        if resp.status_code == 200:
                            tally["200"] += 1
                        elif resp.status_code == 429:
                            tally["429"] += 1
                            tally["no_retry_after"] += "retry-after" not in resp.headers
                        else:
                            tally["other"].append(resp.status_code)

        threads = [threading.Thread(target=flood, args=(f"127.0.0.{2 + k}",), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while tally["200"] < 16 and time.monotonic() < deadline:   # the tables overflow before the rounds start
                time.sleep(0.02)
            results = {p: client.generate(p, max_new_tokens=max_new, mode="pipesd") for p in prompts}
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        after = httpx.get(url + "/metrics").text
    for p in prompts:
        assert results[p].tokens == reference[p], f"diverged from target greedy on {p!r}"
    assert tally["200"] > 8 and not tally["other"], tally          # more handshakes than the tables hold
    assert tally["429"] > 0 and tally["no_retry_after"] == 0, tally
    # The honest client's session was opened once, before the flood, and never lost.
    assert metric(after, "pipesd_sessions_opened_total") == metric(before, "pipesd_sessions_opened_total") == 1
    assert metric(after, "pipesd_session_evictions_total", reason="sessions") == 0
    # No frame of the honest client met "unknown session" (the flood sends no frames at all).
    assert metric(after, "pipesd_rejections_total", cause="unauthenticated") == metric(
        before, "pipesd_rejections_total", cause="unauthenticated")
    assert metric(after, "pipesd_handshakes_unproven_total") > 0      # the flood churned only the pending table
    assert 'status="500"' not in after


def test_an_edge_whose_handshake_was_pushed_out_handshakes_once_more(limited_verifier):
    """A flood fills the table of handshakes not yet proven (8 here) between an honest edge's handshake and
    its OPEN: the OPEN meets 401, and the edge handshakes once more instead of failing the generation."""
    from edge_sdk import EdgeClient

    from .conftest import PROMPTS

    url, key = limited_verifier.url, base64.b64decode(limited_verifier.public_key)
    with EdgeClient(url, verifier_key=limited_verifier.public_key, threads=1) as client:
        transport = client.engine.cloud.verifier
        handshake, calls = transport._handshake, []

        def pushed_out_once():
            handshake()
            calls.append(1)
            if len(calls) == 1:          # 9 strangers' handshakes after ours: the table keeps the last 8
                with from_address(url, "127.0.0.9", timeout=10.0) as http:
                    for _ in range(9):
                        assert post_hello(http, ClientHandshake(server_public=key).hello()).status_code == 200

        transport._handshake = pushed_out_once
        before = httpx.get(url + "/metrics").text
        result = client.generate(PROMPTS[0], max_new_tokens=8, mode="cloud_only")
        after = httpx.get(url + "/metrics").text
    assert len(calls) == 2 and result.stats.unverified_tokens == 0 and len(result.tokens) == 8
    assert metric(after, "pipesd_sessions_opened_total") == metric(before, "pipesd_sessions_opened_total") + 1


@integration
def test_service_makes_a_session_only_after_a_sealed_frame():
    """In-process: 100 handshakes against 2 sessions and 4 pending slots leave both sessions in place; a
    pushed-out handshake's OPEN is 401 (its edge handshakes again); a frame forged for a pending session id
    makes nothing; a pending handshake expires after handshake_ttl_s."""
    import pipesd_models
    from cloud_verifier import VerifierService, VerifierSettings
    from cloud_verifier.target import TorchTarget
    from privacy import SecureChannel, VerifyRequest

    target = TorchTarget(pipesd_models.target_path(), threads=1)
    key = StaticKey.generate()
    service = VerifierService(target, VerifierSettings(max_sessions=2, max_pending_handshakes=4, handshake_ttl_s=0.3),
                              static_key=key)

    def handshake():
        hs = ClientHandshake(server_public=key.public_bytes)
        return hs.finish(service.handshake(hs.hello()))

    def send(ch, ftype, body):
        return service.handle_frame(ch.seal(ftype, body))[0]

    opening = OpenSession(service.fingerprint, target.vocab_size).to_dict()
    honest = [handshake() for _ in range(2)]
    assert not service.sessions and len(service.pending) == 2          # nothing before proof
    assert all(send(ch, FrameType.OPEN, opening) == 200 for ch in honest)
    assert len(service.sessions) == 2 and not service.pending
    late = handshake()
    for _ in range(100):
        service.handshake(ClientHandshake(server_public=key.public_bytes).hello())
    assert len(service.sessions) == 2 and len(service.pending) == 4
    with pytest.raises(WireError) as err:
        send(late, FrameType.OPEN, opening)
    assert err.value.code is ErrorCode.UNAUTHENTICATED
    for ch in honest:
        assert send(ch, FrameType.VERIFY, VerifyRequest(0, (0, 1, 2), ()).to_dict()) == 200
    sid = next(iter(service.pending))
    forged = SecureChannel(sid, os.urandom(32), os.urandom(32), is_client=True)
    with pytest.raises(WireError) as err:
        send(forged, FrameType.OPEN, opening)
    assert err.value.code is ErrorCode.UNAUTHENTICATED and sid in service.pending and len(service.sessions) == 2
    assert service.metrics.evictions.labels("sessions")._value.get() == 0
    slow = handshake()
    time.sleep(0.4)
    with pytest.raises(WireError):
        send(slow, FrameType.OPEN, opening)
    assert not service.pending or all(t > time.monotonic() - 0.3 for _, t in service.pending.values())


# -- handshakes have an in-flight bound of their own ------------------------------------------------
def test_light_calls_take_no_batch_slot_and_run_after_the_cycles_passes():
    """The model worker runs handshakes (light calls) in the cycle they find, after the frames' work,
    and they take none of the ``max_batch`` slots: a frame never waits behind a handshake."""
    from cloud_verifier.batching import ModelWorker

    worker = ModelWorker(max_batch=1, max_wait_s=0.0, in_flight=lambda: 0)
    try:
        gate, ran = threading.Event(), []
        busy = worker.submit(gate.wait, 10)
        while not busy.running():
            time.sleep(0.001)
        queued = [worker.submit(ran.append, f"handshake {i}", light=True) for i in range(3)]
        queued += [worker.submit(ran.append, "frame"), worker.submit(ran.append, "next frame")]
        gate.set()
        for f in queued:
            f.result(timeout=10)
        # One cycle: the frame (its one slot), then the handshakes; the next frame needed the next cycle.
        assert ran == ["frame", "handshake 0", "handshake 1", "handshake 2", "next frame"]
    finally:
        worker.stop()


def test_handshakes_have_an_in_flight_bound_of_their_own():
    """Load benchmark: /v1/handshake counted against the frames' ``max_in_flight``, so a handshake flood
    got honest rounds refused (429). Now, with the model worker busy and every handshake slot taken
    (``max_handshakes_in_flight``), the next handshake is refused -- its 429 names the expected wait in
    fractional seconds -- while an established session's frame is still admitted, and runs before the
    queued handshakes."""
    import asyncio

    from cloud_verifier import VerifierSettings
    from cloud_verifier.app import VerifierApp
    from pipesd_lab.toy import ToyTarget, toy_pair
    from privacy import VerifyRequest

    from .test_verifier_limits import open_in_app

    key = StaticKey.generate()
    state = VerifierApp(lambda: ToyTarget(toy_pair()[0]),
                        VerifierSettings(max_in_flight=2, max_handshakes_in_flight=3), key, None)
    state.load()

    async def scenario():
        ch = await open_in_app(state, key)
        gate, done = threading.Event(), []
        busy = state.worker.submit(gate.wait, 10)          # the model worker is busy: everything queues
        while not busy.running():
            await asyncio.sleep(0.001)

        async def hello():
            h = ClientHandshake(server_public=key.public_bytes)
            h.finish(await state.handshake(h.hello()))
            done.append("handshake")

        async def frame():
            req = VerifyRequest(0, (0, 1, 2), ())
            done.append(("frame", (await state.in_order(ch.seal(FrameType.VERIFY, req.to_dict())))[0]))

        flood = [asyncio.create_task(hello()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert state.handshaking == 3 and state.in_flight == 0
        with pytest.raises(WireError) as refused:
            await state.handshake(ClientHandshake(server_public=key.public_bytes).hello())
        assert refused.value.code is ErrorCode.OVERLOADED
        assert 0.05 <= refused.value.details["retry_after_s"] <= 1.0
        honest = asyncio.create_task(frame())
        await asyncio.sleep(0.01)
        assert state.in_flight == 1                        # admitted: the handshakes hold none of its slots
        gate.set()
        await asyncio.wait_for(asyncio.gather(honest, *flood), 10)
        assert done == [("frame", 200)] + ["handshake"] * 3
        assert state.handshaking == 0 and state.in_flight == 0

    try:
        asyncio.run(scenario())
    finally:
        state.worker.stop()
