"""The verifier core in-process (real target, real channel, no HTTP): session cache bounds."""

import time

import pytest

import pipesd_models
from cloud_verifier import VerifierService, VerifierSettings
from cloud_verifier.target import TorchTarget
from privacy import (
    ClientHandshake,
    ErrorCode,
    FrameType,
    OpenSession,
    StaticKey,
    VerifyRequest,
    WireError,
    prefix_hash,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def target():
    return TorchTarget(pipesd_models.target_path(), threads=1)


def make(target, **settings):
    key = StaticKey.generate()
    return VerifierService(target, VerifierSettings(**settings), static_key=key), key


def connect(service, key):
    hs = ClientHandshake(server_public=key.public_bytes)
    ch = hs.finish(service.handshake(hs.hello()))
    status, reply, _ = service.handle_frame(ch.seal(FrameType.OPEN, OpenSession(service.fingerprint,
                                                                              service.target.vocab_size).to_dict()))
    assert status == 200
    return ch


def nav(service, ch, req):
    status, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, req.to_dict()))
    return status, ch.open(reply)[1]


def test_round_and_continuation(target):
    service, key = make(target)
    ch = connect(service, key)
    status, first = nav(service, ch, VerifyRequest(0, (0, 11, 12, 13), (14, 15)))
    assert status == 200
    committed = [0, 11, 12, 13] + [14, 15][: first["accepted"]] + [first["token"]]
    assert first["committed_len"] == len(committed)
    status, second = nav(service, ch, VerifyRequest(len(committed), (), (), prefix_hash(committed)))
    assert status == 200 and second["committed_len"] == len(committed) + 1


def test_lru_eviction_by_session_count(target):
    service, key = make(target, max_sessions=2)
    a, b = connect(service, key), connect(service, key)
    nav(service, a, VerifyRequest(0, (0, 1), ()))       # a becomes the most recently used
    connect(service, key)                               # evicts b, the least recently used
    with pytest.raises(WireError) as err:
        service.handle_frame(b.seal(FrameType.VERIFY, VerifyRequest(0, (0, 1), ()).to_dict()))
    assert err.value.code is ErrorCode.UNAUTHENTICATED
    assert nav(service, a, VerifyRequest(0, (0, 1), ()))[0] == 200


def test_a_frame_whose_session_was_dropped_while_it_waited_is_refused(target):
    """An early frame waits (authenticated) for its predecessors; if the session is evicted meanwhile,
    dispatching it answers unauthenticated (the edge handshakes again) and frees nothing twice."""
    service, key = make(target)
    ch = connect(service, key)
    nav(service, ch, VerifyRequest(0, (0, 1, 2), ()))
    ch.seal(FrameType.VERIFY, VerifyRequest(0, (0, 1), ()).to_dict())          # a frame that never arrives
    early = service.open_and_dispatch(ch.seal(FrameType.VERIFY, VerifyRequest(0, (0, 1), ()).to_dict()))
    assert type(early).__name__ == "Early"
    service._drop(early.header.session_id, "memory")
    with pytest.raises(WireError) as err:
        service.dispatch(early.session, early.header, early.body)
    assert err.value.code is ErrorCode.UNAUTHENTICATED
    assert not service.target.pool.holds(early.session.state)


def test_eviction_by_cached_tokens(target):
    service, key = make(target, max_cached_tokens=100)
    old, new = connect(service, key), connect(service, key)
    nav(service, old, VerifyRequest(0, tuple(range(60)), ()))
    nav(service, new, VerifyRequest(0, tuple(range(70)), ()))   # 60 + 70 cached > 100: old goes
    assert service._cached_tokens() <= 100 and len(service.sessions) == 1
    assert service.metrics.evictions.labels("memory")._value.get() == 1


def test_idle_sessions_expire(target):
    service, key = make(target, session_ttl_s=0.05)
    ch = connect(service, key)
    time.sleep(0.1)
    with pytest.raises(WireError) as err:
        service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(0, (0, 1), ()).to_dict()))
    assert err.value.code is ErrorCode.UNAUTHENTICATED


def test_new_generation_reuses_the_cached_prefix(target):
    service, key = make(target)
    ch = connect(service, key)
    nav(service, ch, VerifyRequest(0, tuple(range(40)), ()))
    state = next(iter(service.sessions.values())).state
    cache = state.cache
    nav(service, ch, VerifyRequest(0, tuple(range(30)) + (99, 98), ()))   # a new prompt sharing 30 tokens
    assert state.cache is cache and state.tokens[:30] == list(range(30))


@pytest.mark.parametrize("eager", [True, False])
def test_round_in_batches_equals_round_in_one_piece(target, eager):
    """Batches staged before the final give the same NAV result as the whole draft at once."""
    prompt, draft = (0, 21, 22, 23, 24), (25, 26, 27, 28, 29, 30)
    whole_service, key = make(target)
    ch = connect(whole_service, key)
    _, whole = nav(whole_service, ch, VerifyRequest(0, prompt, draft))

    service, key = make(target, eager_forward=eager)
    ch = connect(service, key)
    status, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(
        0, prompt, draft[:2], round=7, offset=0, final=False).to_dict()))
    assert status == 200 and ch.open(reply)[1] == {"round": 7, "staged": True, "held": 2}
    # Later batches of the round name the same base as its first batch (here: 0 tokens + append).
    status, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(
        0, (), draft[2:5], round=7, offset=2, final=False).to_dict()))
    assert ch.open(reply)[1]["held"] == 5
    _, split = nav(service, ch, VerifyRequest(0, (), draft[5:], round=7, offset=5))
    assert {k: split[k] for k in ("accepted", "token", "committed_len")} == \
        {k: whole[k] for k in ("accepted", "token", "committed_len")}


def test_out_of_order_or_stale_batches_are_refused_without_harm(target):
    service, key = make(target)
    ch = connect(service, key)
    prompt = (0, 31, 32, 33)
    service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(0, prompt, (34,), round=1, final=False).to_dict()))
    # A batch claiming offset 3 of round 1 (only 1 token held): refused, round 1 untouched.
    _, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(
        len(prompt), (), (35,), prefix_hash(prompt), round=1, offset=3, final=False).to_dict()))
    assert ch.open(reply)[1] == {"round": 1, "staged": False, "held": 1}
    # A speculative next round built on a prefix the verifier does not hold: refused.
    _, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(
        9, (), (36,), prefix_hash(range(9)), round=2, offset=0, final=False).to_dict()))
    assert ch.open(reply)[1]["staged"] is False
    # A final that does not fit asks for a resync; the staged round still completes afterwards.
    status, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(
        len(prompt), (), (37,), prefix_hash(prompt), round=1, offset=4).to_dict()))
    assert status == 409 and ch.open(reply)[1]["error"]["code"] == "resync"
    status, done = nav(service, ch, VerifyRequest(0, (), (35,), round=1, offset=1))
    assert status == 200 and done["committed_len"] == len(prompt) + done["accepted"] + 1
