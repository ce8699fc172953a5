"""The decoding engine: one file where a round reads top to bottom (``Decoding._round``).

    draft -> (batches go up as the policy closes them) -> policy says verify -> final batch -> NAV
          -> (meanwhile: proactive drafting of the next round, its final batch too if it is complete
              in time) -> commit -> keep or roll back

Each round the drafter moves to the round's base (its KV cache keeps the common prefix: that
is the edge-side rollback) and drafts until the policy asks for NAV. The uploader sends the
draft in batches on its own thread; the final batch asks the verifier for NAV, which accepts
the longest correct prefix and adds the target's own next token. While that is in flight a
proactive policy drafts on, assuming every token is accepted and the target's token equals the
draft's own next one; those tokens (and their uploads) survive only if both assumptions hold.
A pipelined policy sends such a round's final batch before the verdict, marked conditional: the
verifier runs it right after the verdict that makes its base true, so a fully accepted round costs
no extra round trip; otherwise the first such round after a verdict is answered *rebased* -- as the
target's next token on what was committed -- and becomes the next round, already in flight (the
rounds on top of it are dropped).
The committed sequence only ever grows by tokens the target chose, so greedy output equals
target-only greedy decoding for every policy.

``Engine`` holds what outlives a generation (the drafter, the cloud session, the link profile,
the offline settings); ``Decoding`` is one generation and everything that belongs to it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generator, Iterator, Sequence

from privacy import ErrorCode, SamplingParams, VerifyResponse

from .controller import INTERRUPT_FROM_S
from .drafter import DraftInterrupted, Drafter, DraftToken
from .errors import (ConfigError, OverloadTimeout, PromptTooLongError, SessionLost, VerifierError,
                     VerifierTimeout, VerifierUnavailable)
from .lookup import LookupGuesser
from .offline import OFFLINE_POLICIES
from .policies import Policy, RoundVerdict
from .profiler import LinkProfiler
from .session import CloudSession
from .stats import GenerationStats, RoundRecord
from .text import TextAssembler
from .trees import draft_tree
from .uploader import Nav, Round, Uploader


@dataclass(frozen=True)
class TokenEvent:
    """One committed output token and the text it releases (may be empty while held back)."""

    token: int | None   # None only for the last event: text flushed at the end of generation
    text: str
    verified: bool      # True when the target produced or accepted it; False for edge-only output
    # A revision (offline="verify_late"): before appending this event, cut the output back to its
    # first `revise_from` tokens and `revise_text_from` characters; the target replaced the rest.
    revise_from: int | None = None
    revise_text_from: int | None = None


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]          # output token ids (prompt excluded)
    prompt_tokens: list[int]
    stats: GenerationStats
    events: list[TokenEvent] = field(default_factory=list, repr=False)


class _Output:
    """The committed sequence plus everything that decides when generation ends."""

    def __init__(self, prompt: list[int], max_new_tokens: int, eos: frozenset[int], make_text):
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.make_text = make_text
        self.text: TextAssembler = make_text()
        self.finish_reason = ""

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens) + self.prompt_len

    def commit(self, tokens: Sequence[int], verified: bool) -> Iterator[TokenEvent]:
        for t in tokens:
            if self.finish_reason:
                return
            self.tokens.append(t)
            yield TokenEvent(t, self.text.add(t), verified)
            self._check_finish(t)

    def revise(self, keep: int, token: int) -> Iterator[TokenEvent]:
        """Replace everything after the first `keep` tokens by the target's `token` (verify_late)."""
        del self.tokens[keep:]
        self.finish_reason = ""
        self.text = self.make_text()
        for t in self.tokens[self.prompt_len:]:
            self.text.add(t)
        kept_chars = self.text.released
        self.tokens.append(token)
        yield TokenEvent(token, self.text.add(token), True, keep - self.prompt_len, kept_chars)
        self._check_finish(token)

    def _check_finish(self, t: int) -> None:
        if self.text.stopped:
            self.finish_reason = "stop"
        elif t in self.eos:
            self.finish_reason = "eos"
        elif self.remaining <= 0:
            self.finish_reason = "length"


def proactive_survives(assumed_base: Sequence[int], committed: Sequence[int]) -> bool:
    """Keep a round drafted during NAV only if it was built on exactly what NAV committed.

    Its base is the previous base + the whole draft + the token the edge assumed the target
    would add; NAV committed base + draft[:accepted] + the target's token. They are equal only
    when every draft token was accepted and the target's token is the assumed one, so no token
    the target would not have produced is ever kept.
    """
    return list(assumed_base) == list(committed)


def _fits(rnd: Round, resp: VerifyResponse) -> bool:
    """Does the verdict name a path of the round's draft (a tree's node, a chain's length)?"""
    try:
        rnd.accepted(resp)
    except ValueError:
        return False
    return True


def _resendable(exc: Exception) -> bool:
    """A failure that resending the round whole, from the full prefix, repairs (request_timeout: the
    verifier cut a round's stream that sat idle past its body deadline, e.g. while the app paused)."""
    return isinstance(exc, SessionLost) or (isinstance(exc, VerifierError) and exc.code in (
        ErrorCode.RESYNC, ErrorCode.REQUEST_TIMEOUT))


def _overloaded(exc: Exception) -> bool:
    """The verifier refused the request as overloaded (429): wait what it asks, then try again."""
    return isinstance(exc, VerifierError) and (exc.code is ErrorCode.OVERLOADED
                                               or exc.status == ErrorCode.OVERLOADED.http_status)


class _TreeOnDemand:
    """A drafter's tree on a chain, started when a branch is first expanded: starting one evaluates the
    chain's last token, a token's work before the round goes up, wasted on a round whose branches are
    runner-ups alone."""

    root = None                       # a tree on a chain: its tokens carry their alternatives

    def __init__(self, start):
        self._start, self._tree = start, None

    def grow(self, parents, tokens):
        if self._tree is None:
            self._tree = self._start()
        return self._tree.grow(parents, tokens)


class Engine:
    """Runs generations for one drafter and, unless it works alone, one verifier.

    Keeps only what outlives a generation: the drafter (its KV cache), the cloud session (the
    verifier's KV cache, the circuit breaker), the link profile and the offline settings.
    Policies keep what they learn themselves.

    offline: what a generation does when the verifier is unreachable or a NAV overruns its deadline
        (``offline.py``): "continue", "wait" (up to `offline_wait_s` first) or "verify_late".
    """

    def __init__(self, drafter: Drafter, cloud: CloudSession | None = None, *, offline: str = "continue",
                 offline_wait_s: float = 5.0):
        if offline not in OFFLINE_POLICIES:
            raise ConfigError(f"offline must be one of {', '.join(OFFLINE_POLICIES)}, not {offline!r}")
        if offline_wait_s < 0:
            raise ConfigError(f"offline_wait_s must be >= 0, got {offline_wait_s}")
        self.drafter, self.cloud = drafter, cloud
        self.offline, self.offline_wait_s = offline, offline_wait_s
        self.profiler = LinkProfiler()
        self.lookup = LookupGuesser()    # guesses that cost no drafting, scored on every committed token

    def start(self, prompt: Sequence[int], policy: Policy, *, max_new_tokens: int, stop: Sequence[str] = (),
              sampling: SamplingParams | None = None, timeline: bool = False) -> "Decoding":
        """A generation of `prompt` under `policy`; iterate it for its ``TokenEvent``s."""
        if policy.uses_cloud and self.cloud is None:
            raise ConfigError(f"mode {policy.name!r} needs a verifier")
        return Decoding(self, list(prompt), policy, max_new_tokens, stop, sampling, timeline)

    def close(self) -> None:
        if self.cloud is not None:
            self.cloud.close()


class Decoding:
    """One generation: its committed output, statistics, sampling, and the state of its rounds.

    Iterating runs it; ``stats`` fills in as it goes (and is complete once iteration ends).
    """

    def __init__(self, engine: Engine, prompt: list[int], policy: Policy, max_new_tokens: int,
                 stop: Sequence[str], sampling: SamplingParams | None, timeline: bool):
        self.engine, self.drafter, self.cloud, self.profiler = engine, engine.drafter, engine.cloud, engine.profiler
        self.policy = policy
        self.prompt, self.max_new_tokens, self.stop = prompt, max_new_tokens, stop
        self.sampling = None if sampling is None or sampling.greedy else sampling
        self.stats = GenerationStats(mode=policy.name, prompt_tokens=len(prompt), timeline=[] if timeline else None,
                                     rounds=[] if timeline else None)
        self.out: _Output | None = None
        self.synced = 0                  # committed tokens the verifier holds
        self.unverified_from = None      # where the output's unverified tail starts (offline)
        self._unverified_q: dict = {}    # sampling, offline: position -> the q an unverified token came from
        self.uploader: Uploader | None = None
        self._watch_lock = threading.Lock()

    def __iter__(self) -> Iterator[TokenEvent]:
        stats, cloud = self.stats, self.cloud if self.policy.uses_cloud else None
        self.drafter.set_sampling(self.sampling)
        t0 = time.perf_counter()
        up0, down0 = (cloud.verifier.bytes_sent, cloud.verifier.bytes_received) if cloud else (0, 0)
        loop = self._collaborate() if cloud else self._alone_by_choice()
        try:
            for event in loop:
                if stats.output_tokens == 0:
                    stats.ttft_s = time.perf_counter() - t0
                if event.revise_from is not None:
                    stats.output_tokens = event.revise_from
                stats.output_tokens += 1
                yield event
        finally:
            loop.close()
            if cloud:
                stats.bytes_up += cloud.verifier.bytes_sent - up0
                stats.bytes_down += cloud.verifier.bytes_received - down0
        tail = self.out.text.finish()
        if tail:
            yield TokenEvent(None, tail, cloud is not None)
        stats.total_s = time.perf_counter() - t0
        stats.finish_reason = self.out.finish_reason

    def _begin(self) -> None:
        """The output buffer, bounded by the context (the verifier's too, once a session says it)."""
        limits = [self.drafter.max_context] + ([self.cloud.max_context] if self.cloud and self.cloud.max_context else [])
        room = min(limits) - len(self.prompt)
        if not self.prompt:
            raise PromptTooLongError("the prompt has no tokens")
        if room < 1:
            raise PromptTooLongError(f"a prompt of {len(self.prompt)} tokens leaves no room in a context of "
                                     f"{min(limits)} tokens")
        self.out = _Output(self.prompt, min(self.max_new_tokens, room), self.drafter.eos_token_ids,
                           lambda: TextAssembler(self.drafter.token_bytes, self.stop))
        self.engine.lookup.start(self.prompt)       # guesses from this generation's own tokens only

    # -- the draft alone -------------------------------------------------------------------
    def _alone_by_choice(self) -> Iterator[TokenEvent]:
        """edge_only (or a private request): every token the draft proposes is output, unverified."""
        self._begin()
        while not self.out.finish_reason:
            yield from self.out.commit([self._draft_one().token], verified=False)

    # -- collaboration -----------------------------------------------------------------------
    def _collaborate(self) -> Iterator[TokenEvent]:
        """Speculative rounds while the verifier answers, the draft alone while it does not."""
        self.cloud.begin()               # the prober runs only while some cloud generation is in progress
        try:
            yield from self._collaborate_body()
        finally:
            self.cloud.end()

    def _collaborate_body(self) -> Iterator[TokenEvent]:
        if self.cloud.offline:
            self.cloud.probe_if_due()    # the prober stopped while no cloud generation ran: has it come back?
        if self.cloud.opened is None and not self.cloud.offline:
            try:
                with self._waiting():
                    self._open_session()
            except VerifierUnavailable as exc:
                self._go_offline(exc)    # start at once on the device; the prober watches the cloud
        self._begin()
        self.uploader = Uploader(self.cloud, self.profiler, self.sampling, self.stats.timeline)
        rnd = self._new_round()
        try:
            while not self.out.finish_reason:
                if self.cloud.offline:   # the cloud is gone: the draft alone, until it is back
                    self.uploader.close()
                    yield from self._alone()
                    rnd = self._new_round()
                    continue
                try:
                    rnd = yield from self._round(rnd)
                except (VerifierUnavailable, TimeoutError) as exc:
                    # Unreachable, or NAV overran its deadline: go offline. The round's draft is not
                    # lost work: the drafter proposes the same tokens again, now as output.
                    self._go_offline(exc)
        finally:
            self.uploader.close()
            self.stats.upload_s += self.uploader.upload_s
            self.stats.batch_sizes.extend(self.uploader.batch_sizes)

    def _round(self, rnd: Round) -> Generator[TokenEvent, None, Round]:
        """One speculative round, top to bottom; returns the round to run next."""
        t0, policy = time.perf_counter(), self.policy
        policy.rebases = self.cloud.rebases     # what the plan may count on (an earlier verifier: no)
        policy.round_sent = rnd.nav is not None   # its draft is fixed: no probe can change it
        policy.start_round(self.profiler.estimate())
        # 1. Draft until the policy asks for NAV; each batch it closes goes up at once. (A round whose
        #    final batch already went up during the round before -- pipelined NAV -- is complete.)
        if rnd.nav is None:
            if self._tree_round():
                self._draft_tree(rnd)
            else:
                self._draft(rnd, self._cap(rnd.base))
        # 2. The final batch asks for NAV (the round's first batch also carries the committed tail
        #    the verifier lacks).
        ahead = policy.proactive and not self.cloud.serial and (bool(rnd.draft) or policy.pipelined) and not (
            rnd.draft and self._is_eos(rnd.draft[-1].token)) and not rnd.parents
        if rnd.nav is None and rnd.draft and policy.branches is not None:
            t = time.perf_counter()
            self._add_branches(rnd, self._cap(rnd.base))     # (nothing interrupts drafting outside _draft_ahead)
            self._spent("draft", t)
        nav = rnd.nav or self.uploader.finalize(rnd, self.synced, background=ahead)
        # 3. While NAV is in flight, a proactive policy drafts the next round, assuming all is accepted.
        nxt = self._draft_ahead(rnd, nav) if ahead else rnd.then
        # 4. The verdict, within the deadline; a resync or a lost reply sends the round again whole. (Till
        #    it comes, the policy may plan the next round: off the path.)
        if not nav.done():
            policy.idle(self.profiler.estimate())
        with self._waiting():
            resp, nxt = self._verdict(nav, rnd, nxt)
        self.synced = resp.committed_len
        self._learn(rnd, resp, nav, t0)
        # 5. Commit the accepted prefix (a tree's: the path to the node named) and the target's token
        #    (its correction, or a bonus token).
        yield from self.out.commit(rnd.accepted(resp) + [resp.token], verified=True)
        self.engine.lookup.observe(self.out.tokens, self.out.prompt_len)
        self.profiler.lookup_acceptance = self.engine.lookup.hit_rate
        # 6. Keep the proactive round only if it was built on exactly that; else roll back to the
        #    target's token (the drafter's set_context keeps the common prefix of its KV cache).
        if nxt is not None and proactive_survives(nxt.base, self.out.tokens):
            self.stats.proactive_kept += len(nxt.draft)
            return nxt                     # with the rounds drafted on top of it, if any
        self._drop(nxt)                    # its drafts and guess, and every round on top of it
        # 7. A pipelined round already sent on top of this one is not lost: the verifier answers it as an
        #    empty round on what was just committed (rebased), the next round's head, already in flight.
        return self._rebased_head(nxt) or self._new_round()

    def _rebased_head(self, nxt: Round | None) -> Round | None:
        """The round the verifier is answering rebased, if `nxt` (whose assumption failed) went up naming
        the round just answered (``VerifyRequest.after``): an empty round on the output, in flight."""
        if nxt is None or nxt.nav is None or not nxt.rebasable:
            return None
        self.stats.rebased_rounds += 1
        return Round(nxt.id, list(self.out.tokens), nav=nxt.nav, batches=nxt.batches, rebased=True)

    def _draft(self, rnd: Round, cap: int) -> None:
        """Draft into `rnd` until the policy asks for NAV, EOS, or `cap`; stage the batches it closes."""
        policy = self.policy
        if cap <= 0 or (rnd.draft and (len(rnd.draft) >= cap or self._is_eos(rnd.draft[-1].token)
                                       or policy.verify_now(rnd.draft))):
            return   # nothing to draft (the target decodes alone), or a kept proactive round is complete
        t = time.perf_counter()
        self.drafter.set_context(rnd.base + rnd.tokens)
        while len(rnd.draft) < cap:
            d = self._next_token()
            rnd.draft.append(d)
            if self._is_eos(d.token) or policy.verify_now(rnd.draft):
                break
            if policy.closes_batch(len(rnd.draft)):
                self.uploader.stage(rnd, self.synced)
        self._spent("draft", t)

    def _tree_round(self) -> bool:
        """Is this round a token tree? Where the policy asks for one and the drafter, the verifier and
        greedy decoding allow it; else the round is a chain, and the stats say why."""
        if self.policy.tree is None:
            return False
        why = ("sampling: trees are verified greedily only" if self.sampling is not None
               else "the drafter drafts chains only" if not hasattr(self.drafter, "tree")
               else "the verifier verifies chains only" if not self.cloud.tree_nodes else "")
        self.stats.tree_fallback = why
        return not why

    def _add_branches(self, rnd: Round, depth: int) -> bool:
        """A chain about to go up whole becomes a tree where the policy asks for branches
        (``Policy.branches``): the draft's runner-up at each position where it is worth it (no drafting,
        a verifier row each) and, for a policy that expands them, what the draft drafts after the best
        of those (``trees.draft_tree`` on the chain: a level of branches in one decode). Not for a chain
        whose batches went up already, nor where trees cannot go. No path is longer than `depth` (what
        the output has room for). False: drafting the branches was interrupted (a verdict made the round
        useless: ``_interrupt``), and the round has none."""
        shape = self.policy.branches
        if shape is None or rnd.sent or rnd.parents or not rnd.draft or self.sampling is not None:
            return True
        # the verifier stores every node after the base, so branches must fit its context too
        room = min(shape.nodes, min(self.cloud.tree_nodes, self.cloud.max_draft,
                                    self._context() - len(rnd.base) - 1) - len(rnd.draft))
        if room <= 0:
            return True
        tree = None
        if shape.max_depth > 1 and not hasattr(self.drafter, "tree"):
            shape = dataclasses.replace(shape, max_depth=1)      # a drafter of chains only: runner-ups alone
        elif shape.max_depth > 1:
            def start():
                self.drafter.set_context(rnd.base + rnd.tokens)
                return self.drafter.tree(len(rnd.draft))
            tree = _TreeOnDemand(start)
        try:
            drafts, parents, _ = draft_tree(tree, dataclasses.replace(shape, nodes=room), ends=self._is_eos,
                                            chain=rnd.draft, max_depth=max(depth, len(rnd.draft)))
        except DraftInterrupted:
            self.stats.drafts_interrupted += 1
            return False
        n = len(rnd.draft)
        rnd.leaves, rnd.leaf_parents = drafts[n:], parents[n:]
        return True

    def _draft_tree(self, rnd: Round) -> None:
        """Draft `rnd` as a token tree (``trees.draft_tree``) within the verifier's and the output's bounds."""
        t = time.perf_counter()
        shape = self.policy.tree
        depth = self._cap(rnd.base, shape.max_depth)
        # the verifier stores every node after the base, and so does the drafter: the tree's size must fit
        # both contexts
        nodes = min(shape.nodes, self.cloud.tree_nodes, self.cloud.max_draft, self._context() - len(rnd.base) - 1)
        if depth > 0 and nodes > 0:
            self.drafter.set_context(rnd.base)
            drafts, parents, _ = draft_tree(self.drafter.tree(), dataclasses.replace(shape, nodes=nodes),
                                            max_depth=depth, ends=self._is_eos)
            rnd.draft, rnd.parents = drafts, tuple(parents) if drafts else ()
        self._spent("draft", t)

    def _draft_ahead(self, rnd: Round, nav: Nav) -> Round | None:
        """Proactive drafting while `rnd`'s NAV is in flight; returns the round drafted on top of it.

        Each round drafted ahead starts with a guess (drafted, or looked up: lookup.py) of the target's
        token after a fully accepted round before it (that guess joins its base); its batches name a base
        the verifier will hold only if that guess is right (else it refuses them, or answers the round
        rebased). A pipelined policy goes further: a round
        complete before the verdict sends its final batch at once (conditional) and the next is drafted
        on top of it, up to the policy's ``max_ahead`` rounds: a chain the verifier runs one after
        another while each verdict holds. A round drafted ahead may hold the guess alone (the policy's
        ``ahead_draft`` is 0): the verifier then checks one token a pass, which pays where drafting is
        slow and the round trip long. Rounds drafted ahead during earlier NAVs are extended, not
        drafted again."""
        t = time.perf_counter()
        tip, depth = rnd, 0
        while tip.then is not None:
            tip, depth = tip.then, depth + 1
        # A slow drafter is told to give up a token that a verdict has made useless (``_interrupt``).
        watch = self.profiler.gamma >= self.INTERRUPT_FROM_S
        if watch:
            self.drafter.interrupt(False)            # ready (on this thread), nothing pending
            self._watched = nav
            nav.future.add_done_callback(lambda f: self._interrupt(f, rnd, nav))
        try:
            while not nav.done():
                if tip is not rnd and tip.nav is None:
                    if not self._complete(tip) and not self._draft_into(tip, nav):
                        break                        # the verdict came first
                    if not self.policy.pipelined:
                        break                        # complete: it goes up once the verdict says it may
                    if not self._add_branches(tip, tip.cap):
                        break                        # the verdict came first
                    tip.nav = self.uploader.finalize(tip, len(tip.base), background=True, conditional=True)
                    continue
                if depth >= self.policy.max_ahead:
                    break
                new = self._round_on(tip)
                if new is None:
                    break
                tip.then, tip, depth = new, new, depth + 1
        finally:
            if watch:
                with self._watch_lock:
                    self._watched = None
                self.drafter.interrupt(False)        # one that came between tokens must not stop the next round
        self._spent("draft", t)
        return rnd.then

    INTERRUPT_FROM_S = INTERRUPT_FROM_S     # drafters slower than this per token are interrupted; faster ones finish
    _watched: Nav | None = None              # the NAV whose verdict may interrupt drafting (guarded by _watch_lock)

    def _interrupt(self, verdict, rnd: Round, nav: Nav) -> None:
        """`nav` answered (on its stream's thread) while the engine may be drafting ahead of `rnd`: if the
        verdict breaks the chain drafted on top of `rnd` (or none is drafted yet), the token being
        drafted is wasted work, and waiting for it would delay the next round by up to a whole token."""
        with self._watch_lock:
            if self._watched is not nav:
                return
            if not verdict.cancelled() and verdict.exception() is None:
                resp = verdict.result()
                nxt = rnd.then
                if nxt is not None and _fits(rnd, resp) and nxt.base == rnd.base + rnd.accepted(resp) + [resp.token]:
                    return                       # the chain holds: what is being drafted is still wanted
            self.drafter.interrupt()

    def _round_on(self, tip: Round) -> Round | None:
        """A round on top of `tip` assuming it is accepted whole: its base ends with a guess of the target's
        next token -- drafted, or looked up where the policy's plan says so (``lookup.py``). None when the
        token budget leaves no room or `tip` ends the output."""
        ahead = len(tip.base) + len(tip.draft) - len(self.out.tokens)     # tokens assumed beyond the output
        # The guess and the new round's own target token must fit the budget after `ahead`.
        room = self.out.remaining - ahead - 2
        last = tip.draft[-1].token if tip.draft else tip.base[-1]     # an empty round's: its guess
        if room < 0 or self._is_eos(last):
            return None                  # no room, or the end of the output
        if self.policy.lookup_guesses:   # a guess that costs no drafting (lookup.py): the plan says it pays
            guess = DraftToken(self.engine.lookup.guess(tip.base + tip.tokens), 0.0, 0.0, looked_up=True)
        else:
            self.drafter.set_context(tip.base + tip.tokens)
            try:
                guess = self._next_token()
            except DraftInterrupted:
                self.stats.drafts_interrupted += 1
                return None              # the verdict came first, and made the guess useless
        new = self._new_round(tip.base + tip.tokens + [guess.token])
        # It may be answered rebased if it fails, unless `tip` is itself answered rebased (they never chain).
        new.guess, new.after = guess, None if tip.rebased else tip.id
        # On a rebased round (an empty one, in flight) it is the first drafted round since the rejection:
        # where the policy drafts head rounds, a head round, stopped by the policy's rule for one -- not a
        # round deep in an accepted run, whose planned length (``ahead_draft``) assumes the surer positions
        # there. Its drafting and its pass lie on the path to the next verdict. (A policy whose segments
        # start with an empty head already has one: the rebased round.)
        new.opens_segment = tip.rebased and self.policy.max_draft > 0
        policy_cap = self.policy.max_draft if self.policy.ahead_draft is None or new.opens_segment \
            else self.policy.ahead_draft
        new.cap = 0 if self._is_eos(guess.token) else min(room, self._cap(new.base, policy_cap))
        return new

    def _complete(self, rnd: Round) -> bool:
        """Is a round drafted ahead complete: its cap reached, EOS, or the policy asked for NAV? (A round
        that opens a segment asks as a head round would, its guess counted as its first draft.)"""
        if len(rnd.draft) >= rnd.cap or (bool(rnd.draft) and self._is_eos(rnd.draft[-1].token)):
            return True
        if rnd.opens_segment:
            return self.policy.verify_now([rnd.guess, *rnd.draft], ahead=False)
        return bool(rnd.draft) and self.policy.verify_now(rnd.draft, ahead=True)

    def _draft_into(self, rnd: Round, nav: Nav) -> bool:
        """Draft a round ahead until it is complete (True) or `nav` answers first (False). A pipelined
        policy sends it whole once complete; otherwise its batches go up as the policy closes them
        (every batch the verifier accepts costs it a target pass)."""
        self.drafter.set_context(rnd.base + rnd.tokens)
        while not nav.done():
            try:
                d = self._next_token()
            except DraftInterrupted:
                self.stats.drafts_interrupted += 1
                return False             # the verdict came first, and made this round useless
            rnd.draft.append(d)
            if self._complete(rnd):
                return True
            if not self.policy.pipelined and self.policy.closes_batch(len(rnd.draft)):
                self.uploader.stage(rnd, len(rnd.base))
        return False

    def _verdict(self, nav: Nav, rnd: Round, nxt: Round | None) -> tuple[VerifyResponse, Round | None]:
        """(NAV result, the proactive round if still usable). A resync, a lost session or a broken
        stream drops the proactive round and sends this one again in one piece; so does a refusal as
        overloaded (429), after the wait the verifier asked for, and an answer that does not fit the
        round (rebased when it was not sent to be, or the other way round; another committed length)."""
        try:
            resp = nav.result()
            if (resp.rebased != rnd.rebased or resp.committed_len != len(rnd.base) + resp.accepted + 1
                    or not _fits(rnd, resp)):
                # Not the answer this round's edge of the protocol expects: the verifier holds something
                # else than we believe. Resend from the full prefix.
                raise VerifierError(ErrorCode.RESYNC.http_status, ErrorCode.RESYNC,
                                    f"unexpected verdict ({resp}) for a round on {len(rnd.base)} tokens")
            return resp, nxt
        except TimeoutError:
            self._drop(nxt)
            raise
        except (VerifierError, VerifierUnavailable) as exc:
            overloaded = _overloaded(exc)
            if isinstance(exc, VerifierError) and not (_resendable(exc) or overloaded):
                raise
            self._drop(nxt)
            rnd.as_chain()                # whatever verifier answers the resend takes a chain
            q = [d.q for d in rnd.draft]
            if overloaded:
                # The verifier refused the round before acting on it (what of it went up on a stream is
                # only staged there): it goes again whole, naming its base as before, once the verifier
                # asked us to wait. The NAV deadline counts from this refusal (a pipelined round may have
                # gone up long before its turn), and the retry after the wait gets a whole one.
                deadline = self._overload_wait(exc, 1, time.perf_counter() + nav.deadline_s, nav.deadline_s)
                return self._resend(self.out.tokens, self.synced, rnd.tokens, q, deadline=deadline, overloads=1), None
            resync = exc if isinstance(exc, VerifierError) else None   # else a broken stream: resend as it was
            return self._resend(self.out.tokens, self.synced, rnd.tokens, q, resync), None

    def _drop(self, nxt: Round | None) -> None:
        """Throw away rounds drafted ahead (and anything of theirs not yet on the wire)."""
        for r in nxt.chain() if nxt is not None else ():
            self.stats.proactive_discarded += len(r.draft) + 1
            self.uploader.cancel(r)

    def _resend(self, prefix: list[int], synced: int, draft: list[int], q: list,
                resync: VerifierError | None = None, *, deadline: float | None = None,
                overloads: int = 0) -> VerifyResponse:
        """A round sent whole until it is answered; `resync`: the verifier already said it lost or
        disagrees with our prefix. Such a verifier gets all of it (after a new session if it lost ours);
        a lost reply is retried as it was: the request names its base (length + hash), so a verifier that
        already acted answers "resync" and the round goes again from the full prefix -- a retry never
        double-commits. A refusal as overloaded (429) is retried as it was too, after the wait the
        verifier asks for, until `deadline` (perf_counter; default: a NAV deadline from now; `overloads`:
        refusals of this round already waited for) -- then ``OverloadTimeout``: the offline policy."""
        error = resync
        if error is not None:
            synced = self._resync(error)
        lost = 0
        window = self.cloud.nav_deadline(self.profiler.estimate(), len(draft))
        if deadline is None:
            deadline = time.perf_counter() + window
        while True:
            try:
                resp = self.uploader.whole(prefix, synced, draft, q)
                self.stats.target_passes += 1
                return resp
            except TimeoutError:          # past the deadline: the caller goes offline, no retry
                raise
            except VerifierUnavailable:
                lost += 1
                if lost > self.cloud.max_lost_replies:
                    raise
            except VerifierError as exc:
                if _overloaded(exc):      # refused before it was looked at: nothing changed there
                    overloads += 1
                    deadline = self._overload_wait(exc, overloads, deadline, window)
                    continue
                if not _resendable(exc):
                    raise
                if isinstance(exc, SessionLost):   # restarted again (or evicted): bounded like lost replies
                    lost += 1
                    if lost > self.cloud.max_lost_replies:
                        raise
                elif error is not None and not isinstance(error, SessionLost):
                    raise                          # a second resync in a row: the prefixes disagree, give up
                error = exc
                synced = self._resync(error)

    def _resync(self, error: VerifierError) -> int:
        """The verifier lost our session or holds another prefix: a new session if need be; the whole
        prefix goes again (returns the tokens the verifier now holds: none)."""
        self.stats.resyncs += 1
        if isinstance(error, SessionLost):
            self._open_session()
        return 0

    def _learn(self, rnd: Round, resp: VerifyResponse, nav: Nav, t0: float) -> None:
        """Count the round, feed the profiler, and tell the policy how its round ended."""
        # What the chain itself came to (a branch taken is where the target rejected the chain's token: the
        # branch's first token is the target's there), as a chain-only verifier would have said: the policy
        # and the profiler learn the draft's acceptance from it, and a branch taken counts as a rollback.
        accepted, token = rnd.chain_verdict(resp)
        self._count_round(len(rnd.draft) + len(rnd.leaves), resp.accepted,
                          accepted < len(rnd.draft) if rnd.leaves else rnd.rejected(resp))
        # here, not when drafted: like draft_n, these count verified rounds as verified (a resend goes as a chain)
        self.stats.leaves_sent += len(rnd.leaves)
        if rnd.parents:
            self.stats.tree_rounds += 1
            self.stats.tree_nodes += len(rnd.draft)
        self.stats.leaves_accepted += rnd.leaf_taken(resp)
        self.stats.leaves_kept += resp.accepted - accepted
        own = nav.answered_with(resp)     # else a resend answered: the request's own times say nothing of it
        if self.stats.rounds is not None:
            self.stats.rounds.append(RoundRecord(
                "rebased" if rnd.rebased else "pipelined" if nav.pipelined else "plain", len(rnd.draft) + len(rnd.leaves),
                resp.accepted, nav.sent_at, nav.answered_at if own else None, time.perf_counter(),
                resp.verify_ms, resp.queue_ms))
        self.stats.target_passes += max(1, rnd.batches)
        self.stats.verify_s += resp.verify_ms / 1e3
        self.stats.pipelined_rounds += nav.pipelined and own      # not when a resend answered it
        # The link's part of the round trip: what the verifier spent verifying and waiting (behind the round
        # before, or other sessions) is off it. A round whose upload may have queued behind another's on
        # the uplink is no clean sample, unless it uploaded no draft token.
        if own and (not nav.contended or nav.final_tokens == 0):
            self.profiler.observe_nav(nav.answered_at - nav.sent_at - (resp.verify_ms + resp.queue_ms) / 1e3,
                                      nav.final_tokens)
            self._trace("nav", nav.sent_at, nav.answered_at)
        self.profiler.observe_round(len(rnd.draft), accepted, resp.verify_ms / 1e3)
        guess = rnd.then.guess if rnd.then is not None else None
        if guess is not None and accepted == len(rnd.draft):
            self.stats.guesses_checked += 1
            self.stats.guesses_right += resp.token == guess.token
            if guess.looked_up:
                self.stats.lookups_checked += 1
                self.stats.lookups_right += resp.token == guess.token
        self.policy.on_verdict(RoundVerdict(tuple(rnd.draft), accepted, time.perf_counter() - t0,
                                            self.profiler.estimate(), token, guess))

    # -- offline: the circuit breaker (offline.py, session.py) -----------------------------------
    def _go_offline(self, cause: Exception) -> None:
        """A NAV failed or overran: open the breaker (the session prober takes over). Policy "wait"
        first blocks up to `offline_wait_s` for the verifier to come back; policy "fail" raises."""
        if self.engine.offline == "fail":
            if isinstance(cause, VerifierUnavailable):
                raise cause
            raise VerifierTimeout(f"the verifier did not answer within the NAV deadline ({cause})") from cause
        if self.cloud.trip(getattr(cause, "retry_after_s", None) or 0.0):   # overloaded: probe after its wait
            self.stats.breaker_trips += 1
        if self.engine.offline == "wait":
            t = time.perf_counter()
            self.cloud.wait_online(self.engine.offline_wait_s)
            self.stats.wait_s += time.perf_counter() - t

    def _alone(self) -> Iterator[TokenEvent]:
        """Breaker open: emit draft tokens (unverified) until the prober sees the verifier again, then
        open a fresh session and, under verify_late, verify the unverified tail."""
        out, stats = self.out, self.stats
        self.cloud.keep_probing()         # a prober that gave up (its horizon passed) starts again
        t0 = time.perf_counter()
        while not out.finish_reason and not self.cloud.back_online:
            if self.unverified_from is None:
                self.unverified_from = len(out.tokens)
            d = self._draft_one()
            self._unverified_q[len(out.tokens)] = d.q
            stats.unverified_tokens += 1
            yield from out.commit([d.token], verified=False)
        stats.offline_s += time.perf_counter() - t0
        if not self.cloud.back_online:
            return                      # generation over; the breaker stays open
        self.cloud.resume()
        self.synced = 0
        try:
            with self._waiting():
                self._open_session()
            if self.engine.offline == "verify_late" and self.unverified_from is not None:
                yield from self._verify_late()
            self.unverified_from = None
        except (VerifierUnavailable, TimeoutError) as exc:
            self._go_offline(exc)

    def _verify_late(self) -> Iterator[TokenEvent]:
        """Verify the unverified tail as drafts, a chunk per NAV. Where the target disagrees, a
        revision replaces the tail from the first rejected token."""
        out, pos = self.out, self.unverified_from
        while pos < len(out.tokens):
            chunk = out.tokens[pos: pos + self.cloud.max_draft]
            q = [self._unverified_q.get(pos + i) for i in range(len(chunk))]
            with self._waiting():
                resp = self._resend(out.tokens[:pos], min(self.synced, pos), chunk, q)
            self.synced = resp.committed_len
            self._count_round(len(chunk), resp.accepted)
            # The target kept `accepted` tokens of the chunk and chose the one after them itself.
            pos += resp.accepted
            if pos == len(out.tokens):                      # the whole tail verified: its token is new
                if not out.finish_reason:
                    yield from out.commit([resp.token], verified=True)
                return
            if resp.accepted == len(chunk) and out.tokens[pos] == resp.token:
                pos += 1                                     # the target's token is the next one we had
                continue
            self.stats.revisions += 1                        # the target disagrees from here on
            yield from out.revise(pos, resp.token)
            return

    def _open_session(self) -> None:
        """Handshake and OPEN within a NAV deadline, waiting out an overloaded verifier's 429s in it."""
        deadline_s = self.cloud.nav_deadline(self.profiler.estimate(), 0)
        give_up = time.perf_counter() + deadline_s
        overloads = 0
        while True:
            try:
                self.cloud.open(min(deadline_s, max(0.05, give_up - time.perf_counter())))
                return
            except VerifierError as exc:
                if not _overloaded(exc):
                    raise
                overloads += 1
                give_up = self._overload_wait(exc, overloads, give_up, deadline_s)

    def _overload_wait(self, exc: VerifierError, tries: int, deadline: float, window_s: float) -> float:
        """The verifier refused a request as overloaded: wait what it asked for (bounded, jittered, longer
        for each refusal of the same request: ``OverloadBackoff``) before try number `tries` + 1, or raise
        ``OverloadTimeout`` when that wait would pass `deadline` or the tries are spent -- the caller then
        follows the offline policy, as for an overdue NAV. Returns the deadline for what follows.

        The first refusal of a request is always waited out, and the retry gets a whole deadline of its
        own (`window_s`, the request's NAV deadline) from the end of the wait: a refusal may come late
        in the request's deadline (a round that queued, an OPEN after a slow handshake), and one refusal
        must not send a generation offline. Later refusals must fit in that deadline."""
        backoff = self.cloud.overload
        self.cloud.note_overload()
        asked = getattr(exc, "retry_after_s", None)
        delay = backoff.delay(asked, time.monotonic() - getattr(exc, "at", time.monotonic()), tries)
        now = time.perf_counter()
        if tries == 1:
            deadline = max(deadline, now + delay + window_s)
        if not backoff.fits(tries, delay, now, deadline):
            # The prober's first probe waits what the verifier asked for, not the wait grown by refusals.
            raise OverloadTimeout(f"the verifier stayed overloaded past the NAV deadline ({tries} refusals; "
                                  f"it asked for {asked if asked is not None else 'no'} s of Retry-After)",
                                  min(delay, backoff.delay(asked))) from exc
        self.stats.overload_waits += 1
        t = time.perf_counter()
        if not self.cloud.pause(delay):
            raise VerifierUnavailable("the client closed while waiting for an overloaded verifier") from exc
        self.stats.overload_wait_s += time.perf_counter() - t
        return deadline

    @contextmanager
    def _waiting(self) -> Iterator[None]:
        """Count the time inside as blocked on the cloud (stats.wait_s)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stats.wait_s += time.perf_counter() - t

    # -- small helpers ----------------------------------------------------------------------
    def _cap(self, base: list[int], policy_cap: int | None = None) -> int:
        """A round's draft length cap: the policy's (`policy_cap`, else its ``max_draft``), the
        verifier's, the token budget (every NAV round commits accepted + 1 tokens, hence remaining - 1)
        and the context."""
        cap = self.policy.max_draft if policy_cap is None else policy_cap
        return max(0, min(cap, self.cloud.max_draft, self.out.remaining - 1, self._context() - len(base) - 1))

    def _context(self) -> int:
        """The shorter of the draft's and the target's contexts."""
        return min(self.drafter.max_context, self.cloud.max_context or self.drafter.max_context)

    def _next_token(self) -> DraftToken:
        """The drafter's next token, its time fed to the profiler (gamma)."""
        t = time.perf_counter()
        try:
            d = self.drafter.next_token()
        except DraftInterrupted:
            # A token stopped after s seconds took at least s: where verdicts always come first (a draft
            # slower than the round trip), no token would ever finish to say what one costs.
            spent = time.perf_counter() - t
            if spent > self.profiler.gamma:
                self.profiler.observe_draft(spent)
            raise
        self.profiler.observe_draft(time.perf_counter() - t)
        return d

    def _draft_one(self) -> DraftToken:
        """The draft's next token after the whole output (offline and edge-only generation)."""
        t = time.perf_counter()
        self.drafter.set_context(self.out.tokens)
        d = self.drafter.next_token()
        self.stats.draft_s += time.perf_counter() - t
        return d

    def _is_eos(self, token: int) -> bool:
        return token in self.drafter.eos_token_ids

    def _new_round(self, base: list[int] | None = None) -> Round:
        return Round(self.cloud.next_round_id(), list(self.out.tokens) if base is None else base)

    def _count_round(self, drafted: int, accepted: int, rejected: bool | None = None) -> None:
        s = self.stats
        s.nav_rounds += 1
        s.draft_n += drafted
        s.draft_n_accepted += accepted
        s.rollback_rounds += accepted < drafted if rejected is None else rejected

    def _spent(self, kind: str, start: float) -> None:
        end = time.perf_counter()
        self.stats.draft_s += end - start
        self._trace(kind, start, end)

    def _trace(self, kind: str, start: float, end: float) -> None:
        if self.stats.timeline is not None:
            self.stats.timeline.append((kind, start, end))
