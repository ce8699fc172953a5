"""Message schemas and the bounded codec: round trips and typed rejections."""

import msgpack
import pytest

from privacy import (
    DecodeLimits,
    ErrorCode,
    OpenSession,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
    WireError,
    decode,
    encode,
    pack_tokens,
    unpack_tokens,
    vocab_fingerprint,
)


@pytest.mark.parametrize("msg", [
    OpenSession("ab" * 16, 2048),
    SessionOpened("s1", "target", "ab" * 16, 2048, (0, 2), 64, 512),
    VerifyRequest(0, (0, 11, 2047), (5, 6, 7)),
    VerifyRequest(12, (), (), b"h" * 16),
    VerifyResponse(3, 17, 20, 4.25),
    VerifyResponse(3, 17, 20, 4.25, 12.5),
    SessionOpened("s1", "target", "ab" * 16, 2048, (0, 2), 64, 512, rebase=True),
    VerifyRequest(12, (), (5,), b"h" * 16, round=4, conditional=True, after=3),
    VerifyResponse(0, 17, 20, 4.25, rebased=True),
])
def test_round_trip(msg):
    assert type(msg).from_dict(decode(encode(msg.to_dict()))) == msg


def test_rebasing_fields_travel_only_when_used():
    """Verifiers and edges of earlier builds neither send nor expect them."""
    assert "rebase" not in SessionOpened("s1", "t", "ab" * 16, 2048, (0,), 64, 512).to_dict()
    assert "rebased" not in VerifyResponse(1, 2, 3, 4.0).to_dict()
    assert "after" not in VerifyRequest(0, (1,), (), conditional=True).to_dict()


def test_a_result_names_its_queue_time_only_when_it_waited():
    assert "queue_ms" not in VerifyResponse(1, 2, 3, 4.0).to_dict()        # as verifiers before it wrote
    assert VerifyResponse.from_dict({"accepted": 1, "token": 2, "committed_len": 3, "verify_ms": 4.0}).queue_ms == 0
    for bad in (-1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(WireError) as err:
            VerifyResponse.from_dict({"accepted": 1, "token": 2, "committed_len": 3, "verify_ms": 4.0, "queue_ms": bad})
        assert err.value.code is ErrorCode.MALFORMED


def test_tokens_travel_as_packed_little_endian_uint32():
    assert pack_tokens([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    assert unpack_tokens(b"\x01\x00\x00\x00\x02\x01\x00\x00", "t") == (1, 258)


def test_greedy_request_is_small():
    # 4 bytes a draft token plus a fixed envelope (field names, the 16-byte prefix hash, round info):
    # no probabilities travel when greedy.
    body = encode(VerifyRequest(100, (), tuple(range(8)), b"h" * 16).to_dict())
    assert len(body) <= 8 * 4 + 96


def test_fingerprint_depends_on_order_and_content():
    assert vocab_fingerprint(["a", "b"]) != vocab_fingerprint(["b", "a"])
    assert vocab_fingerprint(["a", "b"]) == vocab_fingerprint(["a", "b"])


@pytest.mark.parametrize("body, code", [
    (b"", ErrorCode.MALFORMED),
    (b"\xc1", ErrorCode.MALFORMED),                                  # never-used msgpack byte
    (msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED),                 # not a map
    (msgpack.packb({"a": 1}) + b"\x00", ErrorCode.MALFORMED),        # trailing bytes
    (msgpack.packb({1: 2}), ErrorCode.MALFORMED),                    # non-string key
    (msgpack.packb(msgpack.ExtType(1, b"x")), ErrorCode.MALFORMED),  # ext type
    (b"\x91" * 5000 + b"\x00", ErrorCode.MALFORMED),                 # deep nesting
    (msgpack.packb({"x": "a" * 10_000}), ErrorCode.MALFORMED),       # string over the limit
    (b"\x00" * (2 << 20), ErrorCode.PAYLOAD_TOO_LARGE),              # body over the limit
])
def test_decode_rejects_with_typed_errors(body, code):
    with pytest.raises(WireError) as err:
        decode(body)
    assert err.value.code is code


def test_bin_field_limit_is_applied_before_allocation():
    with pytest.raises(WireError):
        decode(msgpack.packb({"draft": b"\x00" * 4096}), DecodeLimits(max_bin_bytes=1024))


@pytest.mark.parametrize("fields", [
    {},                                                   # everything missing
    {"base_len": -1, "append": b"", "draft": b""},        # negative count
    {"base_len": True, "append": b"", "draft": b""},      # bool is not an int
    {"base_len": 0, "append": b"\x00\x00\x00", "draft": b""},  # not a multiple of 4 bytes
    {"base_len": 0, "append": [1, 2], "draft": b""},      # tokens as a list
    {"base_len": "0", "append": b"", "draft": b""},       # wrong type
    {"base_len": 3, "append": b"", "draft": b""},         # a prefix length without its hash
    {"base_len": 0, "append": b"", "draft": b"", "after": 2},                    # 'after' without 'cond'
    {"base_len": 0, "append": b"", "draft": b"", "cond": True, "after": -2},     # not a round id
    {"base_len": 0, "append": b"", "draft": b"", "cond": True, "after": 2, "final": False},  # not final
])
def test_verify_request_validation(fields):
    with pytest.raises(WireError) as err:
        VerifyRequest.from_dict(fields)
    assert err.value.code is ErrorCode.MALFORMED
