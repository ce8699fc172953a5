"""The decoding engine: one file where a round reads top to bottom.

    draft -> (batches go up as the schedule closes them) -> trigger -> final batch -> NAV
          -> (meanwhile: proactive drafting of the next round) -> commit -> keep or roll back

Each round the drafter moves to the round's base (its KV cache keeps the common prefix: that
is the edge-side rollback) and drafts until the policy's trigger fires. The uploader sends the
draft in batches on its own thread; the final batch asks the verifier for NAV, which accepts
the longest correct prefix and adds the target's own next token. While that is in flight a
proactive policy drafts on, assuming every token is accepted and the target's token equals the
draft's own next one; those tokens (and their uploads) survive only if both assumptions hold.
The committed sequence only ever grows by tokens the target chose, so greedy output equals
target-only greedy decoding for every policy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from privacy import OpenSession, SamplingParams, SessionOpened, VerifyRequest, VerifyResponse, prefix_hash
from privacy.messages import vocab_fingerprint

from .autotune import OnlineAutotuner
from .drafter import Drafter, DraftToken
from .errors import ConfigError, PromptTooLongError, VerifierError, VerifierUnavailable, VocabMismatchError
from .offline import CircuitBreaker, nav_deadline
from .policies import Policy
from .profiler import LinkProfiler
from .scheduling import BatchPlan, WindowEstimator, plan_batches
from .stats import GenerationStats
from .text import TextAssembler
from .transport import Verifier
from .triggers import DualThreshold
from .uploader import Batch, Uploader


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


@dataclass
class _Round:
    """Draft tokens since the last NAV and the committed prefix they build on (assumed, if proactive)."""

    id: int
    base: list[int]
    draft: list[DraftToken] = field(default_factory=list)
    sent: int = 0                 # draft tokens handed to the uploader in non-final batches

    @property
    def tokens(self) -> list[int]:
        return [d.token for d in self.draft]


class Engine:
    """Runs generations for one drafter + verifier pair. Keeps what it learns across generations:
    the link profile, the DP plan, the window estimate and the autotuner's memory."""

    def __init__(self, drafter: Drafter, verifier: Verifier | None):
        self.drafter = drafter
        self.verifier = verifier
        self.fingerprint = vocab_fingerprint(drafter.vocab_tokens)
        self.session: SessionOpened | None = None   # kept across generations: its KV cache is reused
        self.max_draft = 64
        self.max_context = drafter.max_context
        self.profiler = LinkProfiler()
        self.window = WindowEstimator()
        self.autotuner = OnlineAutotuner()
        self._plan: BatchPlan | None = None
        self._plan_basis = None
        self._round_ids = 0
        self.timeline: list | None = None   # set to a list to record (kind, start, end) spans: draft/upload/nav
        # Offline behaviour (see offline.py): policy, its wait, the NAV deadline (None: from the profile).
        self.offline = "continue"
        self.offline_wait_s = 5.0
        self.nav_deadline_s: float | None = None
        self.probe_horizon_s = 600.0        # the prober gives up after this long offline (bounded)
        self.max_lost_replies = 3           # lost replies retried per NAV before going offline
        self.breaker = CircuitBreaker()
        self._online = threading.Event()
        self._closing = threading.Event()
        self._prober: threading.Thread | None = None
        self.resumed_at: float | None = None   # perf_counter when the last probe found the verifier back
        # This generation's sampling (None: greedy); a seeded one leaves the autotuner alone.
        self.sampling: SamplingParams | None = None
        self._seeded = False
        self._unverified_q: dict = {}        # sampling, offline: position -> the q an unverified token came from

    # -- one generation ---------------------------------------------------------------
    def run(self, prompt: list[int], policy: Policy, max_new_tokens: int,
            stop: Sequence[str] = (), stats: GenerationStats | None = None,
            sampling: SamplingParams | None = None, seeded: bool = False) -> Iterator[TokenEvent]:
        stats = stats or GenerationStats(mode=policy.name)
        self.sampling = None if sampling is None or sampling.greedy else sampling
        self._seeded, self._unverified_q = seeded, {}
        set_sampling = getattr(self.drafter, "set_sampling", None)
        if set_sampling is None and self.sampling is not None:
            raise ConfigError(f"{type(self.drafter).__name__} cannot sample: it has no set_sampling()")
        if set_sampling is not None:
            set_sampling(self.sampling)
        stats.prompt_tokens = len(prompt)
        t0 = time.perf_counter()
        up0 = down0 = 0
        if policy.uses_cloud:
            up0, down0 = self.verifier.bytes_sent, self.verifier.bytes_received
            if self.session is None and not self.breaker.is_open:
                try:
                    self._open_session(stats)
                except VerifierUnavailable:
                    self._go_offline(stats)   # start at once on the device; the prober watches the cloud
        room = self.max_context - len(prompt)
        if room < 1 or not prompt:
            raise PromptTooLongError(f"a prompt of {len(prompt)} tokens leaves no room in a context of "
                                     f"{self.max_context} tokens" if prompt else "the prompt has no tokens")
        out = _Output(prompt, min(max_new_tokens, room), self.drafter.eos_token_ids,
                      lambda: TextAssembler(self.drafter.token_bytes, stop))
        if not policy.uses_cloud:
            loop = self._edge_only(out, stats)
        elif not policy.uses_draft:
            loop = self._cloud_only(out, stats)
        else:
            loop = self._speculative(out, policy, stats)
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
            if policy.uses_cloud:
                stats.bytes_up += self.verifier.bytes_sent - up0
                stats.bytes_down += self.verifier.bytes_received - down0
        tail = out.text.finish()
        if tail:
            yield TokenEvent(None, tail, policy.uses_cloud)
        stats.total_s = time.perf_counter() - t0
        stats.finish_reason = out.finish_reason

    def _edge_only(self, out: _Output, stats: GenerationStats) -> Iterator[TokenEvent]:
        """The draft model alone: every token it proposes is output, unverified."""
        while not out.finish_reason:
            t = time.perf_counter()
            self.drafter.set_context(out.tokens)
            token = self.drafter.next_token().token
            stats.draft_s += time.perf_counter() - t
            yield from out.commit([token], verified=False)

    def _cloud_only(self, out: _Output, stats: GenerationStats) -> Iterator[TokenEvent]:
        """The target alone: an empty draft per round, one token per round trip."""
        synced, unverified_from = 0, None
        while not out.finish_reason:
            if self.breaker.is_open:
                synced, unverified_from = yield from self._offline(out, unverified_from, stats)
                continue
            try:
                resp, synced = self._nav_whole(out.tokens, synced, [], stats)
            except VerifierUnavailable:
                self._go_offline(stats)
                continue
            self._count_round(stats, 0, 0)
            yield from out.commit([resp.token], verified=True)

    # -- speculative decoding ----------------------------------------------------------
    def _speculative(self, out: _Output, policy: Policy, stats: GenerationStats) -> Iterator[TokenEvent]:
        uploader = Uploader(self.verifier, self.profiler, self.timeline)
        synced = 0                                  # committed tokens the verifier holds
        unverified_from = None                      # where the output's unverified tail starts (offline)
        rnd = self._new_round(list(out.tokens))
        try:
            while not out.finish_reason:
                if self.breaker.is_open:            # the cloud is gone: the draft alone, until it is back
                    uploader.close()
                    synced, unverified_from = yield from self._offline(out, unverified_from, stats)
                    rnd = self._new_round(list(out.tokens))
                    continue
                t_round = time.perf_counter()
                self._tune(policy)
                # Every NAV round commits accepted + 1 tokens, hence remaining - 1.
                cap = min(policy.max_draft, self.max_draft, out.remaining - 1,
                          self.drafter.max_context - len(rnd.base) - 1)
                plan = self._batch_plan(policy)
                nxt = None
                try:
                    # 1. Draft until the trigger fires; batches go up as the schedule closes them.
                    self._draft_round(rnd, cap, policy, plan, uploader, synced, stats)
                    # 2. The final batch asks for NAV (it carries the committed tail the verifier lacks).
                    final = self._batch(rnd, synced, final=True)
                    pending = uploader.finalize(final)
                    nav_times = [time.perf_counter()]
                    pending.add_done_callback(   # a NAV that answered, not one that failed, is a sample
                        lambda f: f.cancelled() or f.exception() or nav_times.append(time.perf_counter()))
                    # 3. While NAV is in flight, a proactive policy drafts the next round.
                    if policy.proactive and rnd.draft and rnd.draft[-1].token not in self.drafter.eos_token_ids:
                        nxt = self._draft_ahead(rnd, pending, out.remaining - len(rnd.draft) - 2, policy, plan,
                                                uploader, stats)
                    t_wait = time.perf_counter()
                    resp, synced, nxt = self._await_nav(pending, nav_times[0], len(final.tokens), out, rnd, nxt,
                                                        synced, uploader, stats)
                except (VerifierUnavailable, TimeoutError):
                    # Unreachable, or NAV overran its deadline: go offline. The round's draft is not
                    # lost work: the drafter proposes the same tokens again, now as output.
                    self._go_offline(stats)
                    continue
                stats.wait_s += time.perf_counter() - t_wait
                stats.verify_s += resp.verify_ms / 1e3
                if len(nav_times) == 2:   # the streamed NAV answered (not a fallback)
                    self.profiler.observe_nav(nav_times[1] - nav_times[0] - resp.verify_ms / 1e3, len(final.tokens))
                    self._trace("nav", *nav_times)
                self._count_round(stats, len(rnd.draft), resp.accepted)
                policy.trigger.on_round(len(rnd.draft), resp.accepted, rnd.draft)
                self.profiler.observe_round(len(rnd.draft), resp.accepted, resp.verify_ms / 1e3)
                self.window.observe(len(rnd.draft))
                # 4. Commit the accepted prefix and the target's token; keep the proactive round
                #    only if it was built on exactly that.
                committed = rnd.tokens[: resp.accepted] + [resp.token]
                yield from out.commit(committed, verified=True)
                if policy.autotune and not self._seeded:
                    self.autotuner.record(len(committed), time.perf_counter() - t_round,
                                          self.profiler.estimate().regime(), self.profiler.acceptance)
                if nxt is not None and proactive_survives(nxt.base, out.tokens):
                    stats.proactive_kept += len(nxt.draft)
                    rnd = nxt
                else:
                    if nxt is not None:
                        stats.proactive_discarded += len(nxt.draft) + 1
                        uploader.cancel(nxt.id)
                    rnd = self._new_round(list(out.tokens))   # roll back to the target's token
        finally:
            uploader.close()
            stats.upload_s += uploader.upload_s
            stats.batch_sizes.extend(uploader.batch_sizes)

    def _await_nav(self, pending, sent_at: float, final_tokens: int, out: _Output, rnd: _Round,
                   nxt: _Round | None, synced: int, uploader: Uploader, stats: GenerationStats):
        """(NAV result, tokens the verifier holds, the proactive round if still usable) of the
        streamed round, within its deadline. A resync or a broken stream drops the proactive round
        and sends this one again in one piece."""
        est = self.profiler.estimate()
        # Lenient on purpose: a one-token round trip per token of the final batch (beta may still be
        # the prior when a policy sends no non-final batches); a false "offline" costs more than waiting.
        expected = (est.nav_network or 0.0) * max(1, final_tokens) + est.verify
        deadline = nav_deadline(expected, self.nav_deadline_s)
        try:
            resp = pending.result(timeout=max(0.0, deadline - (time.perf_counter() - sent_at)))
            return resp, resp.committed_len, nxt
        except TimeoutError:
            uploader.cancel(rnd.id)
            if nxt is not None:
                uploader.cancel(nxt.id)
            raise
        except (VerifierError, VerifierUnavailable) as exc:
            if isinstance(exc, VerifierError) and exc.code not in ("resync", "unknown_session"):
                raise
            if nxt is not None:
                uploader.cancel(nxt.id)
            q = tuple(d.q for d in rnd.draft) if self.sampling else ()
            if isinstance(exc, VerifierError):
                return (*self._nav_whole(out.tokens, 0, rnd.tokens, stats, first_error=exc, q=q), None)
            return (*self._nav_whole(out.tokens, synced, rnd.tokens, stats, q=q), None)

    # -- offline: the circuit breaker (offline.py) ---------------------------------------
    def _go_offline(self, stats: GenerationStats) -> None:
        """A NAV failed or overran: open the breaker, forget the session, probe in the background.
        Policy "wait" first blocks up to `offline_wait_s` for the verifier to come back."""
        if not self.breaker.is_open:
            stats.breaker_trips += 1
        self.breaker.trip()
        self.session = None
        self._online.clear()
        if self._prober is None or not self._prober.is_alive():
            self._prober = threading.Thread(target=self._probe_loop, name="verifier-probe", daemon=True)
            self._prober.start()
        if self.offline == "wait":
            t = time.perf_counter()
            self._online.wait(self.offline_wait_s)
            stats.wait_s += time.perf_counter() - t

    def _probe_loop(self) -> None:
        """Background: jittered exponential backoff between health probes, until one succeeds, the
        engine closes, or `probe_horizon_s` passes."""
        give_up = time.monotonic() + self.probe_horizon_s
        while not self._closing.is_set() and time.monotonic() < give_up:
            if self._closing.wait(self.breaker.delay_until_probe()):
                return
            probe = getattr(self.verifier, "probe", None)
            if probe is None or probe():
                self.resumed_at = time.perf_counter()
                self._online.set()
                return
            self.breaker.probe_failed()

    def _offline(self, out: _Output, unverified_from: int | None, stats: GenerationStats):
        """Breaker open: emit draft tokens (unverified) until the prober sees the verifier again,
        then resync a fresh session and, under verify_late, verify the unverified tail.
        Returns (tokens the verifier holds, start of the output's unverified tail or None)."""
        t0 = time.perf_counter()
        while not out.finish_reason and not self._online.is_set():
            if unverified_from is None:
                unverified_from = len(out.tokens)
            t = time.perf_counter()
            self.drafter.set_context(out.tokens)
            d = self.drafter.next_token()
            token = d.token
            self._unverified_q[len(out.tokens)] = d.q
            stats.draft_s += time.perf_counter() - t
            stats.unverified_tokens += 1
            yield from out.commit([token], verified=False)
        stats.offline_s += time.perf_counter() - t0
        if not self._online.is_set():
            return 0, unverified_from              # generation over; the breaker stays open
        self.breaker.close()
        try:
            self._open_session(stats)
            if self.offline == "verify_late" and unverified_from is not None:
                synced = yield from self._verify_late(out, unverified_from, stats)
                return synced, None
        except VerifierUnavailable:
            self._go_offline(stats)
            return 0, unverified_from
        return 0, None

    def _verify_late(self, out: _Output, start: int, stats: GenerationStats):
        """Verify the unverified tail out.tokens[start:] as drafts, a chunk per NAV. Where the target
        disagrees, a revision replaces the tail from the first rejected token."""
        pos, synced = start, 0
        while pos < len(out.tokens):
            chunk = out.tokens[pos: pos + self.max_draft]
            q = tuple(self._unverified_q.get(pos + i) for i in range(len(chunk))) if self.sampling else ()
            resp, synced = self._nav_whole(out.tokens[:pos], min(synced, pos), chunk, stats, q=q)
            self._count_round(stats, len(chunk), resp.accepted)
            if resp.accepted < len(chunk):
                stats.revisions += 1
                yield from out.revise(pos + resp.accepted, resp.token)
                return resp.committed_len
            pos += len(chunk)
        if not out.finish_reason:
            yield from out.commit([resp.token], verified=True)
        return resp.committed_len

    def close(self) -> None:
        """Stop the background prober."""
        self._closing.set()

    def _draft_round(self, rnd: _Round, cap: int, policy: Policy, plan: BatchPlan | None, uploader: Uploader,
                     synced: int, stats: GenerationStats) -> None:
        """Draft into `rnd` until the trigger fires, EOS, or `cap`; stage batches on the way."""
        if rnd.draft and (policy.trigger.should_verify(rnd.draft) or len(rnd.draft) >= cap
                          or rnd.draft[-1].token in self.drafter.eos_token_ids):
            return   # a kept proactive round may already be complete
        t = time.perf_counter()
        self.drafter.set_context(rnd.base + rnd.tokens)
        while len(rnd.draft) < cap:
            t_token = time.perf_counter()
            d = self.drafter.next_token()
            self.profiler.observe_draft(time.perf_counter() - t_token)
            rnd.draft.append(d)
            if d.token in self.drafter.eos_token_ids or policy.trigger.should_verify(rnd.draft):
                break
            if self._closes_batch(policy, plan, len(rnd.draft)):
                uploader.stage(self._batch(rnd, synced, final=False))
        stats.draft_s += time.perf_counter() - t
        self._trace("draft", t, time.perf_counter())

    def _draft_ahead(self, rnd: _Round, pending, budget: int, policy: Policy, plan: BatchPlan | None,
                     uploader: Uploader, stats: GenerationStats) -> _Round | None:
        """Proactive drafting while NAV is in flight. The first token is the assumed target token
        after a fully accepted round; the rest are the next round's draft."""
        if budget < 1:
            return None
        t = time.perf_counter()
        self.drafter.set_context(rnd.base + rnd.tokens)
        assumed = self.drafter.next_token()
        nxt = self._new_round(rnd.base + rnd.tokens + [assumed.token])
        cap = min(policy.max_draft, self.max_draft, budget, self.drafter.max_context - len(nxt.base) - 1)
        while not pending.done() and len(nxt.draft) < cap and assumed.token not in self.drafter.eos_token_ids:
            d = self.drafter.next_token()
            nxt.draft.append(d)
            if d.token in self.drafter.eos_token_ids or policy.trigger.should_verify(nxt.draft):
                break
            if self._closes_batch(policy, plan, len(nxt.draft)):
                # Built on a prefix the verifier does not hold yet: it stages it only if NAV confirms it.
                uploader.stage(self._batch(nxt, len(nxt.base), final=False))
        stats.draft_s += time.perf_counter() - t
        self._trace("draft", t, time.perf_counter())
        return nxt

    def _batch(self, rnd: _Round, synced: int, final: bool) -> Batch:
        """The round's next batch: its base as the verifier should hold it, and the tokens not yet sent."""
        base_len = min(synced, len(rnd.base))
        batch = Batch(rnd.id, base_len, prefix_hash(rnd.base[:base_len]) if base_len else b"",
                      tuple(rnd.base[base_len:]), tuple(rnd.tokens[rnd.sent:]), offset=rnd.sent, final=final,
                      sampling=self.sampling,
                      q=tuple(d.q for d in rnd.draft[rnd.sent:]) if self.sampling else ())
        rnd.sent = len(rnd.draft)
        return batch

    @staticmethod
    def _closes_batch(policy: Policy, plan: BatchPlan | None, drafted: int) -> bool:
        if policy.schedule == "per_token":
            return True
        return policy.schedule == "dp" and plan is not None and plan.ends_batch(drafted)

    def _batch_plan(self, policy: Policy) -> BatchPlan | None:
        """The DP plan over the predicted window; re-planned when the window or the link drifts."""
        if policy.schedule != "dp":
            return None
        est, window = self.profiler.estimate(), self.window.value
        if self._plan is None or self._plan_basis[1] != window or est.drifted_from(self._plan_basis[0]):
            self._plan = BatchPlan(plan_batches(window, est.alpha, est.beta, est.gamma))
            self._plan_basis = (est, window)
        return self._plan

    def _tune(self, policy: Policy) -> None:
        if policy.autotune and isinstance(policy.trigger, DualThreshold):
            # A seeded request must be reproducible: the tuner's settled thresholds, not a live candidate.
            tuner = self.autotuner
            policy.trigger.r1, policy.trigger.r2 = tuner.best_thresholds() if self._seeded else tuner.thresholds()

    def _trace(self, kind: str, start: float, end: float) -> None:
        if self.timeline is not None:
            self.timeline.append((kind, start, end))

    def _new_round(self, base: list[int]) -> _Round:
        self._round_ids += 1
        return _Round(self._round_ids, base)

    # -- synchronous NAV (cloud-only rounds and recovery) --------------------------------
    def _nav_whole(self, tokens: list[int], synced: int, draft: list[int], stats: GenerationStats,
                   first_error: VerifierError | None = None, q: tuple = ()) -> tuple[VerifyResponse, int]:
        """One round sent in one piece; a verifier that lost or disagrees with our prefix gets it resent."""
        error = first_error
        lost = 0
        for _ in range(2 + self.max_lost_replies):
            if error is not None:
                stats.resyncs += 1
                if error.code == "unknown_session":
                    self._open_session(stats)
                synced = 0
            self._call_deadline(len(draft))
            t = time.perf_counter()
            self._round_ids += 1
            req = VerifyRequest(synced, tuple(tokens[synced:]), tuple(draft),
                                prefix_hash(tokens[:synced]) if synced else b"", self._round_ids,
                                sampling=self.sampling, q=q)
            try:
                resp = self.verifier.verify(req)
            except VerifierUnavailable:
                # A lost reply: retry. The request names its base (length + hash): a verifier that
                # already acted on it answers "resync" and the round goes again from the full
                # prefix, so a retry never double-commits.
                lost += 1
                if lost > self.max_lost_replies:
                    raise
                continue
            except VerifierError as exc:
                if error is not None or exc.code not in ("resync", "unknown_session"):
                    raise
                error = exc
                continue
            if not draft:   # cloud-only: the whole round trip is waiting
                stats.wait_s += time.perf_counter() - t
                stats.verify_s += resp.verify_ms / 1e3
            return resp, resp.committed_len
        raise error or VerifierUnavailable("the verifier did not answer")

    def _call_deadline(self, draft_tokens: int = 0) -> None:
        """Bound the next one-shot calls (handshake, whole NAV) by the NAV deadline of the profiled link."""
        setter = getattr(self.verifier, "set_deadline", None)
        if setter is not None:
            est = self.profiler.estimate()
            expected = (est.nav_network or 0.0) * max(1, draft_tokens) + est.verify   # lenient, as in _await_nav
            setter(nav_deadline(expected, self.nav_deadline_s))

    def _open_session(self, stats: GenerationStats) -> None:
        self._call_deadline()
        t = time.perf_counter()
        opened = self.verifier.open_session(OpenSession(self.fingerprint, self.drafter.vocab_size))
        stats.wait_s += time.perf_counter() - t
        if opened.vocab_fingerprint != self.fingerprint:  # the verifier should have refused already
            raise VocabMismatchError(409, "vocab_mismatch", f"the target {opened.model!r} uses another vocabulary")
        self.session = opened
        self.max_draft = opened.max_draft
        self.max_context = min(self.drafter.max_context, opened.max_context)

    @staticmethod
    def _count_round(stats: GenerationStats, drafted: int, accepted: int) -> None:
        stats.nav_rounds += 1
        stats.draft_n += drafted
        stats.draft_n_accepted += accepted
        stats.rollback_rounds += accepted < drafted
