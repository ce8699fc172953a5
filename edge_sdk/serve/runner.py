"""One drafter, one generation at a time: the queue between HTTP requests and the ``EdgeClient``.

The draft model and its KV cache are one piece of state, so generations run one after another on
a single worker thread; requests wait in a bounded queue and, past it, are refused at once (429)
with a ``Retry-After`` estimated from how long recent generations took. Each job hands its tokens
to the event loop as they are committed. Cancelling a job (its client went away) stops it at the
next committed token -- within one round -- and frees the drafter for the next job.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..client import EdgeClient
from ..engine import TokenEvent
from ..stats import GenerationStats


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the drafter's queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One generation request, as the worker runs it."""

    prompt: list[int]
    options: dict[str, Any]                 # EdgeClient.stream keyword arguments
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # ("token", TokenEvent) ... ("done", stats)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    unverified: int = 0                     # output tokens the target did not verify

    def put(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self.cancelled.set()


class DraftRunner:
    def __init__(self, client: EdgeClient, max_queue: int = 16, on_finish=None):
        self.client, self.max_queue = client, max_queue
        self.on_finish = on_finish          # called on the worker with (job, stats, outcome)
        self._jobs: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self.running = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=16)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="pipesd-serve-drafter", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued whose clients are still there."""
        with self._wake:
            return sum(not job.cancelled.is_set() for job in self._jobs)

    def _drop_cancelled(self) -> None:
        """Jobs whose client left while they waited give their places back at once (lock held)."""
        if any(j.cancelled.is_set() for j in self._jobs):
            for job in [j for j in self._jobs if j.cancelled.is_set()]:
                self._jobs.remove(job)
                job.put("cancelled", None)
                if self.on_finish is not None:
                    self.on_finish(job, None, "cancelled")

    def submit(self, job: Job) -> None:
        with self._wake:
            self._drop_cancelled()
            if len(self._jobs) + self.running > self.max_queue:   # max_queue waiting behind the one running
                raise QueueFull(self._retry_after())
            self._jobs.append(job)
            self._wake.notify()

    def _retry_after(self) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (len(self._jobs) + self.running)))

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
                if job.cancelled.is_set():      # its client left while it waited
                    job.put("cancelled", None)
                    if self.on_finish is not None:
                        self.on_finish(job, None, "cancelled")
                    continue
                self.running = 1
            try:
                self._run(job)
            finally:
                with self._wake:
                    self.running = 0

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        stats: GenerationStats | None = None
        outcome = "error"
        try:
            gen = self.client.stream(job.prompt, **job.options)
            stats = gen.stats
            outcome = "done"
            for event in gen:
                if job.cancelled.is_set():
                    gen.close()
                    outcome = "cancelled"
                    break
                if event.token is not None and not event.verified:
                    job.unverified += 1
                job.put("token", event)
            if outcome == "done":
                job.put("done", stats)
            else:
                job.put("cancelled", stats)
        except Exception as exc:                 # handed to the request; the worker carries on
            job.put("error", exc)
        finally:
            self._durations.append(time.monotonic() - job.started)
            if self.on_finish is not None:
                self.on_finish(job, stats, outcome)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            for job in self._jobs:
                job.put("cancelled", None)
            self._jobs.clear()
            self._wake.notify_all()
        self._thread.join(timeout=30)
        self.client.close()

