"""Bad input against the real verifier process: a typed 4xx with a machine-readable code, never a 500."""

import httpx
import msgpack
import pytest

from privacy import OpenSession, VerifyRequest, encode, pack_tokens


@pytest.fixture(scope="module")
def http(verifier):
    with httpx.Client(base_url=verifier.url, headers={"content-type": "application/msgpack"}) as c:
        yield c


@pytest.fixture(scope="module")
def info(http):
    return http.get("/v1/info").json()


@pytest.fixture()
def session(http, info):
    resp = http.post("/v1/sessions", content=encode(OpenSession(info["vocab_fingerprint"], info["vocab_size"]).to_dict()))
    assert resp.status_code == 200
    return msgpack.unpackb(resp.content)["session_id"]


def verify(http, session, **fields):
    body = {"base_len": 0, "append": pack_tokens([0, 5, 6]), "draft": pack_tokens([7]), **fields}
    return http.post(f"/v1/sessions/{session}/verify", content=msgpack.packb(body))


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == code
    assert "Traceback" not in resp.text


def test_health(http):
    assert http.get("/health/live").json()["status"] == "live"
    assert http.get("/health/ready").json()["status"] == "ready"


def test_valid_round(http, session):
    resp = verify(http, session)
    assert resp.status_code == 200
    body = msgpack.unpackb(resp.content)
    assert 0 <= body["accepted"] <= 1 and body["committed_len"] == 3 + body["accepted"] + 1


def test_unknown_session(http):
    assert_error(verify(http, "no-such-session"), 404, "unknown_session")


def test_close_unknown_session(http):
    assert_error(http.delete("/v1/sessions/nope"), 404, "unknown_session")


@pytest.mark.parametrize("body", [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2]),
                                  msgpack.packb({"base_len": 0})])
def test_malformed_body(http, session, body):
    assert_error(http.post(f"/v1/sessions/{session}/verify", content=body), 400, "malformed")


def test_wrong_content_type(http, session):
    resp = http.post(f"/v1/sessions/{session}/verify", content=b"{}", headers={"content-type": "application/json"})
    assert_error(resp, 415, "unsupported_media")


def test_draft_too_long(http, session, info):
    assert_error(verify(http, session, draft=pack_tokens([1] * (info["max_draft"] + 1))), 422, "draft_too_long")


def test_bad_token_id(http, session, info):
    assert_error(verify(http, session, draft=pack_tokens([info["vocab_size"]])), 422, "bad_token_id")
    assert_error(verify(http, session, append=pack_tokens([0, 2**32 - 1])), 422, "bad_token_id")


def test_context_overflow(http, session, info):
    assert_error(verify(http, session, append=pack_tokens([1] * info["max_context"])), 422, "context_overflow")


def test_empty_prefix(http, session):
    assert_error(verify(http, session, append=b"", draft=b""), 400, "malformed")


def test_resync_when_prefix_length_disagrees(http, session):
    assert verify(http, session).status_code == 200
    resp = verify(http, session, base_len=2)
    assert_error(resp, 409, "resync")
    assert resp.json()["error"]["committed_len"] > 2


def test_payload_too_large(http, session):
    resp = http.post(f"/v1/sessions/{session}/verify", content=b"\x00" * (2 << 20))
    assert_error(resp, 413, "payload_too_large")


def test_vocab_mismatch_refused_by_verifier(http, info):
    resp = http.post("/v1/sessions", content=encode(OpenSession("0" * 32, info["vocab_size"]).to_dict()))
    assert_error(resp, 409, "vocab_mismatch")


def test_unknown_route_and_method(http):
    assert http.get("/v2/nothing").status_code == 404
    assert http.get("/v1/sessions").status_code == 405


def test_server_healthy_after_bad_input(http):
    assert http.get("/health/ready").status_code == 200
