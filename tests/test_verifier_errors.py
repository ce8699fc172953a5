"""Bad input against the real verifier process: typed errors, never a 500, no detail leaked before auth."""

import base64
import os
import threading

import httpx
import msgpack
import pytest

from cloud_verifier import LocalVerifier
from privacy import ClientHandshake, FrameType, OpenSession, pack_tokens, prefix_hash
from privacy.channel import MAGIC, Header

pytestmark = pytest.mark.integration

FRAME = "application/x-pipesd-frame"


@pytest.fixture(scope="module")
def http(verifier):
    with httpx.Client(base_url=verifier.url) as c:
        yield c


@pytest.fixture(scope="module")
def info(http):
    return http.get("/v1/info").json()


def handshake(http, public_key: str):
    hs = ClientHandshake(server_public=base64.b64decode(public_key))
    resp = http.post("/v1/handshake", content=msgpack.packb(hs.hello()), headers={"content-type": "application/msgpack"})
    assert resp.status_code == 200
    return hs.finish(msgpack.unpackb(resp.content))


def send(http, channel, ftype, body):
    """Seal and post one frame; return (status, reply type, reply body)."""
    resp = http.post("/v1/frames", content=channel.seal(ftype, body), headers={"content-type": FRAME})
    assert resp.headers["content-type"].startswith(FRAME), resp.text
    header, msg = channel.open(resp.content)
    return resp.status_code, header.type, msg


@pytest.fixture()
def channel(http, verifier, info):
    ch = handshake(http, verifier.public_key)
    status, ftype, _ = send(http, ch, FrameType.OPEN, OpenSession(info["vocab_fingerprint"], info["vocab_size"]).to_dict())
    assert status == 200 and ftype == FrameType.OPENED
    return ch


def verify(http, channel, **fields):
    body = {"base_len": 0, "prefix_hash": b"", "append": pack_tokens([0, 5, 6]), "draft": pack_tokens([7]), **fields}
    return send(http, channel, FrameType.VERIFY, body)


def assert_sealed_error(reply, status, code):
    got_status, ftype, msg = reply
    assert (got_status, ftype) == (status, FrameType.ERROR), msg
    assert msg["error"]["code"] == code


def assert_plain_error(resp, status, code):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == code
    assert "Traceback" not in resp.text


def post_frame(http, frame):
    return http.post("/v1/frames", content=frame, headers={"content-type": FRAME})


def test_health_and_info(http, info):
    assert http.get("/health/live").json()["status"] == "live"
    assert http.get("/health/ready").json()["status"] == "ready"
    assert info["vocab_size"] > 0 and len(info["public_key"]) == 44


def test_valid_round(http, channel):
    status, ftype, msg = verify(http, channel)
    assert (status, ftype) == (200, FrameType.RESULT)
    assert 0 <= msg["accepted"] <= 1 and msg["committed_len"] == 3 + msg["accepted"] + 1


# -- before authentication: plain JSON, a code, no detail --------------------------------------
def test_unknown_session(http):
    frame = Header(FrameType.VERIFY, 0, os.urandom(16), 1, 0).pack() + os.urandom(32)
    assert_plain_error(post_frame(http, frame), 401, "unauthenticated")


def test_tampered_frame(http, channel):
    frame = bytearray(channel.seal(FrameType.VERIFY, {"base_len": 0}))
    frame[-1] ^= 1
    assert_plain_error(post_frame(http, bytes(frame)), 401, "unauthenticated")


def test_tampered_header_fails_authentication(http, channel):
    frame = bytearray(channel.seal(FrameType.VERIFY, {"base_len": 0}))
    frame[3] = FrameType.CLOSE          # the type byte is associated data
    assert_plain_error(post_frame(http, bytes(frame)), 401, "unauthenticated")


def test_replayed_frame(http, channel):
    frame = channel.seal(FrameType.VERIFY, {"base_len": 0, "prefix_hash": b"", "append": pack_tokens([0, 1]),
                                            "draft": b""})
    assert post_frame(http, frame).status_code == 200
    assert_plain_error(post_frame(http, frame), 403, "replay")


@pytest.mark.parametrize("mutate", [
    lambda f: b"XX" + f[2:],                                   # magic
    lambda f: f[:2] + bytes([9]) + f[3:],                      # version
    lambda f: f[:3] + bytes([200]) + f[4:],                    # type
    lambda f: f[:4] + bytes([0x80]) + f[5:],                   # unknown flag
    lambda f: f[:20],                                          # truncated header
])
def test_bad_frame_layout(http, channel, mutate):
    assert_plain_error(post_frame(http, mutate(channel.seal(FrameType.VERIFY, {}))), 400, "bad_frame")


def test_wrong_content_type(http, channel):
    resp = http.post("/v1/frames", content=channel.seal(FrameType.VERIFY, {}), headers={"content-type": "text/plain"})
    assert_plain_error(resp, 415, "unsupported_media")


def test_frame_too_large(http):
    assert_plain_error(post_frame(http, MAGIC + b"\x00" * (2 << 20)), 413, "payload_too_large")


@pytest.mark.parametrize("hello", [{}, {"v": 1}, {"v": 1, "e": b"short", "r": b"x" * 16}, {"v": 2, "e": b"x" * 32}])
def test_bad_handshake(http, hello):
    resp = http.post("/v1/handshake", content=msgpack.packb(hello), headers={"content-type": "application/msgpack"})
    assert_plain_error(resp, 400, "handshake_failed")


def test_handshake_with_psk_the_verifier_does_not_have(http):
    hello = ClientHandshake(psk=b"k" * 32).hello()
    resp = http.post("/v1/handshake", content=msgpack.packb(hello), headers={"content-type": "application/msgpack"})
    assert_plain_error(resp, 400, "handshake_failed")


# -- after authentication: sealed errors -------------------------------------------------------
def test_malformed_body(http, channel):
    assert_sealed_error(send(http, channel, FrameType.VERIFY, {"base_len": "zero"}), 400, "malformed")


def test_verify_before_open(http, verifier):
    ch = handshake(http, verifier.public_key)
    assert_sealed_error(verify(http, ch), 400, "malformed")


def test_vocab_mismatch(http, verifier, info):
    ch = handshake(http, verifier.public_key)
    assert_sealed_error(send(http, ch, FrameType.OPEN, OpenSession("0" * 32, info["vocab_size"]).to_dict()),
                        409, "vocab_mismatch")


def test_draft_too_long(http, channel, info):
    assert_sealed_error(verify(http, channel, draft=pack_tokens([1] * (info["max_draft"] + 1))), 422, "draft_too_long")


def test_bad_token_id(http, channel, info):
    assert_sealed_error(verify(http, channel, draft=pack_tokens([info["vocab_size"]])), 422, "bad_token_id")
    assert_sealed_error(verify(http, channel, append=pack_tokens([0, 2**32 - 1])), 422, "bad_token_id")


def test_context_overflow(http, channel, info):
    assert_sealed_error(verify(http, channel, append=pack_tokens([1] * info["max_context"])), 422, "context_overflow")


def test_empty_prefix(http, channel):
    assert_sealed_error(verify(http, channel, append=b"", draft=b""), 400, "malformed")


def test_resync_on_length_or_hash_mismatch(http, channel):
    status, _, msg = verify(http, channel)
    committed_len = msg["committed_len"]
    wrong_len = verify(http, channel, base_len=2, prefix_hash=b"\x00" * 16, append=b"")
    assert_sealed_error(wrong_len, 409, "resync")
    assert wrong_len[2]["error"]["committed_len"] == committed_len
    wrong_hash = verify(http, channel, base_len=committed_len, prefix_hash=prefix_hash([1] * committed_len),
                        append=b"")
    assert_sealed_error(wrong_hash, 409, "resync")


def test_close_then_frames_are_unauthenticated(http, channel):
    status, ftype, _ = send(http, channel, FrameType.CLOSE, {})
    assert (status, ftype) == (200, FrameType.CLOSED)
    assert_plain_error(post_frame(http, channel.seal(FrameType.VERIFY, {})), 401, "unauthenticated")


def test_unknown_route_and_method(http):
    assert http.get("/v2/nothing").status_code == 404
    assert http.get("/v1/frames").status_code == 405


def test_metrics_count_what_happened(http, channel):
    verify(http, channel)
    text = http.get("/metrics").text
    for name in ("pipesd_nav_rounds_total", "pipesd_draft_tokens_total", "pipesd_accepted_tokens_total",
                 "pipesd_resyncs_total", "pipesd_rejections_total", "pipesd_nav_seconds_bucket",
                 "pipesd_request_seconds_bucket", "pipesd_sessions"):
        assert name in text
    rounds = [line for line in text.splitlines() if line.startswith("pipesd_nav_rounds_total ")]
    assert float(rounds[0].split()[1]) >= 1
    assert 'pipesd_rejections_total{cause="unauthenticated"}' in text


def test_overload_answers_429_with_retry_after():
    """One request in flight at most, beyond each established session's own one: a burst of slow rounds
    gets 429 + Retry-After for a session's extra requests, while every session's first goes through (the
    bound sheds extra work; it never starves a session)."""
    with LocalVerifier(model="embedded", threads=1, extra_args=["--max-in-flight", "1"]) as v, \
            httpx.Client(base_url=v.url) as http:
        info = http.get("/v1/info").json()
        channels = []
        for _ in range(3):
            ch = handshake(http, v.public_key)
            send(http, ch, FrameType.OPEN, OpenSession(info["vocab_fingerprint"], info["vocab_size"]).to_dict())
            channels.append(ch)
        statuses: dict[int, list[int]] = {i: [] for i in range(len(channels))}
        retry_after = []
        frames = [(i, ch.seal(FrameType.VERIFY, {"base_len": 0, "prefix_hash": b"", "draft": pack_tokens([1, 2, 3]),
                                                 "append": pack_tokens([0] + list(range(1, 400)))}))
                  for i, ch in enumerate(channels) for _ in range(4)]

        def burst(i, frame):
            with httpx.Client(base_url=v.url) as c:
                resp = c.post("/v1/frames", content=frame, headers={"content-type": FRAME})
            statuses[i].append(resp.status_code)
            if resp.status_code == 429:
                retry_after.append(resp.headers.get("retry-after"))

        threads = [threading.Thread(target=burst, args=f) for f in frames]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        everything = [s for per in statuses.values() for s in per]
        assert 429 in everything and all(200 in per for per in statuses.values()), statuses
        # The same session's extra rounds name a base it no longer holds once the first ran: 409 resync.
        assert set(everything) <= {200, 409, 429} and retry_after and all(r == "1" for r in retry_after)
        assert http.get("/health/ready").status_code == 200


def test_batch_too_large(http, channel):
    assert_sealed_error(verify(http, channel, append=pack_tokens([1] * 5000)), 422, "batch_too_large")


def test_no_token_content_in_verifier_logs():
    """Even at debug level the verifier logs no prompt text and no token ids."""
    from edge_sdk import EdgeClient

    secret = "def zanzibar_quux_secret(parameter):\n"
    with LocalVerifier(model="embedded", threads=1, extra_args=["--log-level", "debug"]) as v:
        with EdgeClient(v.url, verifier_key=v.public_key, threads=1) as client:
            ids = client.tokenize(secret)
            client.generate(secret, max_new_tokens=8)
        log = "\n".join(v.output)
    assert "zanzibar" not in log and "parameter" not in log
    assert str(ids[1:6])[1:-1] not in log


def _sampled(**over):
    """A sampled VERIFY body for draft [7]: q over {7, 8}, T = 0.8, then `over` replaces fields."""
    import numpy as np

    body = {"s": {"t": 0.8, "k": 0, "p": 1.0, "seed": 1}, "q_n": pack_tokens([2]), "q_ids": pack_tokens([7, 8]),
            "q_p": np.array([0.75, 0.25], "<f2").tobytes()}
    body.update(over)
    return body


def test_sampled_round_is_verified(http, channel):
    status, ftype, msg = verify(http, channel, **_sampled())
    assert (status, ftype) == (200, FrameType.RESULT), msg
    assert msg["accepted"] in (0, 1)


def test_malformed_sampling_blocks(http, channel, info):
    import numpy as np

    vocab = info["vocab_size"]
    cases = [
        (_sampled(q_ids=pack_tokens([7, vocab + 5])), 422, "bad_token_id"),            # q outside the vocabulary
        (_sampled(q_ids=pack_tokens([7, 2**32 - 1])), 422, "bad_token_id"),
        (_sampled(q_ids=pack_tokens([8, 9])), 400, "malformed"),                        # draft token outside its q
        (_sampled(q_n=pack_tokens([3])), 400, "malformed"),                             # sizes disagree
        (_sampled(q_n=pack_tokens([1, 1])), 400, "malformed"),                          # q rows != draft tokens
        (_sampled(q_p=np.array([np.inf, 0.25], "<f2").tobytes()), 400, "malformed"),
        (_sampled(q_p=np.array([-0.5, 0.25], "<f2").tobytes()), 400, "malformed"),
        (_sampled(q_p=np.array([0, 0], "<f2").tobytes()), 400, "malformed"),            # no mass
        (_sampled(q_ids=pack_tokens([7, 7])), 400, "malformed"),                        # repeated id
        (_sampled(s={"t": -1.0, "k": 0, "p": 1.0, "seed": 1}), 400, "malformed"),
        (_sampled(s={"t": 0.0, "k": 0, "p": 1.0, "seed": 1}), 400, "malformed"),        # greedy needs no block
        (_sampled(s={"t": 0.8, "k": 0, "p": 1.5, "seed": 1}), 400, "malformed"),
        (_sampled(s={"t": 0.8, "k": 0, "p": 1.0}), 400, "malformed"),                   # seed missing
        (_sampled(s="hot"), 400, "malformed"),
    ]
    for body, status, code in cases:
        assert_sealed_error(verify(http, channel, **body), status, code)
