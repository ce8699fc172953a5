"""Emulated conditions for experiments on one machine: a network link, and a slower device.

``EmulatedLink``: a network link between the edge and a real verifier, in-process.

Wraps any ``Verifier`` (normally the real HTTP one on loopback) and delays each message as a
store-and-forward link would: the uplink and the downlink are each a serial resource with a
bandwidth, plus a one-way propagation delay. Concurrent senders (the uploader and the NAV
thread) queue for the same uplink, so a batch that goes up during NAV delays the next one --
which is what the DP schedule plans around. Sizes are those of the real encoded messages
(msgpack body + 53 bytes of frame header and tag), plus an optional per-draft-token payload
to emulate links that carry the draft's probability distribution (the paper's ~0.29 MB/token).
The kernel here has no netem; this needs no root.

``SlowedDrafter``: a drafter that takes extra time per drafted token, as the paper emulated
phones and IoT boards (its S2 and S3 scenarios).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from privacy import BatchAck, OpenSession, SessionOpened, VerifyRequest, VerifyResponse, encode

FRAME_OVERHEAD = 53   # frame header (37) + AEAD tag (16)


@dataclass(frozen=True)
class LinkProfile:
    up_mbps: float = 20.0
    down_mbps: float = 200.0
    rtt_ms: float = 20.0
    payload_bytes_per_token: int = 0   # extra uplink bytes per draft token (emulated distribution payload)

    def describe(self) -> str:
        s = f"{self.up_mbps:g}/{self.down_mbps:g} Mbps up/down, RTT {self.rtt_ms:g} ms"
        return s + (f", +{self.payload_bytes_per_token} B/draft token" if self.payload_bytes_per_token else "")


class _SerialLink:
    """One direction: a FIFO transmitter of `mbps` followed by a fixed propagation delay."""

    def __init__(self, mbps: float, delay_s: float):
        self.bytes_per_s = mbps * 1e6 / 8
        self.delay_s = delay_s
        self._free_at = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> tuple[float, float, float]:
        """Queue `nbytes` now: (transmission start, transmission end, arrival at the far end)."""
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + nbytes / self.bytes_per_s
            return start, self._free_at, self._free_at + self.delay_s

    def release(self, start: float, end: float) -> None:
        """Give back a reservation that has not started, if nothing was queued after it."""
        with self._lock:
            if self._free_at == end and start > time.perf_counter():
                self._free_at = start

    def carry(self, nbytes: int) -> None:
        """Block the caller until `nbytes` sent now would have arrived at the far end."""
        _sleep_until(self.reserve(nbytes)[2])


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


class EmulatedLink:
    """A ``Verifier`` that forwards to `inner` across an emulated link (see module docstring)."""

    def __init__(self, inner, profile: LinkProfile):
        self.inner = inner
        self.profile = profile
        self.up = _SerialLink(profile.up_mbps, profile.rtt_ms / 2e3)
        self.down = _SerialLink(profile.down_mbps, profile.rtt_ms / 2e3)

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def _round_trip(self, up_bytes: int, call, reply_size):
        self.up.carry(up_bytes)
        reply = call()
        self.down.carry(reply_size(reply))
        return reply

    def _request_bytes(self, req: VerifyRequest) -> int:
        return len(encode(req.to_dict())) + FRAME_OVERHEAD + self.profile.payload_bytes_per_token * len(req.draft)

    @staticmethod
    def _reply_bytes(reply) -> int:
        return len(encode(reply.to_dict())) + FRAME_OVERHEAD

    def open_session(self, req: OpenSession) -> SessionOpened:
        # Handshake and OPEN: two round trips of small messages.
        self.up.carry(200)
        self.down.carry(200)
        return self._round_trip(len(encode(req.to_dict())) + FRAME_OVERHEAD, lambda: self.inner.open_session(req),
                                self._reply_bytes)

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        return self._round_trip(self._request_bytes(req), lambda: self.inner.verify(req), self._reply_bytes)

    def stage(self, req: VerifyRequest) -> BatchAck:
        return self._round_trip(self._request_bytes(req), lambda: self.inner.stage(req), self._reply_bytes)

    def open_round(self) -> "_EmulatedRound":
        return _EmulatedRound(self)

    def close(self) -> None:
        self.inner.close()


class _EmulatedRound:
    """A round stream across the emulated link: each batch is written into the real stream when it
    would have arrived, and the verifier's reply is held for the downlink."""

    def __init__(self, link: EmulatedLink):
        self.link = link
        self.inner = link.inner.open_round()
        self._reservations: list[tuple[float, float]] = []
        self.result: Future = Future()
        self.inner.result.add_done_callback(self._deliver)

    @property
    def on_sent(self):
        return self.inner.on_sent

    @on_sent.setter
    def on_sent(self, callback) -> None:
        self.inner.on_sent = callback

    def send(self, req: VerifyRequest) -> None:
        start, end, arrival = self.link.up.reserve(self.link._request_bytes(req) + 4)
        self._reservations.append((start, end))
        self.inner.send(req, not_before=arrival, on_link=(start, end))

    def abandon(self) -> None:
        for start, end in reversed(self._reservations):   # batches not yet on the wire free the link
            self.link.up.release(start, end)
        self.inner.abandon()

    def _deliver(self, inner: Future) -> None:
        if inner.cancelled():
            self.result.cancel()
        elif inner.exception() is not None:
            self.result.set_exception(inner.exception())
        else:
            reply = inner.result()
            self.link.down.carry(self.link._reply_bytes(reply))
            self.result.set_result(reply)


class SlowedDrafter:
    """Wraps a drafter and adds `seconds_per_token` (a sleep) to every drafted token."""

    def __init__(self, inner, seconds_per_token: float):
        self.inner = inner
        self.seconds_per_token = seconds_per_token

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def next_token(self):
        d = self.inner.next_token()
        if self.seconds_per_token > 0:
            time.sleep(self.seconds_per_token)
        return d
