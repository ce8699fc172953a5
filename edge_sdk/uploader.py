"""The uploader: sends a round's draft batches in order on a background thread (the serial uplink).

The engine hands it batches as the schedule closes them and the final batch when the trigger
fires; drafting goes on meanwhile. Non-final batches are sent one after another (their send
times feed the link profiler); a final batch is passed to a second thread that waits for the
NAV result, so batches of the next (proactive) round can go up while NAV is in flight. A batch
of a round that was cancelled (rolled back) is dropped; once a batch is refused, the rest of its
round waits for the final batch, which resends from the last staged token.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from privacy import VerifyRequest, VerifyResponse

from .profiler import LinkProfiler
from .transport import Verifier


@dataclass(frozen=True)
class Batch:
    round: int
    base_len: int
    prefix_hash: bytes
    append: tuple[int, ...]
    tokens: tuple[int, ...]     # final: every draft token of the round; else: this batch's tokens
    offset: int = 0             # non-final only: position of `tokens` in the round's draft
    final: bool = False


class Uploader:
    def __init__(self, verifier: Verifier, profiler: LinkProfiler):
        self.verifier = verifier
        self.profiler = profiler
        self._queue: queue.Queue = queue.Queue()
        self._staged: dict[int, int] = {}      # round -> draft tokens the verifier confirmed holding
        self._refused: set[int] = set()
        self._cancelled: set[int] = set()
        self._nav = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nav")
        self._lock = threading.Lock()
        self.upload_s = 0.0
        self.batch_sizes: list[int] = []       # every batch sent (non-final and final), in tokens
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="uploader", daemon=True)
        self._thread.start()

    # -- engine side ----------------------------------------------------------------
    def stage(self, batch: Batch) -> None:
        self._queue.put((batch, None))

    def finalize(self, batch: Batch) -> Future:
        """Queue the round's final batch; the future resolves to the NAV result."""
        done: Future = Future()
        self._queue.put((batch, done))
        return done

    def cancel(self, round_id: int) -> None:
        with self._lock:
            self._cancelled.add(round_id)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
        self._nav.shutdown(wait=True)

    # -- uploader thread ------------------------------------------------------------
    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, done = item
            with self._lock:
                skip = batch.round in self._cancelled
            if done is not None:
                if skip:
                    done.cancel()
                else:
                    self._send_final(batch, done)
            elif not skip and batch.round not in self._refused:
                self._send_staged(batch)

    def _send_staged(self, batch: Batch) -> None:
        req = VerifyRequest(batch.base_len, batch.append, batch.tokens, batch.prefix_hash, batch.round,
                            batch.offset, final=False)
        t0 = time.perf_counter()
        try:
            ack = self.verifier.stage(req)
        except Exception:   # a lost batch costs only its overlap: the final batch resends it
            self._refused.add(batch.round)
            return
        elapsed = time.perf_counter() - t0
        self.upload_s += elapsed
        self.batch_sizes.append(len(batch.tokens))
        if ack.staged:
            self._staged[batch.round] = ack.held
            self.profiler.observe_send(len(batch.tokens), elapsed)
        else:
            self._refused.add(batch.round)

    def _send_final(self, batch: Batch, done: Future) -> None:
        held = self._staged.pop(batch.round, 0)
        self._refused.discard(batch.round)
        if held:   # the round continues where the staged batches stopped
            req = VerifyRequest(batch.base_len, (), batch.tokens[held:], batch.prefix_hash, batch.round, held)
        else:
            req = VerifyRequest(batch.base_len, batch.append, batch.tokens, batch.prefix_hash, batch.round, 0)
        self.batch_sizes.append(len(req.draft))

        def nav() -> VerifyResponse:
            return self.verifier.verify(req)

        inner = self._nav.submit(nav)
        inner.add_done_callback(lambda f: _chain(f, done))


def _chain(src: Future, dst: Future) -> None:
    if dst.cancelled():
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())
