"""Emulated conditions for experiments on one machine: a network link, and a slower device.

``EmulatedLink``: a network link between the edge and a real verifier, in-process: a ``Verifier``
an ``EdgeClient(verifier=...)`` uses like the real one.

Wraps any ``Verifier`` (normally the real HTTP one on loopback) and delays each message as a
store-and-forward link would: the uplink and the downlink are each a serial transmitter (a
token-bucket shaper with no burst allowance) with a bandwidth, followed by a one-way propagation
delay with optional jitter. Concurrent senders (the uploader and the NAV thread) queue for the
same uplink, so a batch that goes up during NAV delays the next one -- which is what the DP
schedule plans around. Sizes are those of the real encoded messages (msgpack body + 53 bytes of
frame header and tag), plus an optional per-draft-token payload to emulate links that carry the
draft's probability distribution (the paper's ~0.29 MB/token).

Also: loss (a message that meets it arrives a retransmission timeout late, as TCP would deliver
it), a time-varying bandwidth trace (``BandwidthTrace``), and the link going down and up
(``EmulatedLink.set_down``). Every random draw comes from a generator seeded by the profile, and
deliveries stay in order (TCP), so a run is reproducible. ``linkproxy.LinkProxy`` puts the same
link model in front of a real verifier as a TCP proxy. The kernel here has no netem; none of this
needs root.

``SlowedDrafter``: a drafter that takes extra time per drafted token, as the paper emulated
phones and IoT boards (its S2 and S3 scenarios).
"""

from __future__ import annotations

import csv
import math
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from privacy import OpenSession, SessionOpened, VerifyRequest, VerifyResponse, encode

from edge_sdk import HttpVerifier, VerifierUnavailable
from edge_sdk.drafter import DraftInterrupted

FRAME_OVERHEAD = 53   # frame header (37) + AEAD tag (16)


class LinkDown(VerifierUnavailable):
    """The emulated link is down: nothing gets through until it is up again."""


@dataclass(frozen=True)
class BandwidthTrace:
    """Bandwidth that changes over time: ``segments`` of (seconds, up Mbps, down Mbps), repeated.

    Time 0 is when the link is created. Load one from a CSV file (``seconds,up_mbps,down_mbps``
    per line) or draw one from a seeded generator (the paper's S4: uplink 10-80 Mbps, downlink
    150-280 Mbps, a new value every 20 s).
    """

    segments: tuple[tuple[float, float, float], ...]

    def __post_init__(self):
        if not self.segments or any(not (math.isfinite(x) and x > 0) for seg in self.segments for x in seg):
            raise ValueError("a trace needs segments of finite, positive duration and bandwidth")

    @classmethod
    def generated(cls, seed: int = 0, up_mbps: tuple[float, float] = (10.0, 80.0),
                  down_mbps: tuple[float, float] = (150.0, 280.0), every_s: float = 20.0,
                  segments: int = 30) -> "BandwidthTrace":
        rng = random.Random(seed)
        return cls(tuple((every_s, round(rng.uniform(*up_mbps), 1), round(rng.uniform(*down_mbps), 1))
                         for _ in range(segments)))

    @classmethod
    def from_file(cls, path: str | Path) -> "BandwidthTrace":
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
        try:
            return cls(tuple((float(d), float(u), float(w)) for d, u, w in rows))
        except ValueError as exc:
            raise ValueError(f"{path}: each line must be seconds,up_mbps,down_mbps ({exc})") from None

    @property
    def period(self) -> float:
        return sum(d for d, _, _ in self.segments)

    def mbps(self, t: float, direction: int) -> tuple[float, float]:
        """(bandwidth of `direction` (1 up, 2 down) at time t, seconds until it next changes)."""
        i, end = self.locate(t)
        return self.segments[i][direction], end - t

    def locate(self, t: float) -> tuple[int, float]:
        """(index of the segment in force at time t >= 0, the time at which it ends)."""
        cycle = math.floor(t / self.period)
        end = cycle * self.period
        for i, seg in enumerate(self.segments):
            end += seg[0]
            if t < end:
                return i, end
        return 0, end + self.segments[0][0]   # t sat exactly on the cycle's end: the next cycle's first


@dataclass(frozen=True)
class LinkProfile:
    up_mbps: float = 20.0
    down_mbps: float = 200.0
    rtt_ms: float = 20.0
    payload_bytes_per_token: int = 0   # extra uplink bytes per draft token (emulated distribution payload)
    jitter_ms: float = 0.0             # one-way delay varies uniformly in [-jitter, +jitter] (never below 0)
    loss: float = 0.0                  # probability that a message is lost once and retransmitted
    rto_ms: float = 200.0              # how late a lost message arrives (TCP's minimum retransmission timeout)
    drop_replies: float = 0.0          # probability that a reply never arrives (the connection breaks after
                                       # the verifier acted): the edge sees VerifierUnavailable and retries
    trace: BandwidthTrace | None = None   # time-varying bandwidth; overrides up_mbps/down_mbps
    seed: int = 0

    def __post_init__(self):
        if self.up_mbps <= 0 or self.down_mbps <= 0 or self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError("bandwidths must be positive, RTT and jitter non-negative")
        if not 0 <= self.loss < 1 or not 0 <= self.drop_replies < 1:
            raise ValueError("loss and drop_replies are probabilities in [0, 1)")

    def describe(self) -> str:
        s = (f"trace of {len(self.trace.segments)} segments" if self.trace
             else f"{self.up_mbps:g}/{self.down_mbps:g} Mbps up/down")
        s += f", RTT {self.rtt_ms:g} ms"
        if self.jitter_ms:
            s += f" ±{self.jitter_ms:g}"
        if self.loss:
            s += f", loss {self.loss:g}"
        return s + (f", +{self.payload_bytes_per_token} B/draft token" if self.payload_bytes_per_token else "")


class SerialLink:
    """One direction: a FIFO transmitter (bandwidth, possibly following a trace) then a propagation
    delay with jitter and loss. Deliveries keep their order, as on one TCP connection.

    ``reserve`` only computes times (no sleeping), so threads and asyncio code can both use it.
    """

    def __init__(self, profile: LinkProfile, direction: int, clock=time.perf_counter):
        self.profile = profile
        self.direction = direction              # 1 up, 2 down (column of a trace segment)
        self.mbps = profile.up_mbps if direction == 1 else profile.down_mbps
        self.delay_s = profile.rtt_ms / 2e3
        self.clock = clock
        self.t0 = clock()
        self._rng = random.Random(profile.seed * 2 + direction)
        self._free_at = 0.0
        self._last_arrival = 0.0
        self._arrival_before: dict[float, float] = {}   # reservation end -> last arrival before it
        self._lock = threading.Lock()
        self.cut = False                        # the link is down
        self.log: list[tuple[float, float, int]] | None = None   # set to a list: (start, end, bytes) on the air

    def _transmit_end(self, start: float, nbytes: int) -> float:
        trace = self.profile.trace
        if trace is None:
            return start + nbytes * 8 / (self.mbps * 1e6)
        rel, left = start - self.t0, nbytes * 8.0
        i, end = trace.locate(rel)
        while True:                                # walk the trace segment by segment until the bits are out
            bits_per_s = trace.segments[i][self.direction] * 1e6
            if left <= bits_per_s * (end - rel):
                return self.t0 + rel + left / bits_per_s
            left -= bits_per_s * (end - rel)
            i = (i + 1) % len(trace.segments)
            rel, end = end, end + trace.segments[i][0]

    def reserve(self, nbytes: int) -> tuple[float, float, float]:
        """Queue `nbytes` now: (transmission start, transmission end, arrival at the far end)."""
        with self._lock:
            if self.cut:
                raise LinkDown("the emulated link is down")
            start = max(self.clock(), self._free_at)
            self._free_at = self._transmit_end(start, nbytes)
            if len(self._arrival_before) > 256:      # forget reservations already on the wire
                now = self.clock()
                self._arrival_before = {e: a for e, a in self._arrival_before.items() if e > now}
            self._arrival_before[self._free_at] = self._last_arrival
            delay = self.delay_s
            if self.profile.jitter_ms:
                delay = max(0.0, delay + self._rng.uniform(-1, 1) * self.profile.jitter_ms / 1e3)
            if self.profile.loss and self._rng.random() < self.profile.loss:
                delay += self.profile.rto_ms / 1e3
            self._last_arrival = max(self._last_arrival, self._free_at + delay)
            if self.log is not None:
                self.log.append((start, self._free_at, nbytes))
            return start, self._free_at, self._last_arrival

    def release(self, start: float, end: float) -> None:
        """Give back a reservation that has not started, if nothing was queued after it."""
        with self._lock:
            if self._free_at == end and start > self.clock():
                self._free_at = start
                self._last_arrival = self._arrival_before.pop(end, self._last_arrival)
                if self.log and self.log[-1][:2] == (start, end):
                    self.log.pop()                # never went on the air

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
        self.up = SerialLink(profile, 1)
        self.down = SerialLink(profile, 2)
        self._drops = random.Random(profile.seed * 2 + 3)
        self._drops_lock = threading.Lock()

    @classmethod
    def http(cls, url: str, profile: LinkProfile, **http_args) -> "EmulatedLink":
        """The real sealed-HTTP transport to `url` (``HttpVerifier(url, **http_args)``) behind this link."""
        return cls(HttpVerifier(url, **http_args), profile)

    def reply_dropped(self) -> bool:
        if not self.profile.drop_replies:
            return False
        with self._drops_lock:
            return self._drops.random() < self.profile.drop_replies

    def set_down(self, down: bool = True) -> None:
        """Cut the link (every message raises ``LinkDown``) or bring it back."""
        self.up.cut = self.down.cut = down

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
        if self.reply_dropped():
            raise VerifierUnavailable("emulated link: the reply was lost")
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

    def set_deadline(self, seconds: float | None) -> None:
        self.inner.set_deadline(seconds)

    def probe(self, timeout: float = 1.0) -> bool:
        """A health check across the link: False while it is cut."""
        try:
            self.up.carry(120)
            self.down.carry(120)
        except LinkDown:
            return False
        return self.inner.probe(timeout)

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
            try:
                self.link.down.carry(self.link._reply_bytes(reply))
                if self.link.reply_dropped():
                    raise VerifierUnavailable("emulated link: the reply was lost")
            except VerifierUnavailable as exc:
                self.result.set_exception(exc)
            else:
                self.result.set_result(reply)


class SlowedDrafter:
    """Wraps a drafter and adds `seconds_per_token` (a sleep) to every drafted token.

    ``slept_s`` adds up the emulated compute, so an energy model can charge it as the slower device
    would have spent it (busy, not asleep).
    """

    def __init__(self, inner, seconds_per_token: float):
        self.inner = inner
        self.seconds_per_token = seconds_per_token
        self.slept_s = 0.0
        self._stop = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def next_token(self):
        d = self.inner.next_token()
        self._slow(1)
        return d

    # What a level of n tree nodes, decoded in one batch, costs against one token: 1 + LEVEL_NODE * (n - 1).
    # Measured for the embedded draft on this CPU's llama.cpp (a level of 8 nodes 1.2 ms, one token
    # 0.36 ms); a larger draft on a phone, bound by memory bandwidth, batches better than that.
    LEVEL_NODE = 0.33

    def tree(self, chain: int = 0):
        """The inner drafter's token tree; each level grown is charged as one batched decode
        (``LEVEL_NODE``), the tree's first row as a token (on a chain: the chain's last token evaluated)."""
        return _SlowedTree(self, self.inner.tree(chain))

    def _slow(self, tokens: int) -> None:
        if self.seconds_per_token > 0:
            t = time.perf_counter()
            stopped = self._stop.wait(self.seconds_per_token * tokens)
            self.slept_s += min(time.perf_counter() - t, self.seconds_per_token * tokens)
            if stopped:
                self._stop.clear()
                raise DraftInterrupted("the token was no longer wanted")

    def interrupt(self, on: bool = True) -> None:
        """The emulated compute stops at once, as the slower device's llama.cpp would stop at its next
        graph node (``LlamaCppDrafter.interrupt``); the real part of the token is interrupted too."""
        self._stop.set() if on else self._stop.clear()
        self.inner.interrupt(on)


class _SlowedTree:
    def __init__(self, slowed: SlowedDrafter, inner):
        self.slowed, self.inner = slowed, inner
        slowed._slow(1)                  # the tree's first row: what drafting a token costs

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def grow(self, parents, tokens):
        rows = self.inner.grow(parents, tokens)
        self.slowed._slow(1 + SlowedDrafter.LEVEL_NODE * (len(tokens) - 1))
        return rows
