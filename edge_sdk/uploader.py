"""The uploader: each round's draft goes up batch by batch on one streamed request.

The engine hands it batches as the schedule closes them and the final batch when the trigger
fires; drafting goes on meanwhile, because each round's stream is written on its own thread.
Batches follow one another on the same stream with no per-batch round trip, and the time each
took to go out feeds the link profiler (alpha, beta). The final batch's reply is the NAV result,
so the next (proactive) round's stream can already be going up while NAV runs. A round that
went stale is abandoned: batches not yet on the wire are dropped.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from privacy import SamplingParams, SparseDist, VerifyRequest

from .profiler import LinkProfiler
from .transport import Verifier


@dataclass(frozen=True)
class Batch:
    round: int
    base_len: int
    prefix_hash: bytes
    append: tuple[int, ...]
    tokens: tuple[int, ...]     # this batch's draft tokens
    offset: int = 0             # position of `tokens` in the round's draft
    final: bool = False
    sampling: SamplingParams | None = None
    q: tuple[SparseDist, ...] = ()   # sampling: the q each token was drawn from


class Uploader:
    def __init__(self, verifier: Verifier, profiler: LinkProfiler, timeline: list | None = None):
        self.verifier = verifier
        self.profiler = profiler
        self.timeline = timeline               # ("upload", start, end) per batch, when recording
        self._streams: dict[int, object] = {}
        self.upload_s = 0.0
        self.batch_sizes: list[int] = []       # every batch sent (non-final and final), in tokens

    def _stream(self, round_id: int):
        stream = self._streams.get(round_id)
        if stream is None:
            stream = self._streams[round_id] = self.verifier.open_round()
            stream.on_sent = self._sent
        return stream

    def _sent(self, tokens: int, start: float, end: float) -> None:
        self.upload_s += end - start
        self.profiler.observe_send(tokens, end - start)
        if self.timeline is not None:
            self.timeline.append(("upload", start, end))

    def stage(self, batch: Batch) -> None:
        self.batch_sizes.append(len(batch.tokens))
        self._stream(batch.round).send(self._request(batch, final=False))

    def finalize(self, batch: Batch) -> Future:
        """Send the round's final batch; the future resolves to the NAV result."""
        self.batch_sizes.append(len(batch.tokens))
        stream = self._stream(batch.round)
        stream.send(self._request(batch, final=True))
        del self._streams[batch.round]
        return stream.result

    def cancel(self, round_id: int) -> None:
        stream = self._streams.pop(round_id, None)
        if stream is not None:
            stream.abandon()

    def close(self) -> None:
        for round_id in list(self._streams):
            self.cancel(round_id)

    @staticmethod
    def _request(batch: Batch, final: bool) -> VerifyRequest:
        return VerifyRequest(batch.base_len, batch.append if batch.offset == 0 else (), batch.tokens,
                             batch.prefix_hash, batch.round, batch.offset, final, batch.sampling, batch.q)
