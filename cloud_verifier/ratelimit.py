"""Per-source handshake rate limits: token buckets keyed by client IP and by affinity token.

A handshake costs the verifier two X25519 operations and, until its client seals a frame, a slot in
the pre-authentication table (``service.py``). Every source gets a bucket of ``burst`` handshakes
refilled at ``rate`` per second; a handshake beyond it is answered 429 ``overloaded`` with a
``Retry-After`` saying when the bucket holds a token again. Two tables, each with its own settings:

* per client IP (``handshake_rate`` / ``handshake_burst``): what a source cannot choose. Behind a
  proxy the verifier sees the proxy's address, so the default is generous (a fleet behind one NAT);
* per affinity token (``x-pipesd-affinity``, ``client_handshake_rate`` / ``client_handshake_burst``):
  one edge client object, which handshakes once per session lost. A client that rotates its token
  gains nothing: its IP bucket still counts every handshake.

Each table keeps at most ``max_keys`` buckets; beyond, the least recently used is dropped, which can
only make the limit more lenient for that source (a dropped bucket starts full), never refuse another.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable

MAX_TOKEN_CHARS = 64      # an affinity token longer than this is keyed by its first 64 characters


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` per second (rate <= 0: no limit)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 65_536, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_keys, self.clock = rate, max(1, burst), max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        held = self._buckets.get(key)
        return float(self.burst) if held is None else min(float(self.burst), held[0] + (now - held[1]) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until `key` may take a token (0.0: now)."""
        if self.rate <= 0:
            return 0.0
        tokens = self._tokens(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens = self._tokens(key, now)
        self._buckets.pop(key, None)
        self._buckets[key] = (max(0.0, tokens - 1.0), now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


class HandshakeLimiter:
    """The verifier's two handshake tables; ``admit`` charges both or neither."""

    def __init__(self, ip_rate: float, ip_burst: int, client_rate: float, client_burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.by_ip = TokenBuckets(ip_rate, ip_burst, clock=clock)
        self.by_client = TokenBuckets(client_rate, client_burst, clock=clock)

    def admit(self, ip: str | None, token: str | None) -> int:
        """0 if a handshake from (`ip`, affinity `token`) may go ahead (and charge it), else the whole
        seconds a ``Retry-After`` should say (at least 1)."""
        ip = ip or "-"
        token = token[:MAX_TOKEN_CHARS] if token else None
        wait = max(self.by_ip.wait(ip), self.by_client.wait(token) if token else 0.0)
        if wait > 0:
            return max(1, math.ceil(wait))
        self.by_ip.take(ip)
        if token:
            self.by_client.take(token)
        return 0
