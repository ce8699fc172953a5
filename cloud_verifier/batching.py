"""The model worker: one thread owns the service and the target, and batches NAV across sessions.

Every call that touches the service (handshake, opening a frame, dispatching it) is queued
here and runs on this one thread, so the service needs no locks. A dispatch is a generator
(``VerifierService.dispatch_steps``) that yields the target pass it needs; the worker takes
the calls queued at the moment it becomes free (continuous batching), advances each to its
pass, runs all those passes as one ``target.logits_many`` call and sends each its rows.

Bounds: at most ``max_batch`` calls per cycle; at most one call per session per cycle (a
session's frames are ordered, so its next frame waits for the next cycle); and the worker
waits up to ``max_wait_s`` for more calls only while more requests are in flight at the
HTTP layer than are queued (a lone session is never kept waiting for company).

Light calls (``submit(..., light=True)``: handshakes, which need no target pass) take no batch
slot and run after the cycle's target passes, so established sessions' frames never wait behind
them; the HTTP layer bounds how many of them may be queued (``max_handshakes_in_flight``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import GeneratorType
from typing import Callable

from .metrics import Metrics


@dataclass
class _Call:
    fn: Callable
    args: tuple
    key: object | None                  # calls with the same key never share a cycle
    light: bool = False                 # no target pass: no batch slot, run after the cycle's passes
    future: Future = field(default_factory=Future)


class ModelWorker:
    def __init__(self, *, max_batch: int, max_wait_s: float, in_flight: Callable[[], int],
                 metrics: Metrics | None = None, name: str = "target"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.in_flight = in_flight
        self.metrics = metrics
        self.logits_many: Callable | None = None          # set once the target has loaded
        self.cycle_s = 0.0                                # recent duration of a cycle (moving average)
        self._queue: deque[_Call] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, key: object | None = None, light: bool = False) -> Future:
        """Queue `fn(*args)`; `light`: a plain call (not a dispatch generator) that needs no target pass."""
        call = _Call(fn, args, key, light)
        with self._cv:
            if self._stopped:
                raise RuntimeError("the model worker has stopped")
            self._queue.append(call)
            self._cv.notify()
        return call.future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            for call in self._queue:
                call.future.cancel()
            self._queue.clear()
            self._cv.notify()

    # -- the loop ---------------------------------------------------------------------
    def _take(self) -> list[_Call]:
        with self._cv:
            while not self._queue and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while True:
                queued = sum(not c.light for c in self._queue)
                if not (queued < self.max_batch and self.in_flight() > queued):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            taken, light, keys, kept = [], [], set(), deque()
            while self._queue:
                call = self._queue.popleft()
                if call.light:
                    light.append(call)
                elif len(taken) >= self.max_batch or (call.key is not None and call.key in keys):
                    kept.append(call)
                else:
                    keys.add(call.key)
                    taken.append(call)
            self._queue.extendleft(reversed(kept))
            return taken + light

    def _loop(self) -> None:
        while True:
            calls = self._take()
            if not calls:
                return
            t0 = time.perf_counter()
            parked = []                                   # (call, generator, pending Forward)
            for call in calls:
                if not call.light:
                    self._advance(call, parked, start=True)
            while parked:
                batch, parked = parked, []
                try:
                    rows = self.logits_many([(f.state, f.tokens, f.first_row, f.parents) for _, _, f in batch])
                except BaseException as exc:             # the call itself failed: every session in it fails
                    rows = [exc] * len(batch)
                if self.metrics is not None:
                    self.metrics.batch_rows.observe(len(batch))
                for (call, steps, _), r in zip(batch, rows, strict=True):
                    if isinstance(r, BaseException):      # this session's pass failed (or the whole call)
                        steps.close()
                        call.future.set_exception(r)
                    else:
                        self._advance(call, parked, steps=steps, rows=r)
            for call in calls:                            # after the passes: frames never wait behind these
                if call.light and call.future.set_running_or_notify_cancel():
                    try:
                        call.future.set_result(call.fn(*call.args))
                    except BaseException as exc:
                        call.future.set_exception(exc)
            took = time.perf_counter() - t0
            self.cycle_s = took if self.cycle_s == 0.0 else 0.8 * self.cycle_s + 0.2 * took

    @staticmethod
    def _advance(call: _Call, parked: list, *, start: bool = False, steps=None, rows=None) -> None:
        """Run a call to its next target pass (parked) or to its end (future resolved)."""
        if start and not call.future.set_running_or_notify_cancel():
            return                                        # cancelled while queued
        try:
            if start:
                result = call.fn(*call.args)
                if not isinstance(result, GeneratorType):
                    call.future.set_result(result)
                    return
                steps, rows = result, None
            parked.append((call, steps, steps.send(rows)))
        except StopIteration as done:
            call.future.set_result(done.value)
        except BaseException as exc:
            call.future.set_exception(exc)
