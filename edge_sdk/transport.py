"""How the edge reaches the verifier: a small protocol and its sealed-HTTP implementation.

The engine only calls the ``Verifier`` protocol; a test or a benchmark can put an emulated
link or an in-process verifier behind the same calls (``pipesd_lab``). Session identity, keys
and replica failover stay inside the transport: when the verifier no longer holds the session
(restart, eviction, another replica) the transport raises ``SessionLost`` and the engine opens
a new one and resends its prefix.
"""

from __future__ import annotations

import email.utils
import logging
import math
import queue
import random
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import Future
from typing import Callable, Protocol, Sequence

import httpx

from privacy import (AFFINITY_HEADER, FRAMES_PATH, HANDSHAKE_PATH, MEDIA_FRAME, MEDIA_MSGPACK, MEDIA_STREAM,
    READY_PATH, ROUNDS_PATH, ChannelLimits, ClientHandshake, ErrorCode, FrameType, HandshakeError,
    OpenSession, SecureChannel, SessionOpened, VerifyRequest, VerifyResponse, WireError, decode, encode,
    parse_header, parse_psk, parse_public_key)

from .errors import (ConfigError, HandshakeFailed, Overloaded, SessionLost, VerifierError, VerifierTimeout,
                     VerifierUnavailable, VocabMismatchError)


logger = logging.getLogger(__name__)


class RoundChannel(Protocol):
    """One round's batches on their way up; the final batch's reply resolves ``result``, and every
    failure (the session lost, the verifier unreachable) is reported there, never raised by a call."""

    result: "Future[VerifyResponse]"
    on_sent: Callable[[int, float, float], None] | None   # (draft tokens, start, end) per non-final batch out

    def send(self, req: VerifyRequest) -> None:
        """Queue a batch; it goes up behind the ones queued before, without waiting for a reply."""

    def abandon(self) -> None:
        """The round went stale: drop the batches not yet on the wire and end the request."""


class Verifier(Protocol):
    bytes_sent: int       # request bodies (frames), cumulative
    bytes_received: int   # response bodies, cumulative

    def open_session(self, req: OpenSession) -> SessionOpened:
        """Start (or restart) a session: key exchange, then the vocabulary check."""

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        """A whole round in one request (its only batch is final): NAV over its draft."""

    def open_round(self) -> RoundChannel:
        """A round streamed batch by batch in one request; see ``RoundChannel``."""

    def probe(self, timeout: float = 1.0) -> bool:
        """Cheap health check while offline: can a session be opened now? Never raises."""

    def set_deadline(self, seconds: float | None) -> None:
        """Bound the next one-shot calls (handshake, OPEN, whole NAV) by `seconds` (None: the defaults)."""

    def close(self) -> None:
        """End the session and release connections."""


class _Moved(SessionLost):
    """A request that found its HTTP client closed: another request moved the connection meanwhile."""


HANDSHAKE_TRIES = 3          # handshakes answered by a proxy's 5xx (a replica just died) are retried
CLOSE_TRIES = 3              # a CLOSE refused as overloaded (429) is sent again, this many times in all ...
CLOSE_WAIT_S = 1.5           # ... waiting its Retry-After (jittered, at most 1 s each) within this in all


def check_url(url: object) -> str:
    """A verifier URL as httpx needs it -- http(s), a host, a valid port -- or a ``ConfigError`` naming
    it. Without this, "127.0.0.1:8000" (no scheme) fails only at the first request, which the
    offline policy then turns into unverified output."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"a verifier URL is a string like http://127.0.0.1:8000, not {url!r}")
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        hint = f"; did you mean http://{url}?" if "://" not in url else ""
        raise ConfigError(f"verifier URL {url!r} must start with http:// or https://{hint}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"verifier URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"verifier URL {url!r} has no host")
    if port == 0:
        raise ConfigError(f"verifier URL {url!r} has an invalid port")
    return url


class _StreamWorkers:
    """Daemon threads that run round streams, kept between rounds. Starting a thread per round cost the
    engine ~1 ms on its path (``Thread.start`` waits for the new thread to run, behind the GIL), each time
    a round was sent; a kept worker takes the next stream from a queue. The pool grows to about the most
    streams open at once (a stream counts as busy until its worker is back in the queue, a moment after
    its result is out, so a round sent in that moment may start one more); daemon threads, so a stream
    stuck on a dead verifier never holds up the interpreter's exit."""

    def __init__(self, name: str = "round-stream"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._closed = False
        self._lock = threading.Lock()
        self._name = name

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1          # claimed here, so that two submits never wake one worker
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name=self._name, daemon=True).start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:       # a stream reports its failures on its result: this is a bug, not a failure
                logger.exception("a round stream raised")
            with self._lock:
                if self._closed:
                    return
                self._idle += 1     # counted idle only while alive: a claimed worker always takes the job

    def close(self) -> None:
        """Idle workers end now, busy ones when their stream ends."""
        with self._lock:
            idle, self._idle, self._closed = self._idle, 0, True
        for _ in range(idle):
            self._jobs.put(None)


class _Connection:
    """What the verifier and its round streams share: the HTTP client on the replica in use (with
    failover across replica URLs), the session's channel, deadlines and byte counts."""

    def __init__(self, urls: list[str], connect_timeout: float, read_timeout: float):
        self.urls = urls
        self.current = 0
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.deadline: float | None = None
        self.http = httpx.Client(base_url=urls[0], timeout=self.timeout)
        self.session: SecureChannel | None = None
        self.affinity = secrets.token_hex(8)      # AFFINITY_HEADER: keeps a load balancer on one replica
        self.bytes_sent = 0
        self.bytes_received = 0
        self._count_lock = threading.Lock()
        self._move_lock = threading.Lock()          # one move at a time, from the replica that failed
        self.workers = _StreamWorkers()

    @property
    def url(self) -> str:
        return self.urls[self.current]

    def channel(self) -> SecureChannel:
        if self.session is None:
            raise SessionLost(401, "no session with the verifier: open one")
        return self.session

    def call_timeout(self) -> httpx.Timeout | None:
        """The timeout of a one-shot call: the configured ones, shortened to the deadline if set."""
        if self.deadline is None:
            return None
        return httpx.Timeout(min(self.read_timeout, self.deadline), connect=min(self.connect_timeout, self.deadline))

    def move_to(self, index: int, leaving: int | None = None) -> None:
        """Use replica `index` from now on; the session does not follow (the caller opens one).
        `leaving`: move only if the connection is still on that replica -- several requests in flight
        find the same replica gone, and only the first may move (a second would close the client the
        first just opened, under requests already on it)."""
        with self._move_lock:
            if leaving is not None and self.current != leaving:
                return
            # The new client is in place before the old one closes: a request on another thread never
            # picks up a closed client (building one takes milliseconds).
            new = httpx.Client(base_url=self.urls[index], timeout=self.timeout)
            old, self.http, self.current, self.session = self.http, new, index, None
            old.close()

    def post(self, path: str, content, ctype: str, timeout: httpx.Timeout | None = None) -> httpx.Response:
        """POST to the current replica; on a connection failure move to the next one (session lost)."""
        index, http = self.current, self.http
        try:
            resp = http.post(path, content=content, headers={"content-type": ctype, AFFINITY_HEADER: self.affinity},
                             timeout=timeout or self.timeout)
        except RuntimeError:
            if not http.is_closed:
                raise
            # Another request's failure moved the connection to the next replica (closing this client)
            # while this one was being sent: the session it belonged to is gone with the move.
            raise _Moved(503, f"the connection moved to {self.url} during the request") from None
        except (httpx.HTTPError, OSError) as exc:
            if len(self.urls) > 1:
                self.move_to((index + 1) % len(self.urls), leaving=index)   # unless another request moved first
                raise SessionLost(503, f"replica unreachable ({type(exc).__name__}); moved to {self.url}") from exc
            if isinstance(exc, httpx.TimeoutException):
                raise VerifierTimeout(f"the verifier at {self.url} did not answer in time ({type(exc).__name__})") from exc
            raise VerifierUnavailable(f"cannot reach the verifier at {self.url}: {type(exc).__name__}: {exc}") from exc
        self.count(len(content) if isinstance(content, bytes) else 0, len(resp.content))
        return resp

    def open_reply(self, channel: SecureChannel, resp: httpx.Response, request_seq: int, expect: FrameType) -> dict:
        """Open the verifier's reply to the frame `request_seq`; errors become exceptions."""
        if not resp.headers.get("content-type", "").startswith(MEDIA_FRAME):
            if resp.status_code == ErrorCode.UNAUTHENTICATED.http_status:   # restart, eviction: session gone
                self.forget(channel)
                raise SessionLost(resp.status_code, "the verifier lost the session")
            if _from_intermediary(resp):  # e.g. a Ray Serve replica died mid-request: its sessions are gone
                self.forget(channel)
                raise SessionLost(503, f"no verifier answered ({resp.status_code} from a proxy in front of it): "
                                  "the replica holding the session may be gone")
            raise _plain_error(resp)
        return open_sealed_reply(channel, resp.status_code, resp.content, request_seq, expect,
                                 retry_after_s=parse_retry_after(resp.headers.get("retry-after")))

    def forget(self, channel: SecureChannel) -> None:
        """`channel`'s session is gone. A late reply on an old session (a round abandoned before a new
        handshake) must not drop the session opened since, hence the check."""
        if self.session is channel:
            self.session = None

    def count(self, sent: int, received: int) -> None:
        with self._count_lock:   # round streams and the engine send concurrently
            self.bytes_sent += sent
            self.bytes_received += received


class HttpVerifier:
    """Sealed frames over HTTP/1.1 keep-alive (httpx), with failover across replica URLs.

    Exactly one of ``verifier_key`` (the verifier's X25519 public key, base64 or 32 raw
    bytes, as ``pipesd-verifier`` prints it) or ``psk`` (a pre-shared key, >= 32 bytes).
    """

    def __init__(self, urls: str | Sequence[str], *, verifier_key: str | bytes | None = None,
                 psk: str | bytes | None = None, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 limits: ChannelLimits = ChannelLimits()):
        urls = [check_url(u) for u in ([urls] if isinstance(urls, str) else list(urls))]
        if not urls:
            raise ConfigError("give at least one verifier URL")
        if (verifier_key is None) == (psk is None):
            raise ConfigError("pin the verifier's public key (verifier_key=..., printed by pipesd-verifier) "
                              "or give a pre-shared key (psk=...)")
        try:
            self._server_key = parse_public_key(verifier_key) if verifier_key is not None else None
            self._psk = parse_psk(psk) if psk is not None else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.limits = limits
        self._conn = _Connection(urls, connect_timeout, read_timeout)
        self._unopened: tuple[int, SecureChannel] | None = None   # (replica, channel) whose OPEN met a 429

    @property
    def urls(self) -> list[str]:
        return self._conn.urls

    @property
    def url(self) -> str:
        return self._conn.url

    @property
    def bytes_sent(self) -> int:
        return self._conn.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._conn.bytes_received

    # -- the protocol ---------------------------------------------------------------------
    def open_session(self, req: OpenSession) -> SessionOpened:
        # A handshake whose OPEN was refused as overloaded (429) is kept for the retry: the verifier
        # already holds that session, and a second handshake would leave it orphaned there.
        held, self._unopened = self._unopened, None
        if held is not None and held[0] == self._conn.current:
            self._conn.session = held[1]
            try:
                return self._open(req)
            except SessionLost:
                pass                     # the verifier dropped it meanwhile: a fresh handshake
        self._handshake()
        try:
            return self._open(req)
        except SessionLost:
            # The verifier forgot the handshake before its OPEN came: a flood pushed it out of the table of
            # handshakes not yet proven, or it expired there. One handshake more; if that one is forgotten
            # too, the verifier is as good as unreachable (the offline policy applies, the prober retries).
            self._handshake()
            try:
                return self._open(req)
            except SessionLost as exc:
                raise VerifierUnavailable(f"the verifier forgot two handshakes before their OPEN ({exc.message})") \
                    from exc

    def _open(self, req: OpenSession) -> SessionOpened:
        """OPEN (the vocabulary check) on the channel just established."""
        conn = self._conn
        channel = conn.session
        try:
            return SessionOpened.from_dict(self._exchange(FrameType.OPEN, req.to_dict(), FrameType.OPENED))
        except Overloaded:
            if conn.session is channel and channel is not None:
                self._unopened = (conn.current, channel)
            conn.session = None          # not open yet: no round may go up on it
            raise

    def _handshake(self) -> None:
        conn = self._conn
        attempt = unreachable = 0
        while True:
            conn.session = None
            hs = ClientHandshake(server_public=self._server_key, psk=self._psk)
            try:
                resp = conn.post(HANDSHAKE_PATH, encode(hs.hello()), MEDIA_MSGPACK, conn.call_timeout())
            except SessionLost as exc:
                # That replica is unreachable (or another request found so and moved on first): the
                # connection moved to the next, try there; every replica once at most.
                unreachable += 1
                if unreachable >= len(conn.urls) + isinstance(exc, _Moved):
                    raise VerifierUnavailable(f"no verifier replica reachable ({exc.message})") from exc
                continue
            if resp.status_code == 200:
                break
            attempt += 1
            if not _from_intermediary(resp) or attempt >= HANDSHAKE_TRIES:
                raise _plain_error(resp)
            time.sleep(0.2 * attempt)          # a replica died: give the load balancer a moment to route around it
        try:
            conn.session = hs.finish(decode(resp.content), self.limits)
        except (HandshakeError, WireError) as exc:
            raise HandshakeFailed(conn.url, str(exc)) from None

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        return VerifyResponse.from_dict(self._exchange(FrameType.VERIFY, req.to_dict(), FrameType.RESULT))

    def open_round(self) -> "RoundStream":
        return RoundStream(self._conn)

    def set_deadline(self, seconds: float | None) -> None:
        """Bound the next one-shot calls (handshake, OPEN, whole NAV) by `seconds`, connect and read,
        within the configured timeouts: the engine derives it from the profiled link."""
        self._conn.deadline = seconds

    def probe(self, timeout: float = 1.0) -> bool:
        """Is a verifier ready? Tries the replicas in order from the current one and moves to the
        first that answers (its sessions are new to it: the caller opens one). Never raises."""
        conn = self._conn
        for i in range(len(conn.urls)):
            index = (conn.current + i) % len(conn.urls)
            try:
                ok = httpx.get(conn.urls[index] + READY_PATH, timeout=timeout).status_code == 200
            except (httpx.HTTPError, OSError):
                ok = False
            if ok:
                if index != conn.current:
                    conn.move_to(index)
                return True
        return False

    def close(self) -> None:
        held, self._unopened = self._unopened, None
        if self._conn.session is None and held is not None and held[0] == self._conn.current:
            self._conn.session = held[1]      # say goodbye to a session left unopened by a 429 too
        if self._conn.session is not None:
            self._say_goodbye()
            self._conn.session = None
        self._conn.http.close()
        self._conn.workers.close()

    def _say_goodbye(self) -> None:
        """CLOSE the session, retrying a refusal as overloaded (429) after its Retry-After, a couple of
        times within ``CLOSE_WAIT_S``: a CLOSE dropped leaves the session on the verifier until its TTL.
        Any other failure ends it at once (the verifier forgets the session by itself)."""
        give_up = time.monotonic() + CLOSE_WAIT_S
        for attempt in range(1, CLOSE_TRIES + 1):
            try:
                self._exchange(FrameType.CLOSE, {}, FrameType.CLOSED)
                return
            except Overloaded as exc:
                asked = exc.retry_after_s if exc.retry_after_s is not None else 0.25
                wait = min(1.0, max(0.05, asked)) * (1 + 0.5 * random.random())
                if attempt == CLOSE_TRIES or time.monotonic() + wait > give_up:
                    return
                time.sleep(wait)
            except (VerifierError, VerifierUnavailable):
                return

    def _exchange(self, ftype: FrameType, body: dict, expect: FrameType) -> dict:
        conn = self._conn
        channel = conn.channel()
        frame = channel.seal(ftype, body)
        return conn.open_reply(channel, conn.post(FRAMES_PATH, frame, MEDIA_FRAME, conn.call_timeout()),
                               parse_header(frame).seq, expect)


def open_sealed_reply(channel: SecureChannel, status: int, reply: bytes, request_seq: int, expect: FrameType,
                      retry_after_s: float | None = None) -> dict:
    """The body of the verifier's sealed reply to frame `request_seq`, which should be of type `expect`;
    an ERROR frame becomes the ``VerifierError`` it carries (``Overloaded`` for ``overloaded``, with its
    ``retry_after_s`` detail, else `retry_after_s`, the reply's Retry-After), a reply that does not
    authenticate or answers something else ``VerifierUnavailable``. (Any transport of sealed frames uses this.)"""
    try:
        header, msg = channel.open(reply)
    except WireError as exc:
        raise VerifierUnavailable(f"the verifier's reply failed authentication ({exc.code.value})") from None
    if header.ack != request_seq:
        raise VerifierUnavailable("the verifier's reply answers another request")
    if header.type == FrameType.ERROR:
        err = dict(msg.get("error", {}))
        code, message = str(err.pop("code", "error")), str(err.pop("message", ""))
        if code == ErrorCode.OVERLOADED:
            exact = _seconds(err.get("retry_after_s"))
            raise Overloaded(status, code, message, err, exact if exact is not None else retry_after_s)
        cls = VocabMismatchError if code == ErrorCode.VOCAB_MISMATCH else VerifierError
        raise cls(status, code, message, err)
    if header.type != expect:
        raise VerifierUnavailable(f"unexpected reply frame type {header.type}")
    return msg


def _from_intermediary(resp: httpx.Response) -> bool:
    """A server error that no verifier wrote (ours always carry a JSON or sealed error): a proxy's."""
    ctype = resp.headers.get("content-type", "")
    return resp.status_code >= 500 and not ctype.startswith(("application/json", MEDIA_FRAME))


def _plain_error(resp: httpx.Response) -> VerifierError:
    try:
        err = resp.json()["error"]
        code, message = str(err.pop("code")), str(err.pop("message", ""))
    except Exception:
        code, message, err = "http_error", resp.text[:200], {}
    if code == ErrorCode.OVERLOADED or resp.status_code == ErrorCode.OVERLOADED.http_status:
        # A 429 from the verifier (or a proxy in front of it): too busy now; the engine waits and retries.
        # The verifier's own says how long in its body, in fractional seconds (``retry_after_s``); its
        # Retry-After header, whole seconds as HTTP has them, is rounded up. A proxy's has the header only.
        code = ErrorCode.OVERLOADED if code == "http_error" else code
        exact = _seconds(err.get("retry_after_s"))
        return Overloaded(resp.status_code, code, message, err,
                          exact if exact is not None else parse_retry_after(resp.headers.get("retry-after")))
    return VerifierError(resp.status_code, code, message, err)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds from now: delta-seconds (a fraction tolerated) or an HTTP
    date; None when absent or unreadable. Never negative; the caller bounds it."""
    if value is None:
        return None
    value = value.strip()
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _seconds(value: object) -> float | None:
    """A non-negative, finite number of seconds (a number or its text), else None."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class RoundStream:
    """A ``RoundChannel`` over HTTP: one round's draft batches as frames on a single streaming POST to ``/v1/rounds``.

    Batches are written, length-prefixed, into the request body as soon as they are due
    (``not_before``, used by link emulation), on this stream's own thread; the verifier
    stages each as it arrives and answers the request with the final batch's NAV result.
    No per-batch round trip: the next batch follows the previous one on the same TCP
    stream. Frames are sealed when queued, on the caller's thread, so their sequence numbers
    follow the order in which the engine sends them -- a pipelined round after the round it
    was drafted on -- and the verifier restores that order across connections (the next
    round's stream may overtake this one). ``abandon`` ends a round that went stale. A frame
    numbered but never written (its request failed first) leaves a gap in the numbers, which the
    verifier waits out for its ``reorder_wait_s`` before it runs the frames after it.
    """

    def __init__(self, conn: _Connection, on_sent=None):
        self._conn = conn
        self._queue: queue.Queue = queue.Queue()
        self._final_seq: int | None = None
        self.on_sent = on_sent          # callback(tokens, start, end) for each non-final batch written
        self.result: Future = Future()
        try:
            self._channel = conn.channel()
        except SessionLost as exc:      # lost while this round was being drafted: the result says so
            self.result.set_exception(exc)
            return
        conn.workers.submit(self._run)

    def send(self, req: VerifyRequest, not_before: float | None = None,
             on_link: tuple[float, float] | None = None) -> None:
        """Queue a batch. `not_before`: write it no earlier (link emulation). `on_link`: when it really
        occupied the link (start, end), if known; else the send time is measured here."""
        if not self.result.done():
            frame = self._channel.seal(FrameType.VERIFY, req.to_dict())
            self._queue.put((req, frame, time.perf_counter(), not_before, on_link))

    def abandon(self) -> None:
        self._queue.put(None)

    def _body(self):
        sent, last_end = 0, 0.0
        while (item := self._queue.get()) is not None:
            req, frame, ready, not_before, on_link = item
            if not_before is not None:
                delay = not_before - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
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
            resp = self._conn.post(ROUNDS_PATH, self._body(), MEDIA_STREAM)
            self._conn.count(self._sent_bytes, 0)
            if self._final_seq is None:
                if resp.status_code == ErrorCode.OVERLOADED.http_status:
                    raise _plain_error(resp)   # refused as overloaded before the final batch went up
                self.result.cancel()
                return
            msg = self._conn.open_reply(self._channel, resp, self._final_seq, FrameType.RESULT)
            self.result.set_result(VerifyResponse.from_dict(msg))
        except BaseException as exc:  # delivered to whoever waits for the result
            if not self.result.cancelled():
                self.result.set_exception(exc)
