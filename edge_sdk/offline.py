"""Staying useful when the cloud goes away: the circuit breaker and the offline policies.

After a failed or overdue NAV the engine opens the breaker: it keeps generating with the draft
alone and a background prober asks the verifier whether it is back, waiting a jittered,
exponentially growing delay between tries (so a fleet of devices does not hammer a verifier that
is coming back up). When a probe succeeds the breaker closes and the next round resyncs the
session from the current position.

Offline policies (what the app chooses, ``EdgeClient(offline=...)``):

* ``continue`` (default): emit draft tokens at once, marked ``verified=False``. Guarantee: the
  generation never blocks on the cloud longer than the NAV deadline; every token before the first
  unverified one equals the target's greedy output; tokens after an offline stretch are verified
  against the text as emitted (unverified tokens included).
* ``wait``: block up to ``offline_wait_s`` for the verifier to come back, then behave as
  ``continue``. Guarantee: as ``continue``, with the whole text equal to target greedy when the
  outage is shorter than the wait.
* ``verify_late``: emit draft tokens marked unverified and provisional; once the verifier is
  back, send the unverified tail for verification; if the target disagrees, emit a revision event
  that replaces the tail from the first rejected token. Guarantee: after the revisions the whole
  text equals the target's greedy output (if the verifier comes back before the generation ends;
  otherwise the tail stays unverified, as marked).
* ``fail``: raise ``VerifierUnavailable`` (``VerifierTimeout`` for an overdue NAV) at the first
  failure instead of generating alone. Guarantee: every token the generation yields is verified;
  the tokens yielded before the error equal the target's greedy output. The CLI's default: a user
  who named a verifier asked for verified text.

Overload is not an outage: a verifier that answers ``429 overloaded`` is waited for (its
``Retry-After``, bounded and jittered: ``OverloadBackoff``) and the request retried; only overload
that outlasts the NAV deadline sends the generation offline, under the policy above (``fail``
raises ``OverloadTimeout``, a ``VerifierTimeout``).

This module is pure (no I/O, an injectable clock and random generator) so its timing logic is
tested in microseconds.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

OFFLINE_POLICIES = ("continue", "wait", "verify_late", "fail")


@dataclass
class CircuitBreaker:
    """Closed (use the cloud) or open (generate locally, probe in the background)."""

    base_delay_s: float = 0.05       # first probe delay; doubles per failed probe
    max_delay_s: float = 0.5         # so collaboration resumes within ~0.5 s of the verifier's return
    jitter: float = 0.5              # each delay is drawn from [1 - jitter, 1] x the nominal delay
    clock: callable = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self):
        self.open_since: float | None = None
        self.failed_probes = 0
        self.next_probe_at = 0.0
        self.trips = 0

    @property
    def is_open(self) -> bool:
        return self.open_since is not None

    def trip(self, not_before_s: float = 0.0) -> None:
        """A NAV failed or overran its deadline: go offline and schedule the first probe, no sooner than
        `not_before_s` from now (an overloaded verifier's Retry-After)."""
        if self.open_since is None:
            self.open_since = self.clock()
            self.trips += 1
        self.failed_probes = 0
        self.next_probe_at = self.clock() + max(self._delay(), not_before_s)

    def probe_due(self) -> bool:
        return self.is_open and self.clock() >= self.next_probe_at

    def probe_failed(self) -> None:
        self.failed_probes += 1
        self.next_probe_at = self.clock() + self._delay()

    def close(self) -> float:
        """The verifier answered: back online. Returns how long the breaker was open (s)."""
        opened, self.open_since = self.open_since, None
        self.failed_probes = 0
        return self.clock() - opened if opened is not None else 0.0

    def delay_until_probe(self) -> float:
        return max(0.0, self.next_probe_at - self.clock())

    def _delay(self) -> float:
        nominal = min(self.max_delay_s, self.base_delay_s * 2 ** self.failed_probes)
        return nominal * (1 - self.jitter * self.rng.random())


@dataclass
class OverloadBackoff:
    """How long to wait before retrying a request the verifier refused as overloaded (429).

    The verifier's ``Retry-After`` is honoured -- never retried sooner -- but cut to `max_wait_s` (a
    verifier, or a proxy in front of it, asking for minutes must not stall a generation that has a NAV
    deadline), with `default_wait_s` when it named none. Each wait is stretched by up to `jitter` x
    itself, drawn at random, so clients refused together do not come back in lock-step; time already
    gone since the refusal (a drafted-ahead round refused while another was verified) counts towards
    it. A request refused again waits `growth` x longer each time (up to `max_wait_s`): a verifier's
    Retry-After is what it expects one slot to take (a fraction of a second), and one still full when
    that is over is busier than it could tell. At most `max_tries` retries per request; the caller also
    stops at its deadline (``fits``), whichever comes first, and then follows the offline policy. The
    engine retries a request's first refusal in any case, with a whole NAV deadline after the wait
    (``Decoding._overload_wait``), so one refusal late in a round never sends it offline. For
    `serial_s` after a refusal a generation keeps one request in flight (no drafting ahead): its own
    overlapping requests would only be refused too.
    """

    max_wait_s: float = 2.0          # one wait at most, whatever Retry-After says
    default_wait_s: float = 0.5      # a 429 without Retry-After
    min_wait_s: float = 0.05         # "Retry-After: 0" still yields the verifier a moment
    jitter: float = 0.5              # each wait drawn from [1, 1 + jitter] x the asked delay
    max_tries: int = 12              # retries of one request
    growth: float = 2.0              # each further refusal of one request: the asked wait x growth^(refusals - 1)
    serial_s: float = 5.0            # one request in flight at a time for this long after a refusal
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry_after_s: float | None, elapsed_s: float = 0.0, tries: int = 1) -> float:
        """The wait before the next try, given what the verifier asked for (None: nothing), the time
        gone since it did and how many times this request has been refused (`tries`, 1: once)."""
        asked = self.default_wait_s if retry_after_s is None or not retry_after_s >= 0 else retry_after_s
        grown = max(self.min_wait_s, asked) * self.growth ** min(max(0, tries - 1), 32)
        nominal = min(self.max_wait_s, grown)
        return max(self.min_wait_s, nominal * (1 + self.jitter * self.rng.random()) - max(0.0, elapsed_s))

    def fits(self, tries: int, delay: float, now: float, deadline: float) -> bool:
        """May try number `tries` (1: the first retry) wait `delay` from `now` and still be in time?"""
        return tries <= self.max_tries and now + delay < deadline


def nav_deadline(median_nav_s: float | None, configured: float | None, floor_s: float = 2.0,
                 factor: float = 8.0) -> float:
    """How long to wait for a NAV reply before declaring the verifier gone: configured, else a
    generous multiple of what NAV has taken recently, never below `floor_s`."""
    if configured is not None:
        return configured
    return max(floor_s, factor * median_nav_s) if median_nav_s else floor_s
