"""The verifier as the engine sees it, across generations: one session, its limits, and whether it answers.

``CloudSession`` owns the transport (``Verifier``), the open session (the verifier keeps its KV
cache between generations, so later prompts cost only their new tail), the vocabulary check, the
NAV deadline, and the offline machinery: the circuit breaker (``offline.py``), a background
prober that watches for the verifier's return while the device generates alone, and the backoff
with which requests refused as overloaded (429) are retried.

The prober runs only while a cloud generation is in progress (``active``): once none is -- the
client idle, or running only private / edge-only requests, which never touch the network -- it
stops before its next probe, and the breaker stays open. The next cloud generation probes once at
its start (when a probe is due) and restarts the prober if it is still offline.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from typing import Callable
from typing import Sequence

from privacy import ErrorCode, OpenSession, SessionOpened, vocab_fingerprint

from .errors import VocabMismatchError
from .offline import CircuitBreaker, OverloadBackoff, nav_deadline
from .profiler import LinkEstimate
from .transport import Verifier

DEFAULT_MAX_DRAFT = 64       # a round's cap until a session says what the verifier accepts


class CloudSession:
    """One edge's standing with one verifier (or its replicas)."""

    def __init__(self, verifier: Verifier, vocab_tokens: Sequence[str], vocab_size: int, *,
                 nav_deadline_s: float | None = None, breaker: CircuitBreaker | None = None,
                 probe_horizon_s: float = 600.0, max_lost_replies: int = 3,
                 overload: OverloadBackoff | None = None):
        self.verifier = verifier
        self.fingerprint = vocab_fingerprint(vocab_tokens)
        self.vocab_size = vocab_size
        self.nav_deadline_s = nav_deadline_s      # None: derived from the profiled link
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.probe_horizon_s = probe_horizon_s    # the prober gives up after this long offline (bounded)
        self.max_lost_replies = max_lost_replies  # lost replies retried per NAV before going offline
        self.overload = overload if overload is not None else OverloadBackoff()   # 429: wait, then retry
        self.opened: SessionOpened | None = None      # the session in use (None: none, or lost)
        self._limits: SessionOpened | None = None     # what the last session said the verifier accepts
        self._round_ids = count(1)                # never reused by this client: the verifier matches batches by round
        self._online = threading.Event()
        self._closing = threading.Event()
        self._prober: threading.Thread | None = None
        self._probe_lock = threading.Lock()       # the prober's start and stop against `_active`
        self._active = 0                          # cloud generations in progress (the prober runs only then)
        self._serial_until = 0.0                  # monotonic: one request in flight until then (overload)
        self._requests: ThreadPoolExecutor | None = None   # one-shot requests, one at a time (made when needed)

    # -- the session ---------------------------------------------------------------------
    @property
    def max_draft(self) -> int:
        """The longest round the verifier accepts (as its last session said)."""
        return self._limits.max_draft if self._limits else DEFAULT_MAX_DRAFT

    @property
    def rebases(self) -> bool:
        """Does the session in use answer a failed conditional round rebased (``VerifyRequest.after``)?"""
        opened = self.opened
        return opened is not None and opened.rebase

    @property
    def tree_nodes(self) -> int:
        """The largest token tree the session in use verifies (0: chains only, or no session)."""
        opened = self.opened
        return opened.tree_nodes if opened is not None else 0

    @property
    def max_context(self) -> int | None:
        """The target's context (as the verifier's last session said; None before any)."""
        return self._limits.max_context if self._limits else None

    def open(self, deadline_s: float) -> SessionOpened:
        """Handshake and OPEN (the vocabulary check) within `deadline_s`."""
        self.verifier.set_deadline(deadline_s)
        opened = self.verifier.open_session(OpenSession(self.fingerprint, self.vocab_size))
        if opened.vocab_fingerprint != self.fingerprint:  # the verifier should have refused already
            raise VocabMismatchError(ErrorCode.VOCAB_MISMATCH.http_status, ErrorCode.VOCAB_MISMATCH, f"the target {opened.model!r} uses another vocabulary")
        self.opened = self._limits = opened
        return opened

    def next_round_id(self) -> int:
        return next(self._round_ids)

    def submit(self, call: Callable[[], None]) -> None:
        """Run a one-shot request on the session's request thread (callers wait on what it resolves,
        up to their deadline; the thread outlives generations, so none pays for starting it)."""
        if self._requests is None:
            self._requests = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier-request")
        self._requests.submit(call)

    def nav_deadline(self, link: LinkEstimate, final_tokens: int) -> float:
        """How long a NAV (or a handshake) may take before the verifier counts as gone: the configured
        deadline, else a generous multiple of what the link suggests. Lenient on purpose: a one-token
        round trip per token of the final batch (beta may still be the prior when a policy sends no
        non-final batches); a false "offline" costs more than waiting."""
        expected = (link.nav_network or 0.0) * max(1, final_tokens) + link.verify
        return nav_deadline(expected, self.nav_deadline_s)

    # -- offline -------------------------------------------------------------------------
    @property
    def offline(self) -> bool:
        """The breaker is open: generations run on the device until the prober sees the verifier."""
        return self.breaker.is_open

    @property
    def back_online(self) -> bool:
        return self._online.is_set()

    def trip(self, not_before_s: float = 0.0) -> bool:
        """A NAV failed or overran: open the breaker, forget the session, probe in the background (the
        first probe no sooner than `not_before_s`: an overloaded verifier's Retry-After).
        True when this opened the breaker (False: it was open already)."""
        first = not self.breaker.is_open
        self.breaker.trip(not_before_s)
        self.opened = None
        self._online.clear()
        self.keep_probing()
        return first

    def keep_probing(self) -> None:
        """While offline, make sure a prober is watching (one that passed its horizon, or found no cloud
        generation in progress, has stopped)."""
        with self._probe_lock:
            if (self.breaker.is_open and not self._online.is_set() and not self._closing.is_set()
                    and (self._prober is None or not self._prober.is_alive())):
                self._prober = threading.Thread(target=self._probe_loop, name="verifier-probe", daemon=True)
                self._prober.start()

    @property
    def active(self) -> int:
        """Cloud generations in progress (private and edge-only ones do not count)."""
        return self._active

    def begin(self) -> None:
        """A cloud generation starts: the prober may run (it stops when none is in progress)."""
        with self._probe_lock:
            self._active += 1

    def end(self) -> None:
        """A cloud generation ended (finished, failed or closed)."""
        with self._probe_lock:
            self._active = max(0, self._active - 1)

    def probe_if_due(self, timeout_s: float = 0.25) -> bool:
        """Offline with no prober watching (it stopped while no cloud generation ran): probe once now,
        if a probe is due, so a verifier that came back meanwhile is used from the first token. True
        when it answered (the caller resumes as after the prober's success)."""
        with self._probe_lock:
            if not self.breaker.is_open or self._online.is_set():
                return self._online.is_set()
            if (self._prober is not None and self._prober.is_alive()) or not self.breaker.probe_due():
                return False
        if self.verifier.probe(timeout_s):
            self._online.set()
            return True
        self.breaker.probe_failed()
        return False

    def wait_online(self, timeout_s: float) -> bool:
        return self._online.wait(timeout_s)

    def note_overload(self) -> None:
        """The verifier refused a request as overloaded: keep one request in flight for a while."""
        self._serial_until = time.monotonic() + self.overload.serial_s

    @property
    def serial(self) -> bool:
        """Recently refused as overloaded: generations draft nothing ahead (no overlapping requests)."""
        return time.monotonic() < self._serial_until

    def pause(self, seconds: float) -> bool:
        """Sleep `seconds` (an overloaded verifier's Retry-After); False if the session closed meanwhile."""
        return not self._closing.wait(seconds)

    def resume(self) -> None:
        """The prober saw the verifier: close the breaker (the caller opens a session)."""
        self.breaker.close()

    def _probe_loop(self) -> None:
        """Jittered exponential backoff between health probes, until one succeeds, the session closes,
        `probe_horizon_s` passes, or no cloud generation is in progress (checked before every probe:
        a client running only private requests opens no connection, the prober's included)."""
        give_up = time.monotonic() + self.probe_horizon_s
        while True:
            if self._closing.wait(self.breaker.delay_until_probe()):
                return
            with self._probe_lock:   # a generation starting now either sees this thread gone or is seen here
                if self._closing.is_set() or time.monotonic() >= give_up or not self._active:
                    if self._prober is threading.current_thread():
                        self._prober = None
                    return
            if self.verifier.probe():
                self._online.set()
                return
            self.breaker.probe_failed()

    def close(self) -> None:
        """Stop the prober and end the session with the verifier."""
        self._closing.set()
        if self._requests is not None:
            self._requests.shutdown(wait=False)   # a request past its deadline ends at the transport's timeout
        self.verifier.close()
