"""``TimedVerifier``: what the benchmarks of the verifier time, shared by batched_nav.py and verifier_load.py."""

from __future__ import annotations

import time


class TimedVerifier:
    """Delegates to a real verifier (the edge's ``Verifier``) and records each NAV round trip: from the
    moment the round's final batch is handed to the transport to the moment its result is in. A round
    whose result is a failure (e.g. refused with 429) is counted only by a whole-round ``verify`` call,
    and only when `count_failures` is set."""

    def __init__(self, inner, count_failures: bool = True):
        self._inner, self.latencies, self._count_failures = inner, [], count_failures

    def verify(self, req):
        t0 = time.perf_counter()
        ok = False
        try:
            resp = self._inner.verify(req)
            ok = True
            return resp
        finally:
            if ok or self._count_failures:
                self.latencies.append(time.perf_counter() - t0)

    def open_round(self):
        stream = self._inner.open_round()
        send = stream.send

        def timed_send(req, *args, **kwargs):
            if req.final:
                t0 = time.perf_counter()
                stream.result.add_done_callback(
                    lambda f: f.cancelled() or f.exception() or self.latencies.append(time.perf_counter() - t0))
            return send(req, *args, **kwargs)

        stream.send = timed_send
        return stream

    def __getattr__(self, name):
        return getattr(self._inner, name)
