"""The sealed channel in isolation: handshake modes, frames, replay window, key ratchet."""

import time

import pytest

from privacy import ChannelLimits, ClientHandshake, ErrorCode, FrameType, StaticKey, WireError, server_handshake
from privacy.channel import HandshakeError, ReplayWindow


def pair(limits=ChannelLimits(), psk=None):
    static = StaticKey.generate()
    client = ClientHandshake(psk=psk) if psk else ClientHandshake(server_public=static.public_bytes)
    reply, server = server_handshake(client.hello(), static=static, psk=psk, limits=limits)
    return client.finish(reply, limits), server


def test_round_trip_both_directions():
    edge, cloud = pair()
    header, body = cloud.open(edge.seal(FrameType.VERIFY, {"x": b"\x01\x02"}))
    assert header.type == FrameType.VERIFY and header.seq == 1 and body == {"x": b"\x01\x02"}
    header, body = edge.open(cloud.seal(FrameType.RESULT, {"ok": True}, ack=header.seq))
    assert header.ack == 1 and body == {"ok": True}


def test_psk_mode():
    edge, cloud = pair(psk=b"p" * 40)
    assert cloud.open(edge.seal(FrameType.OPEN, {"a": 1}))[1] == {"a": 1}


def test_wrong_psk_refused():
    static = StaticKey.generate()
    hello = ClientHandshake(psk=b"a" * 32).hello()
    with pytest.raises(WireError) as err:
        server_handshake(hello, static=static, psk=b"b" * 32)
    assert err.value.code is ErrorCode.HANDSHAKE_FAILED


def test_wrong_pinned_key_detected_by_the_edge():
    real, pinned = StaticKey.generate(), StaticKey.generate()
    client = ClientHandshake(server_public=pinned.public_bytes)
    reply, _ = server_handshake(client.hello(), static=real, psk=None)
    with pytest.raises(HandshakeError, match="pinned key"):
        client.finish(reply)


def test_directions_do_not_mix():
    edge, cloud = pair()
    frame = edge.seal(FrameType.VERIFY, {})
    with pytest.raises(WireError) as err:
        edge.open(frame)           # an edge frame reflected back to the edge
    assert err.value.code is ErrorCode.UNAUTHENTICATED


def test_frames_sealed_on_many_threads_at_once_all_open():
    """A client seals on several threads (round streams, the request thread, the engine's own): every
    frame must still open. A zstd compressor shared between threads corrupted some (and could crash)."""
    import os
    import threading

    edge, cloud = pair(ChannelLimits(replay_window=1 << 16))
    body = {"t": os.urandom(64) * 40}            # compressible: every frame goes through zstd
    frames, failures = [], []

    def seal_many():
        for _ in range(400):
            frames.append(edge.seal(FrameType.VERIFY, body))

    threads = [threading.Thread(target=seal_many) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for frame in frames:
        try:
            assert cloud.open(frame)[1] == body
        except WireError as exc:
            failures.append(exc.code)
    assert len(frames) == 2400 and not failures, f"{len(failures)} frames did not open: {set(failures)}"


def test_compression_only_where_it_pays():
    edge, cloud = pair()
    small = edge.seal(FrameType.VERIFY, {"t": b"abc"})
    large = edge.seal(FrameType.VERIFY, {"t": b"\x00" * 4000})
    assert small[4] == 0 and large[4] == 1 and len(large) < 200
    assert cloud.open(large)[1] == {"t": b"\x00" * 4000}


def test_replay_window():
    w = ReplayWindow(8)
    for seq in (1, 2, 5, 3):
        assert w.check(seq)
        w.accept(seq)
    assert not w.check(2) and not w.check(5) and not w.check(0)   # repeats, and 0 is never valid
    assert w.check(4)                                               # a gap inside the window
    w.accept(20)
    assert not w.check(12) and w.check(13) and not w.check(20)     # 12 is now out of the window


def test_reordered_frames_accepted_once():
    edge, cloud = pair()
    frames = [edge.seal(FrameType.VERIFY, {"i": i}) for i in range(5)]
    for i in (3, 0, 4, 1, 2):
        assert cloud.open(frames[i])[1] == {"i": i}
    with pytest.raises(WireError) as err:
        cloud.open(frames[2])
    assert err.value.code is ErrorCode.REPLAY


def test_keys_ratchet_every_interval():
    limits = ChannelLimits(rekey_interval=3)
    edge, cloud = pair(limits)
    frames = [edge.seal(FrameType.VERIFY, {"i": i}) for i in range(10)]
    for f in frames:
        cloud.open(f)
    # Frames of different epochs are sealed under different keys: the same plaintext differs.
    assert cloud._recv.key_for(9) != cloud._recv.key_for(6)


def test_forged_far_future_sequence_is_cheap_to_refuse():
    edge, cloud = pair()
    frame = bytearray(edge.seal(FrameType.VERIFY, {}))
    frame[21:29] = (2**62).to_bytes(8, "big")      # seq in a key epoch ~2^46 ratchets ahead
    t = time.perf_counter()
    with pytest.raises(WireError) as err:
        cloud.open(bytes(frame))
    assert err.value.code is ErrorCode.UNAUTHENTICATED and time.perf_counter() - t < 0.1
    assert cloud.open(edge.seal(FrameType.VERIFY, {"ok": 1}))[1] == {"ok": 1}   # the channel still works


def test_frames_of_another_session_refused():
    edge, _ = pair()
    _, other = pair()
    frame = edge.seal(FrameType.VERIFY, {})
    with pytest.raises(WireError) as err:
        other.open(frame)
    assert err.value.code is ErrorCode.UNAUTHENTICATED


def test_static_key_file_round_trip(tmp_path):
    key = StaticKey.generate()
    key.save(tmp_path / "k")
    assert StaticKey.load(tmp_path / "k").public_bytes == key.public_bytes
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0    # private key readable by its owner only
    (tmp_path / "bad").write_text("not base64!")
    with pytest.raises(ValueError):
        StaticKey.load(tmp_path / "bad")
