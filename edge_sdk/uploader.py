"""The uploader: the one place where a generation's requests to the verifier are built and sent.

The engine hands it a round's batches as the policy closes them and the final batch when the
policy asks for NAV. Non-final batches go up on the round's stream (``Verifier.open_round``),
written on its own thread, so drafting goes on meanwhile; batches follow one another with no
per-batch round trip, and the time each took on the link feeds the profiler (alpha, beta). The
final batch's reply is the NAV result. A round that nothing overlaps -- no batch went ahead and
nothing is drafted while it is verified -- goes up as one plain request (``Verifier.verify``), as
do rounds resent whole after a resync; those run on the cloud session's request thread, so that
every wait for the verifier, streamed or not, ends at the NAV deadline. A round that went stale
is abandoned: nothing more of it is queued (what is queued already still goes up: it is numbered).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

from privacy import SamplingParams, SparseDist, VerifyRequest, VerifyResponse, prefix_hash

from .drafter import DraftToken
from .errors import VerifierUnavailable
from .profiler import LinkProfiler
from .session import CloudSession
from .transport import RoundChannel
from .trees import root_path


@dataclass
class Round:
    """A round: the tokens drafted since the last NAV and the committed prefix they build on
    (assumed, for a round drafted proactively while the previous one is verified)."""

    id: int
    base: list[int]
    draft: list[DraftToken] = field(default_factory=list)
    sent: int = 0                 # draft tokens already handed to the uploader
    named: int | None = None      # how much of `base` its batches say the verifier holds (set by the first)
    nav: "Nav | None" = None      # its final batch already went up (pipelined NAV, during the round before)
    cap: int = 0                  # its draft length cap (a round drafted ahead)
    then: "Round | None" = None   # the round drafted ahead on top of it, assuming it is accepted whole
    guess: DraftToken | None = None   # a round drafted ahead: the guess (drafted or looked up) that ends its base
    batches: int = 0              # batches sent (each runs a target pass when the verifier takes it)
    after: int | None = None      # a round drafted ahead: the id of the round it is on (None when that
                                  # one is itself rebased: rebased answers never chain)
    rebasable: bool = False       # sent conditional, naming `after`: the verifier rebases it if it fails
    rebased: bool = False         # such a round whose assumption failed: the verifier answers it as an
                                  # empty round on the committed sequence (VerifyRequest.after)
    opens_segment: bool = False   # drafted ahead on a rebased round: the first drafted round after a
                                  # rejection, so drafted as a head round (the policy's stopping rule)
    parents: tuple[int, ...] = () # a token tree: each draft token's parent (-1: the base); empty: a chain
    leaves: list[DraftToken] = field(default_factory=list)   # a chain's branches (trees.draft_tree on it),
    leaf_parents: list[int] = field(default_factory=list)    # ... sent with it as one tree; their parents

    def chain(self) -> "list[Round]":
        """This round and every round drafted ahead on top of it."""
        out, r = [], self
        while r is not None:
            out.append(r)
            r = r.then
        return out

    @property
    def tokens(self) -> list[int]:
        return [d.token for d in self.draft]

    def wire(self) -> tuple[list[int], tuple[int, ...]]:
        """The draft as the round's request carries it: its tokens and, for a tree, their parents (a chain
        with leaves is a tree: the chain first, then the leaves)."""
        if not self.leaves:
            return self.tokens, self.parents
        return (self.tokens + [d.token for d in self.leaves],
                tuple(range(-1, len(self.draft) - 1)) + tuple(self.leaf_parents))

    def accepted(self, resp: VerifyResponse) -> list[int]:
        """The draft tokens the verdict kept: a chain's first ``accepted``, a tree's path to ``node``.
        A verdict that names no such path is a ValueError (the verifier answered another round)."""
        tokens, parents = self.wire()
        if not parents:
            return tokens[: resp.accepted]
        path = root_path(parents, resp.node) if resp.node is not None and 0 <= resp.node < len(tokens) else []
        if len(path) != resp.accepted or (resp.accepted and resp.node is None):
            raise ValueError(f"the verdict's path ({resp.node}, {resp.accepted} accepted) is not one of the tree's")
        return [tokens[i] for i in path]

    def as_chain(self) -> None:
        """Become a plain chain: leaves dropped, a tree cut to its first-choice line (each node's first
        child). A round resent after a resync goes so: the verifier answering now may take no tree."""
        self.leaves, self.leaf_parents = [], []
        if self.parents:
            line, at = [], -1
            while (child := next((i for i, p in enumerate(self.parents) if p == at), None)) is not None:
                line.append(child)
                at = child
            self.draft, self.parents = [self.draft[i] for i in line], ()

    def rejected(self, resp: VerifyResponse) -> bool:
        """Did the verdict reject a drafted token -- is its token a correction rather than a bonus? (In a
        tree: the path's last node has children, none of them the target's.)"""
        tokens, parents = self.wire()
        if not parents:
            return resp.accepted < len(tokens)
        last = resp.node if resp.node is not None else -1
        return last in parents

    def leaf_taken(self, resp: VerifyResponse) -> bool:
        """Did the verdict end on one of the chain's branches (the target rejected the chain's token where
        the branch forks and produced the branch's first token there)?"""
        return bool(self.leaves) and resp.node is not None and resp.node >= len(self.draft)

    def chain_verdict(self, resp: VerifyResponse) -> tuple[int, int]:
        """What the chain itself came to, as a chain-only verifier would have said: how many of its own
        tokens the verdict kept, and the target's token after them (where a branch was taken, the
        branch's first token)."""
        if not self.leaf_taken(resp):
            return resp.accepted, resp.token
        tokens, parents = self.wire()
        path = root_path(parents, resp.node)
        kept = sum(i < len(self.draft) for i in path)
        return kept, tokens[path[kept]]

@dataclass
class Nav:
    """A NAV request on its way: its reply, when it left, and how long it may take."""

    future: "Future[VerifyResponse]"
    sent_at: float
    final_tokens: int             # draft tokens in the final batch
    deadline_s: float
    answered_at: float | None = None   # set when the verifier answered with a result
    pipelined: bool = False       # sent while the round before was verified: its time includes that wait
    contended: bool = False       # it left while drafted tokens sent before it may still have been going
                                  # up: its round trip may include their upload, not only its own

    def done(self) -> bool:
        return self.future.done()

    def answered_with(self, resp: VerifyResponse) -> bool:
        """Did this request's own reply bring `resp` (not a resend after it failed or was refused)?"""
        f = self.future
        return (self.answered_at is not None and f.done() and not f.cancelled() and f.exception() is None
                and f.result() is resp)

    def result(self) -> VerifyResponse:
        """The verdict, waiting at most until the deadline (TimeoutError after it)."""
        return self.future.result(timeout=max(0.0, self.deadline_s - (time.perf_counter() - self.sent_at)))


class Uploader:
    """One generation's traffic: streamed batches, final batches, whole rounds."""

    def __init__(self, cloud: CloudSession, profiler: LinkProfiler, sampling: SamplingParams | None,
                 timeline: list | None = None):
        self.cloud, self.verifier, self.profiler = cloud, cloud.verifier, profiler
        self.sampling = sampling
        self.timeline = timeline               # ("upload", start, end) per batch, when recording
        self._streams: dict[int, RoundChannel] = {}
        self._lock = threading.Lock()          # streams report their sends from their own threads
        self.upload_s = 0.0
        self.batch_sizes: list[int] = []       # every batch sent (non-final and final), in tokens
        self._uplink_busy_until = 0.0          # when the drafted tokens sent so far should all be up

    def stage(self, rnd: Round, synced: int) -> None:
        """Send the round's tokens not yet sent as a non-final batch; `synced`: committed tokens the
        verifier holds (for a proactive round: the base it will hold if the guess is right)."""
        req = self._batch(rnd, synced, final=False)
        self._occupy(len(req.draft))
        self._stream(rnd).send(req)

    def finalize(self, rnd: Round, synced: int, *, background: bool, conditional: bool = False) -> Nav:
        """Send the round's final batch and return at once: on its stream if batches went ahead or the
        caller will draft meanwhile (`background`), else as one plain request. `conditional`: pipelined
        NAV, a proactive round whose base the verifier will hold only if the round before is accepted
        whole (always on its stream); it names that round (``after``) when the verifier rebases, and
        the round is then marked ``rebasable``."""
        req = dataclasses.replace(self._batch(rnd, synced, final=True), conditional=conditional)
        if conditional and rnd.after is not None and self.cloud.rebases:
            req = dataclasses.replace(req, after=rnd.after)
            rnd.rebasable = True
        if rnd.id in self._streams or background or conditional:
            nav = self._nav(len(req.draft))
            nav.pipelined = conditional
            stream = self._stream(rnd)
            del self._streams[rnd.id]
            stream.send(req)
            stream.result.add_done_callback(lambda f: _relay(f, nav))
            return nav
        return self._send(req)

    def whole(self, prefix: Sequence[int], synced: int, draft: Sequence[int],
              q: Sequence[SparseDist | None] = ()) -> VerifyResponse:
        """One round in one request, answered within the NAV deadline: the chain `draft` after the committed
        `prefix`, of which the verifier holds `synced` tokens (0: send it all). For resends after a resync
        (a tree or a chain with leaves goes again as its chain) and for verifying an offline tail."""
        base_len = min(synced, len(prefix))
        return self._send(self._request(self.cloud.next_round_id(), prefix, base_len, draft, 0, True, q)).result()

    def cancel(self, rnd: Round) -> None:
        """`rnd` went stale: queue nothing more of it (a final batch already sent is refused by the
        verifier without a target pass -- or, if it named the round just answered, answered rebased:
        the engine then keeps it, ``Decoding._rebased_head``)."""
        stream = self._streams.pop(rnd.id, None)
        if stream is not None:
            stream.abandon()

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.abandon()
        self._streams.clear()

    # -- building requests ---------------------------------------------------------------
    def _batch(self, rnd: Round, synced: int, final: bool) -> VerifyRequest:
        """The round's next batch: the tokens not yet sent, naming the base as the verifier should hold it."""
        if rnd.named is None:
            rnd.named = min(synced, len(rnd.base))
        if (rnd.parents or rnd.leaves) and (rnd.sent or not final):
            raise ValueError("a token tree goes up whole, in its final batch")
        tokens, parents = rnd.wire()
        req = self._request(rnd.id, rnd.base, rnd.named, tokens[rnd.sent:], rnd.sent, final,
                            [d.q for d in (rnd.draft + rnd.leaves)[rnd.sent:]], parents)
        rnd.sent = len(rnd.draft)
        rnd.batches += 1
        self.batch_sizes.append(len(req.draft))
        return req

    def _request(self, round_id: int, base: Sequence[int], base_len: int, draft: Sequence[int], offset: int,
                 final: bool, q: Sequence[SparseDist | None], parents: Sequence[int] = ()) -> VerifyRequest:
        """Every request of the protocol: the round's first batch carries the committed tokens the
        verifier lacks (`base[base_len:]`); all its batches name `base[:base_len]` by length and hash."""
        return VerifyRequest(base_len, tuple(base[base_len:]) if offset == 0 else (), tuple(draft),
                             prefix_hash(base[:base_len]) if base_len else b"", round_id, offset, final,
                             self.sampling, tuple(q) if self.sampling is not None else (),
                             parents=tuple(parents) if draft else ())

    # -- sending -----------------------------------------------------------------------------
    def _nav(self, final_tokens: int) -> Nav:
        deadline = self.cloud.nav_deadline(self.profiler.estimate(), final_tokens)
        nav = Nav(Future(), time.perf_counter(), final_tokens, deadline)
        # The uplink is a queue: drafted tokens sent before this final batch (stale rounds' too: what is
        # on the wire stays there) may delay it, by the profiled time their upload takes.
        with self._lock:
            nav.contended = self._uplink_busy_until > nav.sent_at
        self._occupy(final_tokens)
        return nav

    def _occupy(self, tokens: int) -> None:
        """`tokens` drafted tokens go up now: the uplink is busy with them for as long as the profile says."""
        if tokens:
            link = self.profiler.estimate()
            with self._lock:
                start = max(time.perf_counter(), self._uplink_busy_until)
                self._uplink_busy_until = start + link.alpha + tokens * link.upload_per_token

    def _send(self, req: VerifyRequest) -> Nav:
        """One plain request on the session's request thread; the transport's own timeouts end at the
        deadline too, so a request the engine stopped waiting for does not hold that thread for long."""
        nav = self._nav(len(req.draft))
        self.verifier.set_deadline(nav.deadline_s)

        def call() -> None:
            try:
                resp = self.verifier.verify(req)
            except BaseException as exc:      # whatever it is, the engine waiting on the Nav gets it
                nav.future.set_exception(exc)
            else:
                nav.answered_at = time.perf_counter()
                nav.future.set_result(resp)
        self.cloud.submit(call)
        return nav

    def _stream(self, rnd: Round) -> RoundChannel:
        stream = self._streams.get(rnd.id)
        if stream is None:
            stream = self._streams[rnd.id] = self.verifier.open_round()
            stream.on_sent = self._sent
        return stream

    def _sent(self, tokens: int, start: float, end: float) -> None:
        with self._lock:
            self.upload_s += end - start
            self.profiler.observe_send(tokens, end - start)
            if self.timeline is not None:
                self.timeline.append(("upload", start, end))


def _relay(stream_result: Future, nav: Nav) -> None:
    """Hand a stream's outcome to its Nav, stamping when a result (not a failure) came back first, so
    that whoever waits on the Nav sees the time."""
    if stream_result.cancelled():
        nav.future.set_exception(VerifierUnavailable("the round's stream ended without a result"))
    elif stream_result.exception() is not None:
        nav.future.set_exception(stream_result.exception())
    else:
        nav.answered_at = time.perf_counter()
        nav.future.set_result(stream_result.result())
