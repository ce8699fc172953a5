"""The edge honours overload (429 + Retry-After), and the prober stays quiet while only private requests run.

Pure parts (the backoff, Retry-After parsing, the breaker) are checked in microseconds; the engine's
handling on the toy pair with an in-process verifier that refuses requests as a loaded one would; the
whole path against a real ``pipesd-verifier --max-in-flight 1`` with several clients at once
(``integration``), and the prober's silence with real sockets.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import Future

import httpx
import pytest

from edge_sdk import EdgeClient, Overloaded, OverloadTimeout, VerifierError
from edge_sdk.offline import CircuitBreaker, OverloadBackoff
from cloud_verifier import VerifierService
from edge_sdk import HttpVerifier
from edge_sdk.policies import EdgeOnly
from edge_sdk.transport import CLOSE_TRIES, CLOSE_WAIT_S, _plain_error, parse_retry_after
from pipesd_lab.inprocess import InProcessVerifier
from pipesd_lab.toy import ToyTarget
from privacy import ErrorCode, FrameType, OpenSession, StaticKey, decode, encode, parse_header

from .engine_kit import PROMPTS, TARGET, Rig, reference


# -- pure: the backoff, Retry-After, the breaker -------------------------------------------------
class FixedRandom(random.Random):
    def __init__(self, value: float):
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("u", [0.0, 0.5, 0.999])
def test_backoff_honours_retry_after_within_bounds(u):
    b = OverloadBackoff(max_wait_s=2.0, default_wait_s=0.5, min_wait_s=0.05, jitter=0.5, rng=FixedRandom(u))
    for asked, nominal in [(1.0, 1.0), (0.3, 0.3), (None, 0.5), (0.0, 0.05), (120.0, 2.0), (float("nan"), 0.5)]:
        d = b.delay(asked)
        assert nominal <= d <= nominal * 1.5, (asked, d)          # never sooner than asked (up to the cap)
        assert d == pytest.approx(nominal * (1 + 0.5 * u))
    # Time already gone since the refusal counts towards the wait, never below the floor.
    assert b.delay(1.0, elapsed_s=0.4) == pytest.approx(1.0 * (1 + 0.5 * u) - 0.4)
    assert b.delay(1.0, elapsed_s=5.0) == 0.05


def test_backoff_jitter_spreads_clients_and_tries_are_bounded():
    waits = [OverloadBackoff(rng=random.Random(seed)).delay(1.0) for seed in range(200)]
    assert min(waits) >= 1.0 and max(waits) <= 1.5
    assert max(waits) - min(waits) > 0.4                       # not in lock-step
    b = OverloadBackoff(max_tries=3)
    assert b.fits(3, 1.0, now=10.0, deadline=11.5)
    assert not b.fits(4, 1.0, now=10.0, deadline=100.0)         # out of tries
    assert not b.fits(1, 1.0, now=10.0, deadline=10.9)          # the wait would pass the deadline


def test_backoff_grows_with_each_refusal_of_one_request():
    """A verifier's Retry-After is what one slot takes (a fraction of a second): a request refused again
    waits twice as long each time, capped, so short hints never turn into a stream of retries."""
    b = OverloadBackoff(max_wait_s=2.0, min_wait_s=0.05, jitter=0.0)
    assert [b.delay(0.1, tries=t) for t in range(1, 8)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert b.delay(0.0, tries=3) == pytest.approx(0.2)             # "0" still grows from the floor
    assert b.delay(0.1, tries=10_000) == 2.0 and b.delay(0.1) == b.delay(0.1, tries=1)
    # Twelve refusals in a row span seconds, not twelve times a short hint.
    assert sum(b.delay(0.05, tries=t) for t in range(1, 13)) > 10.0


def test_retry_after_parsing():
    assert parse_retry_after("1") == 1.0 and parse_retry_after(" 2 ") == 2.0 and parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None and parse_retry_after("inf") is None
    now = 1_000_000_000.0                                        # Sun, 09 Sep 2001 01:46:40 GMT
    assert parse_retry_after("Sun, 09 Sep 2001 01:46:43 GMT", now=now) == pytest.approx(3.0)
    assert parse_retry_after("Sun, 09 Sep 2001 01:46:00 GMT", now=now) == 0.0


def test_a_429_becomes_overloaded_with_its_retry_after():
    plain = httpx.Response(429, headers={"Retry-After": "3"},
                           json={"error": {"code": "overloaded", "message": "too many requests in flight"}})
    err = _plain_error(plain)
    assert isinstance(err, Overloaded) and isinstance(err, VerifierError)
    assert err.code is ErrorCode.OVERLOADED and err.status == 429 and err.retry_after_s == 3.0
    proxy = _plain_error(httpx.Response(429, text="slow down"))      # a proxy's 429, no Retry-After
    assert isinstance(proxy, Overloaded) and proxy.code is ErrorCode.OVERLOADED and proxy.retry_after_s is None
    # The verifier's own 429 says the expected wait exactly in its body; the header rounds it up to 1 s.
    exact = _plain_error(httpx.Response(429, headers={"Retry-After": "1"}, json={"error": {
        "code": "overloaded", "message": "too many requests in flight", "retry_after_s": 0.08}}))
    assert isinstance(exact, Overloaded) and exact.retry_after_s == 0.08
    odd = _plain_error(httpx.Response(429, headers={"Retry-After": "1"}, json={"error": {
        "code": "overloaded", "message": "", "retry_after_s": "soon"}}))
    assert odd.retry_after_s == 1.0                                 # an unreadable detail: the header


def test_breaker_after_overload_probes_no_sooner_than_retry_after():
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    b = CircuitBreaker(clock=clock)
    b.trip(not_before_s=1.5)
    assert b.delay_until_probe() == 1.5


# -- the engine on the toy pair: an in-process verifier that refuses like a loaded one -----------------
class _RefusedRound:
    """A round stream the verifier refused: its result is the 429."""

    def __init__(self, exc: Exception):
        self.on_sent = None
        self.result: Future = Future()
        self.result.set_exception(exc)

    def send(self, req, *args, **kwargs) -> None:
        pass

    def abandon(self) -> None:
        pass


class _RoundRefusedAtItsEnd:
    """A real round stream whose non-final batches are staged at the verifier, then its final batch is
    refused: what the verifier staged must not be committed twice when the round goes again."""

    def __init__(self, inner, exc: Exception):
        self._inner, self._exc = inner, exc
        self.result: Future = Future()

    @property
    def on_sent(self):
        return self._inner.on_sent

    @on_sent.setter
    def on_sent(self, fn) -> None:
        self._inner.on_sent = fn

    def send(self, req, *args, **kwargs) -> None:
        if req.final:
            self._inner.abandon()
            if not self.result.done():
                self.result.set_exception(self._exc)
        else:
            self._inner.send(req)

    def abandon(self) -> None:
        self._inner.abandon()


class Refusing(InProcessVerifier):
    """Refuses the next `refuse` requests (handshakes, whole rounds, streamed rounds) as overloaded, or
    all of them until `refuse_until`, before the service sees them; `refuse_after_acting` refuses whole
    rounds after the service acted (a proxy's 429 on the way back): the reply is lost, the commit done."""

    def __init__(self, target, retry_after_s: float | None = 0.02):
        super().__init__(target)
        self.retry_after_s = retry_after_s
        self.refuse = 0
        self.refuse_until = 0.0
        self.refuse_after_acting = 0
        self.refuse_finals = 0
        self.refused: list[tuple[str, float]] = []    # (kind, monotonic time)
        self.calls: list[tuple[str, float]] = []
        self._refuse_lock = threading.Lock()

    def _overloaded(self) -> Overloaded:
        return Overloaded(429, ErrorCode.OVERLOADED, "too many requests in flight; retry later", {},
                          self.retry_after_s)

    def _refused(self, kind: str) -> Overloaded | None:
        with self._refuse_lock:
            now = time.monotonic()
            self.calls.append((kind, now))
            if self.refuse > 0 or now < self.refuse_until:
                self.refuse = max(0, self.refuse - 1)
                self.refused.append((kind, now))
                return self._overloaded()
        return None

    def open_session(self, req):
        if (exc := self._refused("open")) is not None:
            raise exc
        return super().open_session(req)

    def verify(self, req):
        if (exc := self._refused("verify")) is not None:
            raise exc
        resp = super().verify(req)
        with self._refuse_lock:
            if self.refuse_after_acting > 0:
                self.refuse_after_acting -= 1
                self.refused.append(("verify-acted", time.monotonic()))
                raise self._overloaded()
        return resp

    def open_round(self):
        if (exc := self._refused("round")) is not None:
            return _RefusedRound(exc)
        inner = super().open_round()
        with self._refuse_lock:
            if self.refuse_finals > 0:
                self.refuse_finals -= 1
                return _RoundRefusedAtItsEnd(inner, self._overloaded())
        return inner


def refusing_rig(retry_after_s: float | None = 0.02, **kw) -> tuple[Rig, Refusing]:
    rig = Rig(**kw)
    v = Refusing(rig.target, retry_after_s)
    rig.verifier = rig.cloud.verifier = v
    return rig, v


@pytest.mark.parametrize("mode", ["vanilla", "cloud_only", "pipesd_fixed", "pipesd", "pipesd_per_token"])
def test_refusals_are_waited_out_and_the_output_stays_target_greedy(mode):
    """Handshake, whole rounds and streamed rounds refused now and then: every refusal is waited out
    and retried, nothing reaches the app, nothing goes offline, the output is the target's."""
    rig, v = refusing_rig(latency_s=0.001)
    with rig:
        v.refuse = 2                                  # the handshake and the retry after it
        out = []
        gen = rig.stream(PROMPTS[2], mode, 40)
        for i, event in enumerate(gen):
            out.append(event)
            if i in (3, 11, 25):
                v.refuse = 2                          # the next two requests, whatever they are
            if i == 17:
                v.refuse_finals = 1                   # a streamed round refused at its final batch
        result = gen.result
        assert result.tokens == reference(PROMPTS[2], 40)
        assert all(e.verified for e in result.events if e.token is not None)
        s = result.stats
        assert s.breaker_trips == 0 and s.unverified_tokens == 0
        assert s.overload_waits >= 2 and s.overload_wait_s >= 0.02 * 2
        assert v.refused[0][0] == "open"


def test_a_refusal_after_the_verifier_acted_does_not_double_commit():
    """A 429 that comes back after the verifier committed (a proxy's, say): the round goes again naming
    its old base, the verifier answers resync, and the whole prefix goes up once more -- lossless."""
    rig, v = refusing_rig()
    with rig:
        gen = rig.stream(PROMPTS[3], "vanilla", 40)
        for i, _ in enumerate(gen):
            if i in (2, 9, 20):
                v.refuse_after_acting = 1
        result = gen.result
    assert result.tokens == reference(PROMPTS[3], 40)
    assert result.stats.overload_waits == 3 and result.stats.resyncs >= 3 and result.stats.breaker_trips == 0


def test_retry_after_is_honoured_before_the_retry():
    rig, v = refusing_rig(retry_after_s=0.15)
    with rig:
        v.refuse = 1
        result = rig.generate(PROMPTS[0], "vanilla", 8)
    assert result.tokens == reference(PROMPTS[0], 8)
    (kind, refused_at), retry = v.refused[0], v.calls[1]
    assert retry[1] - refused_at >= 0.15 and retry[1] - refused_at <= 0.15 * 1.5 + 0.2
    assert result.stats.overload_waits == 1 and 0.15 <= result.stats.overload_wait_s <= result.stats.wait_s


@pytest.mark.parametrize("where", ["open", "resend"])
def test_a_refusal_late_in_the_deadline_still_gets_a_whole_retry(where):
    """A request refused near the end of its NAV deadline -- an OPEN after a slow handshake, a round
    resent after a lost reply that queued before its 429 -- is waited out and retried with a whole
    deadline after the wait: under offline="fail" one refusal must not fail the generation."""
    # The refusal comes 0.5 s into a 0.6 s deadline and asks for 0.15 s: a retry on the old deadline would
    # be past it; 0.1 s of slack for this thread to be scheduled on a busy machine.
    rig, v = refusing_rig(retry_after_s=0.15, nav_deadline_s=0.6, offline="fail")
    armed = [where == "open"]
    real_open, real_verify = v.open_session, v.verify

    def late_refusal():
        armed[0] = False
        time.sleep(0.5)                   # most of the 0.6 s deadline gone, then 429 + Retry-After 0.15 s
        v.refused.append((where, time.monotonic()))
        return v._overloaded()

    def open_session(req):
        if armed[0]:
            raise late_refusal()
        return real_open(req)

    def verify(req):
        if armed[0]:
            raise late_refusal()
        dropping = v.drop_replies > 0
        try:
            return real_verify(req)
        finally:
            if dropping and v.drop_replies == 0:
                armed[0] = True           # the reply was lost: the resend that follows is refused late
    v.open_session, v.verify = open_session, verify
    with rig:
        gen = rig.stream(PROMPTS[0], "vanilla", 24)
        for i, _ in enumerate(gen):
            if i == 5 and where == "resend":
                v.drop_replies = 1
        result = gen.result
    assert [kind for kind, _ in v.refused] == [where]
    assert result.tokens == reference(PROMPTS[0], 24) and result.stats.unverified_tokens == 0
    assert result.stats.overload_waits == 1 and result.stats.breaker_trips == 0


@pytest.mark.parametrize("offline", ["continue", "wait", "verify_late"])
def test_overload_past_the_nav_deadline_follows_the_offline_policy(offline):
    """Refused for longer than the NAV deadline: the generation goes on as the offline policy says, never
    with a 429 raised to the app; once the verifier takes requests again, collaboration resumes."""
    rig, v = refusing_rig(retry_after_s=0.05, nav_deadline_s=0.3, offline=offline, offline_wait_s=0.2,
                          draft_seconds=0.002)
    with rig:
        gen = rig.stream(PROMPTS[1], "vanilla", 120)
        events = []
        for i, event in enumerate(gen):
            events.append(event)
            if i == 4:
                v.refuse_until = time.monotonic() + 0.6
        result = gen.result
    assert len(result.tokens) == 120
    assert result.stats.breaker_trips >= 1 and result.stats.overload_waits >= 1
    if offline == "verify_late":
        assert result.tokens == reference(PROMPTS[1], 120)
    else:
        assert result.stats.unverified_tokens > 0 or offline == "wait"
    assert [e for e in result.events if e.token is not None][-1].verified    # collaborating again by the end


def test_overload_past_the_deadline_under_fail_raises_a_timeout_not_a_429():
    rig, v = refusing_rig(retry_after_s=0.05, nav_deadline_s=0.3, offline="fail")
    with rig:
        v.refuse_until = time.monotonic() + 60
        with pytest.raises(OverloadTimeout) as info:
            rig.generate(PROMPTS[1], "vanilla", 20)
    assert isinstance(info.value, TimeoutError) and not isinstance(info.value, VerifierError)


# -- CLOSE under overload ----------------------------------------------------------------------
def _http_verifier_on(service: VerifierService, key: StaticKey, refuse_closes: int):
    """An HttpVerifier whose HTTP goes to `service` in this process; the first `refuse_closes` CLOSE
    frames are answered as the verifier's in-flight bound would (429, header 1 s, exact wait in the body)."""
    seen = {"close": 0, "refused": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/handshake":
            return httpx.Response(200, content=encode(service.handshake(decode(request.content))),
                                  headers={"content-type": "application/msgpack"})
        if parse_header(request.content).type == FrameType.CLOSE:
            seen["close"] += 1
            if seen["refused"] < refuse_closes:
                seen["refused"] += 1
                return httpx.Response(429, headers={"Retry-After": "1"}, json={"error": {
                    "code": "overloaded", "message": "too many requests in flight", "retry_after_s": 0.05}})
        status, reply, _ = service.handle_frame(request.content)
        return httpx.Response(status, content=reply, headers={"content-type": "application/x-pipesd-frame"})

    v = HttpVerifier("http://verifier.test", verifier_key=key.public_b64)
    v._conn.http.close()
    v._conn.http = httpx.Client(base_url="http://verifier.test", transport=httpx.MockTransport(handler))
    v.open_session(OpenSession(service.fingerprint, service.target.vocab_size))
    assert len(service.sessions) == 1
    return v, seen


def test_a_close_refused_as_overloaded_is_retried_after_its_retry_after():
    """A CLOSE refused with 429 is sent again after the wait the verifier asked for (its exact wait, not
    the header's whole second), so the session does not sit on the verifier until its TTL."""
    key = StaticKey.generate()
    service = VerifierService(ToyTarget(TARGET), static_key=key)
    v, seen = _http_verifier_on(service, key, refuse_closes=CLOSE_TRIES - 1)
    t = time.monotonic()
    v.close()
    took = time.monotonic() - t
    assert seen == {"close": CLOSE_TRIES, "refused": CLOSE_TRIES - 1}
    assert len(service.sessions) == 0 and took < 0.5, took


def test_a_close_refused_for_good_gives_up_soon_without_raising():
    key = StaticKey.generate()
    service = VerifierService(ToyTarget(TARGET), static_key=key)
    v, seen = _http_verifier_on(service, key, refuse_closes=10**6)
    t = time.monotonic()
    v.close()                                      # never raises: the verifier's TTL ends the session
    assert time.monotonic() - t <= CLOSE_WAIT_S + 0.5
    assert seen["close"] == CLOSE_TRIES and len(service.sessions) == 1


# -- the prober and private requests -----------------------------------------------------------
def test_the_prober_stops_when_no_cloud_generation_runs():
    """After an outage the prober watches only while some cloud generation is in progress: private
    (edge-only) generations and an idle client make no probe. The next cloud generation probes at its
    start and, the verifier being back, is verified from its first token."""
    with Rig() as rig:                                 # probes every 2-10 ms while it runs
        probes = []
        inner = rig.verifier.probe
        rig.verifier.probe = lambda timeout=1.0: probes.append(time.monotonic()) or inner(timeout)
        rig.verifier.set_down()
        offline = rig.generate(PROMPTS[0], "pipesd_fixed", 200)
        assert offline.stats.breaker_trips == 1 and offline.stats.unverified_tokens == 200
        time.sleep(0.05)                               # a probe under way when the generation ended
        n = len(probes)
        t = time.monotonic()
        while time.monotonic() - t < 0.3:              # only private requests
            for _ in rig.engine.start(PROMPTS[1], EdgeOnly(), max_new_tokens=8):
                pass
        time.sleep(0.1)                                # and idle
        assert len(probes) == n, "the prober kept probing with no cloud generation in progress"
        assert rig.cloud.offline
        rig.verifier.set_down(False)
        back = rig.generate(PROMPTS[0], "pipesd_fixed", 30)
        assert back.tokens == reference(PROMPTS[0], 30) and back.stats.unverified_tokens == 0
        assert len(probes) == n + 1 and not rig.cloud.offline


@pytest.mark.integration
def test_private_requests_after_an_outage_open_no_socket(monkeypatch):
    """Real sockets: a cloud request finds nothing listening (offline, prober started); then only private
    requests run, for longer than several probe intervals: not one connection is attempted."""
    with EdgeClient("http://127.0.0.1:9", verifier_key=StaticKey.generate().public_b64, threads=1,
                    connect_timeout=1.0) as client:
        r = client.generate("x = ", max_new_tokens=8, mode="vanilla")
        assert r.stats.unverified_tokens == 8 and client.is_offline
        time.sleep(0.6)                                # the prober's own delay (at most 0.5 s) passes
        connects = []
        real_connect = socket.socket.connect

        def counted(self, *args, **kwargs):
            connects.append(args)
            return real_connect(self, *args, **kwargs)
        monkeypatch.setattr(socket.socket, "connect", counted)
        monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: connects.append(a) or 111)
        t = time.monotonic()
        private = 0
        while time.monotonic() - t < 2.0:
            client.generate("def f(x):\n", max_new_tokens=4, private=True)
            private += 1
        assert private >= 2 and connects == [], f"{len(connects)} connects while only private requests ran"
        r = client.generate("x = ", max_new_tokens=4, mode="vanilla")   # a cloud request probes again
        assert connects and r.stats.unverified_tokens == 4


# -- a real verifier at --max-in-flight 1, several clients at once -------------------------------
@pytest.mark.integration
def test_clients_against_a_verifier_at_max_in_flight_1_all_complete_verified():
    """Four clients (whole rounds, streamed rounds, proactive drafting) generate at once against a verifier
    that takes one request at a time and answers the rest 429 + Retry-After: every generation completes,
    verified and token-identical to the target's greedy output; no 429 reaches an app; the waits show."""
    from cloud_verifier import LocalVerifier

    modes = ["vanilla", "cloud_only", "pipesd", "pipesd_fixed"]
    prompts = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n"]
    n = 16
    with LocalVerifier(model="embedded", backend="llamacpp", threads=1, extra_args=["--max-in-flight", "1"]) as v:
        with EdgeClient(v.url, verifier_key=v.public_key, threads=1) as ref:
            expected = {p: ref.generate(p, max_new_tokens=n, mode="cloud_only").tokens for p in prompts}
        clients = [EdgeClient(v.url, verifier_key=v.public_key, threads=1, mode=m, offline="fail",
                              nav_deadline_s=30.0) for m in modes]
        results: dict[int, list] = {i: [] for i in range(len(modes))}
        errors: list[BaseException] = []
        start = threading.Barrier(len(clients))

        def run(i: int) -> None:
            try:
                start.wait()
                for p in prompts:
                    results[i].append((p, clients[i].generate(p, max_new_tokens=n)))
            except BaseException as exc:      # reported below, with the client's mode
                errors.append((modes[i], exc))

        t = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        elapsed = time.perf_counter() - t
        for c in clients:
            c.close()
        rejected = httpx.get(v.url + "/metrics").text
    assert not errors, errors
    waits = 0
    for i, runs in results.items():
        assert len(runs) == len(prompts), modes[i]
        for p, r in runs:
            assert r.tokens == expected[p], (modes[i], p)
            assert all(e.verified for e in r.events) and r.stats.unverified_tokens == 0
            assert r.stats.breaker_trips == 0
            waits += r.stats.overload_waits
    assert waits >= 1, "four clients at once should have met the one-request bound"
    assert "overloaded" in rejected
    print(f"\n{len(clients)} clients x {len(prompts)} generations in {elapsed:.1f} s, {waits} overload waits: "
          + ", ".join(f"{modes[i]} {sum(r.stats.overload_wait_s for _, r in runs):.1f}s"
                      for i, runs in results.items()))
