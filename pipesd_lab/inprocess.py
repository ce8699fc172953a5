"""The real verifier service behind the edge's ``Verifier`` protocol, in this process.

``InProcessVerifier`` runs ``cloud_verifier.VerifierService`` -- the sealed handshake, the
frames and their replay window, staging, NAV, rollback, resync -- on any ``Target`` (a real
model or ``toy.ToyTarget``), with no HTTP server and no socket: frames are sealed on the edge
side and handed to the service as the HTTP app would hand them. A round's batches go on their
own thread, as ``RoundStream`` writes them, and the first reply that is not an acknowledgement
answers the round, as ``/v1/rounds`` does.

For tests and experiments it can misbehave on request: add a round-trip ``latency_s`` to every
reply, go ``set_down`` (nothing gets through, probes fail), lose the next replies after the
service acted (``drop_replies``), or ``restart`` (every session is forgotten).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from cloud_verifier.service import VerifierService
from cloud_verifier.settings import VerifierSettings
from cloud_verifier.target import Target
from edge_sdk.errors import SessionLost, VerifierError, VerifierTimeout, VerifierUnavailable
from edge_sdk.transport import open_sealed_reply
from privacy import (ClientHandshake, ErrorCode, FrameType, OpenSession, SecureChannel, SessionOpened,
    StaticKey, VerifyRequest, VerifyResponse, WireError, parse_header)


class InProcessVerifier:
    """A ``Verifier`` (edge protocol) whose far end is a ``VerifierService`` in this process."""

    def __init__(self, target: Target, settings: VerifierSettings | None = None, *, latency_s: float = 0.0):
        self.target, self.settings = target, settings or VerifierSettings()
        self.key = StaticKey.generate()
        self.latency_s = latency_s            # added to every reply: a network round trip, roughly
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = {"handshake": 0, "frame": 0, "round": 0}   # what reached the service
        self.down = False
        self.drop_replies = 0                 # the next this many replies are lost after the service acted
        self._deadline: float | None = None
        self._lock = threading.Lock()         # the service is not thread-safe: one call at a time, as the worker
        self._order = threading.Condition()   # frames sealed ahead wait for the ones numbered before them
        self._delivered: dict[bytes, int] = {}   # per session: the highest seq handed to the service
        self._channel: SecureChannel | None = None
        self.service = VerifierService(target, self.settings, static_key=self.key)

    # -- misbehaviour, for tests -------------------------------------------------------------
    def restart(self) -> None:
        """A fresh service with the same key: every session (and its KV cache) is forgotten."""
        with self._lock:
            self.service = VerifierService(self.target, self.settings, static_key=self.key)

    def set_down(self, down: bool = True) -> None:
        self.down = down

    # -- the Verifier protocol ------------------------------------------------------------------
    def open_session(self, req: OpenSession) -> SessionOpened:
        self._reachable()
        hs = ClientHandshake(server_public=self.key.public_bytes)
        with self._lock:
            self.requests["handshake"] += 1
            try:
                reply = self.service.handshake(hs.hello())
            except WireError as exc:
                raise _plain(exc) from None
        self._channel = hs.finish(reply, self.service.limits)
        self._wait_reply(self._deadline)
        return SessionOpened.from_dict(self._exchange(FrameType.OPEN, req.to_dict(), FrameType.OPENED))

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        return VerifyResponse.from_dict(self._exchange(FrameType.VERIFY, req.to_dict(), FrameType.RESULT))

    def open_round(self) -> "_InProcessRound":
        return _InProcessRound(self)

    def probe(self, timeout: float = 1.0) -> bool:
        return not self.down

    def set_deadline(self, seconds: float | None) -> None:
        self._deadline = seconds

    def close(self) -> None:
        if self._channel is not None and not self.down:
            try:
                self._exchange(FrameType.CLOSE, {}, FrameType.CLOSED)
            except (VerifierError, VerifierUnavailable):
                pass
        self._channel = None

    # -- delivery ------------------------------------------------------------------------------
    REORDER_WAIT_S = 0.1      # as the HTTP app's reorder_wait_s

    def channel(self) -> SecureChannel:
        if self._channel is None:
            raise SessionLost(401, "no session with the verifier: open one")
        return self._channel

    def deliver(self, channel: SecureChannel, ftype: FrameType, body: dict, kind: str,
                frame: bytes | None = None) -> tuple[int, int, bytes, FrameType]:
        """Seal a frame (or take one sealed already) and run it through the service: (its seq, HTTP
        status, sealed reply, reply type). Frames reach the service in the order they were numbered,
        as the HTTP app restores it: one sealed earlier waits for those before it (up to
        ``REORDER_WAIT_S``: a frame that never comes is skipped)."""
        self._reachable()
        with self._order:
            if frame is not None:       # numbered when the engine sent it: after the ones before it
                seq = parse_header(frame).seq
                give_up = time.monotonic() + self.REORDER_WAIT_S
                while self._delivered.get(channel.session_id, seq - 1) < seq - 1 and time.monotonic() < give_up:
                    self._order.wait(max(0.0, give_up - time.monotonic()))
        with self._lock:
            if frame is None:
                frame = channel.seal(ftype, body)
            seq = parse_header(frame).seq
            with self._order:
                self._delivered[channel.session_id] = max(seq, self._delivered.get(channel.session_id, 0))
                self._order.notify_all()
            self.requests[kind] += 1
            self.bytes_sent += len(frame)
            try:
                status, reply, reply_type = self.service.handle_frame(frame)
            except WireError as exc:             # refused before authentication: a plain error
                if exc.code is ErrorCode.UNAUTHENTICATED and self._channel is channel:   # not a newer session
                    self._channel = None
                raise _plain(exc) from None
            self.bytes_received += len(reply)
        return seq, status, reply, reply_type

    def skip(self, channel: SecureChannel, frames: list[bytes]) -> None:
        """Frames numbered but never to be delivered (their round ended first): later ones need not wait."""
        if frames:
            with self._order:
                last = max(parse_header(f).seq for f in frames)
                self._delivered[channel.session_id] = max(last, self._delivered.get(channel.session_id, 0))
                self._order.notify_all()

    def lose_reply(self) -> bool:
        """Is this reply one of the `drop_replies` lost after the service acted?"""
        with self._lock:
            if self.drop_replies > 0:
                self.drop_replies -= 1
                return True
            return False

    def _exchange(self, ftype: FrameType, body: dict, expect: FrameType) -> dict:
        channel = self.channel()
        seq, status, reply, _ = self.deliver(channel, ftype, body, "frame")
        self._wait_reply(self._deadline)
        if self.lose_reply():
            raise VerifierUnavailable("in-process verifier: the reply was lost")
        return open_sealed_reply(channel, status, reply, seq, expect)

    def _wait_reply(self, deadline: float | None) -> None:
        """The reply's trip back; past the caller's deadline it never arrives in time."""
        if deadline is not None and self.latency_s > deadline:
            time.sleep(deadline)
            raise VerifierTimeout("in-process verifier: no reply within the deadline")
        if self.latency_s:
            time.sleep(self.latency_s)

    def _reachable(self) -> None:
        if self.down:
            raise VerifierUnavailable("in-process verifier: down")


def _plain(exc: WireError) -> VerifierError:
    if exc.code is ErrorCode.UNAUTHENTICATED:
        return SessionLost(exc.code.http_status, exc.message)
    return VerifierError(exc.code.http_status, exc.code, exc.message, exc.details)


class _InProcessRound:
    """A ``RoundChannel``: the round's batches are delivered one after another on this round's thread;
    the first reply that is not an acknowledgement (the final batch's result, or an error) answers it."""

    def __init__(self, verifier: InProcessVerifier):
        self._verifier = verifier
        self._queue: queue.Queue = queue.Queue()
        self.on_sent = None
        self.result: Future = Future()
        try:
            self._channel = verifier.channel()
        except SessionLost as exc:      # reported through the result, as every failure of a round
            self.result.set_exception(exc)
            return
        threading.Thread(target=self._run, name="inprocess-round", daemon=True).start()

    def send(self, req: VerifyRequest) -> None:
        if not self.result.done():      # numbered now: the service sees frames in the order they were sent
            self._queue.put((req, self._channel.seal(FrameType.VERIFY, req.to_dict()), time.perf_counter()))

    def abandon(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        v = self._verifier
        try:
            while (item := self._queue.get()) is not None:
                req, frame, ready = item
                seq, status, reply, reply_type = v.deliver(self._channel, FrameType.VERIFY, {}, "round", frame)
                if req.final or reply_type != FrameType.ACK:
                    v._wait_reply(None)
                    if v.lose_reply():
                        raise VerifierUnavailable("in-process verifier: the reply was lost")
                    msg = open_sealed_reply(self._channel, status, reply, seq, FrameType.RESULT)
                    self.result.set_result(VerifyResponse.from_dict(msg))
                    self._skip_rest()
                    return
                if self.on_sent is not None:
                    self.on_sent(len(req.draft), ready, time.perf_counter())
            self.result.cancel()
        except BaseException as exc:       # delivered to whoever waits for the result
            if not self.result.cancelled():
                self.result.set_exception(exc)
            self._skip_rest()

    def _skip_rest(self) -> None:
        """The round is answered (or failed): what it still had queued will never go, numbers and all."""
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                rest.append(item[1])
        self._verifier.skip(self._channel, rest)
