"""What the fast engine tests share: the toy model pair, an in-process verifier, an engine on top.

No model file, no server: ``pipesd_lab.toy`` is a real (tiny, deterministic) implementation of
both model protocols and ``pipesd_lab.inprocess`` runs the real verifier service behind the edge's
``Verifier`` protocol, so what these tests check is the engine's logic and the service's, end to end.
"""

from __future__ import annotations

from cloud_verifier.target import PaddedTarget
from edge_sdk.client import Generation
from edge_sdk.engine import Engine
from edge_sdk.offline import CircuitBreaker
from edge_sdk.policies import make_policy
from edge_sdk.session import CloudSession
from pipesd_lab.inprocess import InProcessVerifier
from pipesd_lab.toy import ToyDrafter, ToyTarget, toy_pair

TARGET, DRAFT = toy_pair()
PROMPTS = [TARGET.tokenize(text) for text in ("hello", "abc", "The toy", "x = 1;", "zz", "q", "pipeline", "0123")]
SPECULATIVE = ("pipesd", "vanilla", "hsl", "edgellm", "pipesd_model", "pipesd_bo", "pipesd_fixed", "pipesd_per_token",
               "pipesd_at_trigger", "pipesd_c_only", "pipesd_p_only", "pipesd_no_proactive", "tree", "pipesd_tree",
               "pipesd_chain")


def reference(prompt: list[int], n: int) -> list[int]:
    """The target's own greedy decoding, computed directly from the toy language."""
    return TARGET.greedy(prompt, n)


class Rig:
    """An engine on the toy drafter, talking to an in-process verifier on the toy target."""

    def __init__(self, *, latency_s: float = 0.0, offline: str = "continue", offline_wait_s: float = 5.0,
                 nav_deadline_s: float | None = None, draft_seconds: float = 0.0, settings=None, draft=DRAFT,
                 pass_s: float = 0.0):
        # pass_s: every target pass takes at least that long (a real target's pass, emulated)
        self.target = PaddedTarget(ToyTarget(TARGET), pass_s) if pass_s else ToyTarget(TARGET)
        self.verifier = InProcessVerifier(self.target, settings, latency_s=latency_s)
        self.drafter = ToyDrafter(draft, seconds_per_token=draft_seconds)
        # Probes every few ms, so that coming back online takes milliseconds here.
        breaker = CircuitBreaker(base_delay_s=0.002, max_delay_s=0.01)
        self.cloud = CloudSession(self.verifier, self.drafter.vocab_tokens, self.drafter.vocab_size,
                                  nav_deadline_s=nav_deadline_s, breaker=breaker)
        self.engine = Engine(self.drafter, self.cloud, offline=offline, offline_wait_s=offline_wait_s)
        self.policies: dict[str, object] = {}

    def policy(self, mode: str, **settings):
        key = (mode, tuple(sorted(settings.items())))
        if key not in self.policies:
            self.policies[key] = make_policy(mode, **settings)
        return self.policies[key]

    def stream(self, prompt: list[int], mode: str = "pipesd_fixed", n: int = 40, policy=None, **kw) -> Generation:
        decoding = self.engine.start(prompt, policy or self.policy(mode), max_new_tokens=n, **kw)
        return Generation(decoding, prompt)

    def generate(self, prompt: list[int], mode: str = "pipesd_fixed", n: int = 40, **kw):
        return self.stream(prompt, mode, n, **kw).result

    def generate_through_outage(self, prompt: list[int], mode: str, n: int, *, down_after: int = 0,
                                up_after_unverified: int):
        """Generate while the verifier goes down after `down_after` output tokens (0: before the start)
        and comes back once `up_after_unverified` tokens have gone out unverified."""
        if down_after == 0:
            self.verifier.set_down()
        gen = self.stream(prompt, mode, n)
        seen = unverified = 0
        for event in gen:
            seen += 1
            unverified += not event.verified
            if seen == down_after:
                self.verifier.set_down()
            if unverified == up_after_unverified:
                self.verifier.set_down(False)
        return gen.result

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
