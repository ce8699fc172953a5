"""The speculative decoding round, top to bottom: draft -> NAV -> commit -> rollback.

One ``Engine.run`` call is one generation. Each round the drafter moves to the
committed sequence (its KV cache keeps the common prefix: that is the edge-side
rollback), drafts until the policy triggers verification, and the verifier accepts
the longest correct prefix and adds its own next token. The committed sequence only
ever grows by tokens the target chose, so greedy output equals target-only greedy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from privacy import OpenSession, SessionOpened, VerifyRequest, VerifyResponse, prefix_hash
from privacy.messages import vocab_fingerprint

from .drafter import Drafter, DraftToken
from .errors import PromptTooLongError, VerifierError, VocabMismatchError
from .policies import Policy
from .stats import GenerationStats
from .text import TextAssembler
from .transport import Verifier


@dataclass(frozen=True)
class TokenEvent:
    """One committed output token and the text it releases (may be empty while held back)."""

    token: int | None   # None only for the last event: text flushed at the end of generation
    text: str
    verified: bool      # True when the target produced or accepted it; False for edge-only output


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]          # output token ids (prompt excluded)
    prompt_tokens: list[int]
    stats: GenerationStats
    events: list[TokenEvent] = field(default_factory=list, repr=False)


class _Output:
    """The committed sequence plus everything that decides when generation ends."""

    def __init__(self, prompt: list[int], max_new_tokens: int, eos: frozenset[int], text: TextAssembler):
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.text = text
        self.finish_reason = ""

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens) + self.prompt_len

    def commit(self, tokens: Sequence[int], verified: bool) -> Iterator[TokenEvent]:
        for t in tokens:
            if self.finish_reason:
                return
            self.tokens.append(t)
            yield TokenEvent(t, self.text.add(t), verified)
            if self.text.stopped:
                self.finish_reason = "stop"
            elif t in self.eos:
                self.finish_reason = "eos"
            elif self.remaining <= 0:
                self.finish_reason = "length"


class Engine:
    """Runs generations for one drafter + verifier pair under a policy."""

    def __init__(self, drafter: Drafter, verifier: Verifier | None):
        self.drafter = drafter
        self.verifier = verifier
        self.fingerprint = vocab_fingerprint(drafter.vocab_tokens)
        self.session: SessionOpened | None = None   # kept across generations: its KV cache is reused
        self.max_draft = 64
        self.max_context = drafter.max_context

    # -- one generation ---------------------------------------------------------
    def run(self, prompt: list[int], policy: Policy, max_new_tokens: int,
            stop: Sequence[str] = (), stats: GenerationStats | None = None) -> Iterator[TokenEvent]:
        stats = stats or GenerationStats(mode=policy.name)
        stats.prompt_tokens = len(prompt)
        t0 = time.perf_counter()
        if policy.uses_cloud and self.session is None:
            self._open_session(stats)
        room = self.max_context - len(prompt)
        if room < 1 or not prompt:
            raise PromptTooLongError(f"a prompt of {len(prompt)} tokens leaves no room in a context of "
                                     f"{self.max_context} tokens" if prompt else "the prompt has no tokens")
        out = _Output(prompt, min(max_new_tokens, room), self.drafter.eos_token_ids,
                      TextAssembler(self.drafter.token_bytes, stop))
        synced = 0  # committed tokens the verifier holds
        while not out.finish_reason:
            # 1. Draft until the policy triggers verification, EOS, or the round's cap.
            #    Every NAV round commits accepted + 1 tokens, hence remaining - 1.
            cap = min(policy.max_draft(), self.max_draft, out.remaining - (1 if policy.uses_cloud else 0))
            draft = self._draft(out.tokens, cap, policy, stats) if policy.uses_draft and cap > 0 else []
            if not policy.uses_cloud:
                committed, verified = [d.token for d in draft], False
            else:
                # 2. NAV: the cloud verifies the draft (sending the committed tail it lacks).
                resp = self._verify(out.tokens, synced, [d.token for d in draft], stats)
                committed, verified = [d.token for d in draft[: resp.accepted]] + [resp.token], True
                synced = resp.committed_len
                self._count_round(stats, len(draft), resp.accepted)
                policy.on_round(len(draft), resp.accepted)
            # 3. Commit. The drafter rolls back to the new committed sequence next round.
            if not committed:  # the drafter cannot go further (its context is full)
                out.finish_reason = "context"
            for event in out.commit(committed, verified):
                if stats.output_tokens == 0:
                    stats.ttft_s = time.perf_counter() - t0
                stats.output_tokens += 1
                yield event
        tail = out.text.finish()
        if tail:
            yield TokenEvent(None, tail, policy.uses_cloud)
        stats.total_s = time.perf_counter() - t0
        stats.finish_reason = out.finish_reason

    def _draft(self, tokens: list[int], cap: int, policy: Policy, stats: GenerationStats) -> list[DraftToken]:
        t = time.perf_counter()
        self.drafter.set_context(tokens)
        cap = min(cap, self.drafter.max_context - len(tokens))
        draft: list[DraftToken] = []
        while len(draft) < cap:
            d = self.drafter.next_token()
            draft.append(d)
            if d.token in self.drafter.eos_token_ids or policy.should_verify(draft):
                break
        stats.draft_s += time.perf_counter() - t
        return draft

    def _verify(self, tokens: list[int], synced: int, draft: list[int], stats: GenerationStats) -> VerifyResponse:
        """One NAV round; a verifier that lost or disagrees with our prefix gets it resent once."""
        for attempt in range(2):
            up, down = self.verifier.bytes_sent, self.verifier.bytes_received
            t = time.perf_counter()
            try:
                resp = self.verifier.verify(VerifyRequest(synced, tuple(tokens[synced:]), tuple(draft),
                                                          prefix_hash(tokens[:synced]) if synced else b""))
            except VerifierError as exc:
                if attempt or exc.code not in ("resync", "unknown_session"):
                    raise
                stats.resyncs += 1
                if exc.code == "unknown_session":
                    self._open_session(stats)
                synced = 0
                continue
            finally:
                stats.bytes_up += self.verifier.bytes_sent - up
                stats.bytes_down += self.verifier.bytes_received - down
            stats.verify_s += resp.verify_ms / 1e3
            stats.network_s += max(0.0, time.perf_counter() - t - resp.verify_ms / 1e3)
            return resp
        raise AssertionError("unreachable")

    def _open_session(self, stats: GenerationStats) -> None:
        up, down = self.verifier.bytes_sent, self.verifier.bytes_received
        t = time.perf_counter()
        opened = self.verifier.open_session(OpenSession(self.fingerprint, self.drafter.vocab_size))
        stats.network_s += time.perf_counter() - t
        stats.bytes_up += self.verifier.bytes_sent - up
        stats.bytes_down += self.verifier.bytes_received - down
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
