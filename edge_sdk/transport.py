"""How the edge reaches the verifier: a small protocol and its sealed-HTTP implementation.

The engine only calls ``open_session`` / ``verify`` / ``close``; a test or a benchmark
can put an emulated link or an in-process verifier behind the same calls. Session
identity, keys and replica failover stay inside the transport: when a session is lost
(verifier restart, eviction, another replica) the transport raises ``VerifierError``
with code ``unknown_session`` and the engine opens a new one and resends its prefix.
"""

from __future__ import annotations

import base64
import binascii
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from typing import Protocol, Sequence

import httpx

from privacy import (
    AFFINITY_HEADER,
    BatchAck,
    ChannelLimits,
    ClientHandshake,
    FrameType,
    HandshakeError,
    OpenSession,
    SecureChannel,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
    WireError,
    decode,
    encode,
    parse_header,
)

from .errors import ConfigError, VerifierError, VerifierUnavailable, VocabMismatchError

MSGPACK = "application/msgpack"
FRAME = "application/x-pipesd-frame"
STREAM = "application/x-pipesd-stream"


class Verifier(Protocol):
    bytes_sent: int       # request bodies (frames), cumulative
    bytes_received: int   # response bodies, cumulative

    def open_session(self, req: OpenSession) -> SessionOpened:
        """Start (or restart) a session: key exchange, then the vocabulary check."""

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        """A round's final batch: NAV over the round's draft."""

    def stage(self, req: VerifyRequest) -> BatchAck:
        """A non-final batch of a round (req.final is False), acknowledged on its own."""

    def open_round(self) -> "RoundStream":
        """A round streamed batch by batch in one request; see ``RoundStream``."""

    def probe(self, timeout: float = 1.0) -> bool:
        """Cheap health check while offline: can a session be opened now? Never raises."""

    def close(self) -> None:
        """End the session and release connections."""


def parse_key(value: str | bytes, size: int | None, what: str) -> bytes:
    if isinstance(value, bytes):
        raw = value
    else:
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{what} must be base64") from None
    if size is not None and len(raw) != size:
        raise ConfigError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


HANDSHAKE_TRIES = 3          # handshakes answered by a proxy's 5xx (a replica just died) are retried


class HttpVerifier:
    """Sealed frames over HTTP/1.1 keep-alive (httpx), with failover across replica URLs.

    Exactly one of ``verifier_key`` (the verifier's X25519 public key, base64 or 32 raw
    bytes, as ``pipesd-verifier`` prints it) or ``psk`` (a pre-shared key, >= 32 bytes).
    """

    def __init__(self, urls: str | Sequence[str], *, verifier_key: str | bytes | None = None,
                 psk: str | bytes | None = None, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 limits: ChannelLimits = ChannelLimits()):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ConfigError("give at least one verifier URL")
        if (verifier_key is None) == (psk is None):
            raise ConfigError("pin the verifier's public key (verifier_key=..., printed by pipesd-verifier) "
                              "or give a pre-shared key (psk=...)")
        self._server_key = parse_key(verifier_key, 32, "verifier_key") if verifier_key is not None else None
        self._psk = (psk.encode() if isinstance(psk, str) else psk) if psk is not None else None
        if self._psk is not None and len(self._psk) < 32:
            raise ConfigError("a pre-shared key needs at least 32 bytes")
        self.limits = limits
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._deadline: float | None = None
        self._current = 0
        self._http = httpx.Client(base_url=self.urls[0], timeout=self._timeout)
        self._channel: SecureChannel | None = None
        self._affinity = secrets.token_hex(8)      # AFFINITY_HEADER: keeps a load balancer on one replica
        self.bytes_sent = 0
        self.bytes_received = 0
        self._count_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.urls[self._current]

    # -- the protocol ---------------------------------------------------------------------
    def open_session(self, req: OpenSession) -> SessionOpened:
        for attempt in range(HANDSHAKE_TRIES):
            self._channel = None
            hs = ClientHandshake(server_public=self._server_key, psk=self._psk)
            resp = self._post("/v1/handshake", encode(hs.hello()), MSGPACK, self._call_timeout())
            if resp.status_code == 200:
                break
            if not _from_intermediary(resp) or attempt == HANDSHAKE_TRIES - 1:
                raise _plain_error(resp)
            time.sleep(0.2 * (attempt + 1))    # a replica died: give the load balancer a moment to route around it
        try:
            self._channel = hs.finish(decode(resp.content), self.limits)
        except (HandshakeError, WireError) as exc:
            raise VerifierError(resp.status_code, "handshake_failed", str(exc)) from None
        return SessionOpened.from_dict(self._exchange(FrameType.OPEN, req.to_dict(), FrameType.OPENED))

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        return VerifyResponse.from_dict(self._exchange(FrameType.VERIFY, req.to_dict(), FrameType.RESULT))

    def stage(self, req: VerifyRequest) -> BatchAck:
        return BatchAck.from_dict(self._exchange(FrameType.VERIFY, req.to_dict(), FrameType.ACK))

    def open_round(self) -> "RoundStream":
        return RoundStream(self)

    def close(self) -> None:
        if self._channel is not None:
            try:
                self._exchange(FrameType.CLOSE, {}, FrameType.CLOSED)
            except (VerifierError, VerifierUnavailable):
                pass
            self._channel = None
        self._http.close()

    # -- frames ---------------------------------------------------------------------------
    def _exchange(self, ftype: FrameType, body: dict, expect: FrameType) -> dict:
        channel = self._require_channel()
        frame = channel.seal(ftype, body)
        return self._reply(channel, self._post("/v1/frames", frame, FRAME, self._call_timeout()),
                           parse_header(frame).seq, expect)

    def set_deadline(self, seconds: float | None) -> None:
        """Bound the next one-shot calls (handshake, OPEN, whole NAV) by `seconds`, connect and read,
        within the configured timeouts: the engine derives it from the profiled link."""
        self._deadline = seconds

    def _call_timeout(self) -> httpx.Timeout | None:
        if self._deadline is None:
            return None
        return httpx.Timeout(min(self._read_timeout, self._deadline),
                             connect=min(self._connect_timeout, self._deadline))

    def _require_channel(self) -> SecureChannel:
        if self._channel is None:
            raise VerifierError(401, "unknown_session", "no session with the verifier: open one")
        return self._channel

    def _reply(self, channel: SecureChannel, resp: httpx.Response, request_seq: int, expect: FrameType) -> dict:
        """Open the verifier's reply to the frame `request_seq`; errors become exceptions."""
        if not resp.headers.get("content-type", "").startswith(FRAME):
            if resp.status_code == 401:   # the verifier does not know this session (restart, eviction)
                self._channel = None
                raise VerifierError(401, "unknown_session", "the verifier lost the session")
            if _from_intermediary(resp):  # e.g. a Ray Serve replica died mid-request: its sessions are gone
                self._channel = None
                raise VerifierError(503, "unknown_session", f"no verifier answered ({resp.status_code} from a "
                                    "proxy in front of it): the replica holding the session may be gone")
            raise _plain_error(resp)
        try:
            header, msg = channel.open(resp.content)
        except WireError as exc:
            raise VerifierUnavailable(f"the verifier's reply failed authentication ({exc.code.value})") from None
        if header.ack != request_seq:
            raise VerifierUnavailable("the verifier's reply answers another request")
        if header.type == FrameType.ERROR:
            err = dict(msg.get("error", {}))
            code, message = str(err.pop("code", "error")), str(err.pop("message", ""))
            cls = VocabMismatchError if code == "vocab_mismatch" else VerifierError
            raise cls(resp.status_code, code, message, err)
        if header.type != expect:
            raise VerifierUnavailable(f"unexpected reply frame type {header.type}")
        return msg

    def _post(self, path: str, content, ctype: str, timeout: httpx.Timeout | None = None) -> httpx.Response:
        """POST to the current replica; on a connection failure move to the next one (session lost)."""
        try:
            resp = self._http.post(path, content=content,
                                   headers={"content-type": ctype, AFFINITY_HEADER: self._affinity},
                                   timeout=timeout or self._timeout)
        except (httpx.HTTPError, OSError) as exc:
            if len(self.urls) > 1:
                self._current = (self._current + 1) % len(self.urls)
                self._http.close()
                self._http = httpx.Client(base_url=self.url, timeout=self._timeout)
                self._channel = None
                raise VerifierError(503, "unknown_session", f"replica unreachable ({type(exc).__name__}); "
                                    f"moved to {self.url}") from exc
            raise VerifierUnavailable(f"cannot reach the verifier at {self.url}: {type(exc).__name__}: {exc}") from exc
        self.count(len(content) if isinstance(content, bytes) else 0, len(resp.content))
        return resp

    def probe(self, timeout: float = 1.0) -> bool:
        """Is a verifier ready? Tries the replicas in order from the current one and moves to the
        first that answers (its sessions are new to it: the caller opens one). Never raises."""
        for i in range(len(self.urls)):
            index = (self._current + i) % len(self.urls)
            try:
                ok = httpx.get(self.urls[index] + "/health/ready", timeout=timeout).status_code == 200
            except (httpx.HTTPError, OSError):
                ok = False
            if ok:
                if index != self._current:
                    self._current = index
                    self._http.close()
                    self._http = httpx.Client(base_url=self.url, timeout=self._timeout)
                    self._channel = None
                return True
        return False

    def count(self, sent: int, received: int) -> None:
        with self._count_lock:   # round streams and the engine send concurrently
            self.bytes_sent += sent
            self.bytes_received += received


def _from_intermediary(resp: httpx.Response) -> bool:
    """A server error that no verifier wrote (ours always carry a JSON or sealed error): a proxy's."""
    ctype = resp.headers.get("content-type", "")
    return resp.status_code >= 500 and not ctype.startswith(("application/json", FRAME))


def _plain_error(resp: httpx.Response) -> VerifierError:
    try:
        err = resp.json()["error"]
        code, message = str(err.pop("code")), str(err.pop("message", ""))
    except Exception:
        code, message, err = "http_error", resp.text[:200], {}
    return VerifierError(resp.status_code, code, message, err)


class RoundStream:
    """One round's draft batches as frames on a single streaming POST to ``/v1/rounds``.

    Batches are written, length-prefixed, into the request body as soon as they are due
    (``not_before``, used by link emulation), on this stream's own thread; the verifier
    stages each as it arrives and answers the request with the final batch's NAV result.
    No per-batch round trip: the next batch follows the previous one on the same TCP
    stream. Frames are sealed when written, so their sequence numbers follow the order
    in which they go out, which the verifier restores across connections (the next
    round's stream may overtake this one). ``abandon`` ends a round that went stale.
    """

    def __init__(self, verifier: HttpVerifier, on_sent=None):
        self._verifier = verifier
        self._channel = verifier._require_channel()
        self._queue: queue.Queue = queue.Queue()
        self._final_seq: int | None = None
        self.on_sent = on_sent          # callback(tokens, start, end) for each non-final batch written
        self.result: Future = Future()
        self._thread = threading.Thread(target=self._run, name="round-stream", daemon=True)
        self._thread.start()

    def send(self, req: VerifyRequest, not_before: float | None = None,
             on_link: tuple[float, float] | None = None) -> None:
        """Queue a batch. `not_before`: write it no earlier (link emulation). `on_link`: when it really
        occupied the link (start, end), if known; else the send time is measured here."""
        self._queue.put((req, time.perf_counter(), not_before, on_link))

    def abandon(self) -> None:
        self._queue.put(None)

    def _body(self):
        sent, last_end = 0, 0.0
        while (item := self._queue.get()) is not None:
            req, ready, not_before, on_link = item
            if not_before is not None:
                delay = not_before - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            frame = self._channel.seal(FrameType.VERIFY, req.to_dict())
            if req.final:
                self._final_seq = parse_header(frame).seq
            yield len(frame).to_bytes(4, "big") + frame
            sent += 4 + len(frame)
            if req.final:
                break
            # The link's busy time for this batch: from when it could start (ready, and the previous
            # batch gone) to when it was out. Queueing behind earlier batches is not its cost.
            start, end = on_link if on_link else (max(ready, last_end), time.perf_counter())
            last_end = end
            if self.on_sent is not None:
                self.on_sent(len(req.draft), start, end)
        self._sent_bytes = sent

    def _run(self) -> None:
        self._sent_bytes = 0
        try:
            resp = self._verifier._post("/v1/rounds", self._body(), STREAM)
            self._verifier.count(self._sent_bytes, 0)
            if self._final_seq is None:
                self.result.cancel()
                return
            msg = self._verifier._reply(self._channel, resp, self._final_seq, FrameType.RESULT)
            self.result.set_result(VerifyResponse.from_dict(msg))
        except BaseException as exc:  # delivered to whoever waits for the result
            if not self.result.cancelled():
                self.result.set_exception(exc)
