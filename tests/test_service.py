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


def _opened(service, key):
    """A new session's OPENED reply (sealed), for what the verifier says of itself."""
    hs = ClientHandshake(server_public=key.public_bytes)
    ch = hs.finish(service.handshake(hs.hello()))
    _, reply, _ = service.handle_frame(ch.seal(FrameType.OPEN, OpenSession(service.fingerprint,
                                                                          service.target.vocab_size).to_dict()))
    return ch, reply


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


def test_a_failed_conditional_round_after_the_last_answer_is_answered_rebased(target):
    """Pipelined NAV: a conditional round whose assumption failed, drafted on the round answered last,
    is answered as an empty round on what the verifier holds (the target's next token); any other
    failed conditional round is dropped (resync), and a verifier with ``rebase=False`` drops them all."""
    service, key = make(target)
    ch = connect(service, key)
    prompt = (0, 41, 42, 43)
    status, first = nav(service, ch, VerifyRequest(0, prompt, (), round=1))
    committed = list(prompt) + [first["token"]]
    wrong = (first["token"] + 1) % service.target.vocab_size
    # Round 2 assumed the target's next token after round 1's would be `wrong`: not so once round 2's
    # own empty round runs -- answered rebased: the target's token after what round 1 committed.
    status, reference = nav(service, ch, VerifyRequest(len(committed), (), (), prefix_hash(committed), round=9))
    assert status == 200
    service2, key2 = make(target)
    ch2 = connect(service2, key2)
    nav(service2, ch2, VerifyRequest(0, prompt, (), round=1))
    guessed = committed + [wrong]
    status, rebased = nav(service2, ch2, VerifyRequest(len(guessed), (), (7, 8), prefix_hash(guessed), round=2,
                                                       conditional=True, after=1))
    assert status == 200 and rebased["rebased"] is True and rebased["accepted"] == 0
    assert rebased["token"] == reference["token"] and rebased["committed_len"] == len(committed) + 1
    assert service2.metrics.conditional_rebased._value.get() == 1
    committed.append(rebased["token"])
    # Rebased answers never chain (the target does not decode on its own): a round drafted on the rebased
    # round 2 is dropped when it fails, and so is one naming a round answered before the last.
    guessed = committed + [wrong]
    for after in (2, 1):
        status, reply, _ = service2.handle_frame(ch2.seal(FrameType.VERIFY, VerifyRequest(
            len(guessed), (), (5,), prefix_hash(guessed), round=4, conditional=True, after=after).to_dict()))
        assert status == 409 and ch2.open(reply)[1]["error"]["code"] == "resync"
    # After a round answered as drafted, again one rebased answer.
    status, plain = nav(service2, ch2, VerifyRequest(len(committed), (), (), prefix_hash(committed), round=5))
    committed.append(plain["token"])
    guessed = committed + [(plain["token"] + 1) % service2.target.vocab_size]
    status, again = nav(service2, ch2, VerifyRequest(len(guessed), (), (), prefix_hash(guessed), round=6,
                                                     conditional=True, after=5))
    assert status == 200 and again["rebased"] is True and again["committed_len"] == len(committed) + 1
    assert service2.metrics.conditional_rebased._value.get() == 2
    # Switched off, the verifier says so at OPEN and drops failed conditional rounds as before.
    service3, key3 = make(target, rebase=False)
    hs = ClientHandshake(server_public=key3.public_bytes)
    ch3 = hs.finish(service3.handshake(hs.hello()))
    _, reply, _ = service3.handle_frame(ch3.seal(FrameType.OPEN, OpenSession(service3.fingerprint,
                                                                            target.vocab_size).to_dict()))
    other, opened = _opened(service, key)
    assert "rebase" not in ch3.open(reply)[1] and other.open(opened)[1]["rebase"] is True
    nav(service3, ch3, VerifyRequest(0, prompt, (), round=1))
    status, reply, _ = service3.handle_frame(ch3.seal(FrameType.VERIFY, VerifyRequest(
        len(guessed), (), (), prefix_hash(guessed), round=2, conditional=True, after=1).to_dict()))
    assert status == 409 and service3.metrics.conditional_rebased._value.get() == 0
