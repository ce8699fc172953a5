"""The public entry point an app embeds: ``EdgeClient``.

>>> from edge_sdk import EdgeClient
>>> with EdgeClient(verifier_url="http://127.0.0.1:8000", mode="vanilla", draft_k=4) as client:
...     result = client.generate("def fibonacci(n):", max_new_tokens=64)
...     print(result.text, result.stats.summary())
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Iterator, Sequence

from privacy import SamplingParams

from .drafter import DRAFT_BACKENDS, Drafter, load_drafter
from .engine import Engine, GenerationResult, TokenEvent
from .errors import ConfigError
from .policies import MODES, Policy, make_policy
from .stats import GenerationStats
from .emulation import EmulatedLink, LinkProfile
from .offline import OFFLINE_POLICIES
from .transport import HttpVerifier, Verifier


def resolve_draft_model(pair: str = "embedded", draft_model: str | Path | None = None,
                        backend: str = "llamacpp") -> Path:
    from pipesd_models import PairUnavailable, pair_paths

    if backend not in DRAFT_BACKENDS:
        raise ConfigError(f"unknown draft backend {backend!r}; choose from {', '.join(DRAFT_BACKENDS)}")
    if draft_model is not None:
        path = Path(draft_model)
    else:
        try:
            path = pair_paths(pair, backend)[0]
        except PairUnavailable as exc:
            raise ConfigError(str(exc)) from None
    if not path.is_file():
        raise ConfigError(f"draft model file not found: {path}")
    return path


class Generation:
    """A generation in progress: iterate it for ``TokenEvent``s; ``result`` once it is done."""

    def __init__(self, events: Iterator[TokenEvent], prompt: list[int], stats: GenerationStats):
        self._events, self._prompt, self.stats = events, prompt, stats
        self._seen: list[TokenEvent] = []
        self._done = False

    def __iter__(self) -> Iterator[TokenEvent]:
        for event in self._events:
            self._seen.append(event)
            yield event
        self._done = True

    @property
    def result(self) -> GenerationResult:
        if not self._done:
            for _ in self:
                pass
        tokens, text = [], ""
        for e in self._seen:
            if e.revise_from is not None:        # verify_late: the target replaced an unverified tail
                del tokens[e.revise_from:]
                text = text[: e.revise_text_from]
            if e.token is not None:
                tokens.append(e.token)
            text += e.text
        return GenerationResult(text, tokens, self._prompt, self.stats, self._seen)


class EdgeClient:
    """Generate text on the device with a draft model, verified by a cloud target.

    Args:
        verifier_url: base URL of a ``pipesd-verifier`` (or a list of replica URLs to fail over
            across); needed by every mode but ``edge_only``.
        verifier_key: the verifier's public key (base64, printed by ``pipesd-verifier``), pinned:
            a verifier without the matching private key fails the handshake.
        psk: a pre-shared key (>= 32 bytes) instead of a pinned public key.
        local_only: never contact the cloud: every request runs on the device (edge_only).
        link: an emulated link (``LinkProfile``) between this client and the verifier, for
            experiments on loopback: bandwidth, RTT, per-token payload, jitter, loss, traces (see emulation.py).
        pair: named model pair whose draft to run ("embedded", the default, or "smollm2").
        draft_model: path of a draft model instead of the pair's (GGUF, or .onnx with ``draft_backend="onnx"``).
        draft_backend: "llamacpp" (default, GGUF) or "onnx" (onnxruntime, a model exported by
            ``pipesd_models.build.onnx_export``; the embedded pair ships one).
        mode: the decoding policy: "pipesd" (default: dual-threshold trigger tuned online, DP token
            batches, proactive drafting), the baselines "vanilla" (fixed draft length), "hsl",
            "edgellm", the ablations "pipesd_*", or "cloud_only" / "edge_only" (see policies.py).
        draft_k: draft length of the vanilla mode.
        r1, r2: fixed dual thresholds (C_n < r1 or P(d_n) < r2) instead of online tuning.
        threads: draft compute threads (default: available cores, at most 4).
        n_ctx: draft context length (default: the model's trained context).
        verifier: a ``Verifier`` implementation to use instead of HTTP (tests, emulated links).
        offline: what to do when the verifier is unreachable or a NAV overruns its deadline:
            "continue" (default: emit draft tokens marked unverified), "wait" (block up to
            ``offline_wait_s`` for the verifier, then continue), "verify_late" (emit unverified
            tokens, verify them once the verifier is back and revise the tail where the target
            disagrees). See offline.py for each guarantee.
        nav_deadline_s: how long a NAV round may take before the verifier is declared gone
            (default: 8x what NAV has recently taken, at least 2 s).
    """

    def __init__(self, verifier_url: str | Sequence[str] | None = None, *, verifier_key: str | bytes | None = None,
                 psk: str | bytes | None = None, pair: str = "embedded", draft_model: str | Path | None = None,
                 mode: str = "pipesd", draft_k: int = 4, r1: float | None = None, r2: float | None = None,
                 threads: int | None = None, n_ctx: int | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0, local_only: bool = False,
                 link: LinkProfile | None = None, verifier: Verifier | None = None, drafter: Drafter | None = None,
                 offline: str = "continue", offline_wait_s: float = 5.0, nav_deadline_s: float | None = None,
                 draft_backend: str = "llamacpp"):
        make_policy(mode, draft_k, r1, r2)  # validate early
        if offline not in OFFLINE_POLICIES:
            raise ConfigError(f"offline must be one of {', '.join(OFFLINE_POLICIES)}, not {offline!r}")
        if offline_wait_s < 0 or (nav_deadline_s is not None and nav_deadline_s <= 0):
            raise ConfigError("offline_wait_s must be >= 0 and nav_deadline_s > 0")
        self.mode, self.draft_k, self.r1, self.r2, self.local_only = mode, draft_k, r1, r2, local_only
        self._policies: dict[tuple, Policy] = {}   # adaptive policies keep what they learn across requests
        if verifier is None and verifier_url and not local_only:
            verifier = HttpVerifier(verifier_url, verifier_key=verifier_key, psk=psk,
                                    connect_timeout=connect_timeout, read_timeout=read_timeout)
        if verifier is not None and link is not None:
            verifier = EmulatedLink(verifier, link)
        self.verifier = None if local_only else verifier
        self.drafter = drafter if drafter is not None else load_drafter(
            resolve_draft_model(pair, draft_model, draft_backend), draft_backend, n_ctx=n_ctx, threads=threads)
        self.engine = Engine(self.drafter, verifier)
        self.engine.offline, self.engine.offline_wait_s = offline, offline_wait_s
        self.engine.nav_deadline_s = nav_deadline_s

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        """Token ids of a prompt (with BOS where the model wants one).

        ``parse_special`` turns control-token text (e.g. a chat template's <|im_start|>)
        into control tokens; leave it off for untrusted text.
        """
        return self.drafter.tokenize(text, add_bos=True, special=parse_special)

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 128, stop: Sequence[str] = (),
               mode: str | None = None, draft_k: int | None = None, parse_special: bool = False,
               private: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None) -> Generation:
        """Start a generation; iterate the result for tokens as they are committed.

        ``private=True`` (or a client made with ``local_only=True``) keeps the request on the
        device: it runs edge_only and opens no connection, whatever the mode.

        Sampling: ``temperature`` > 0 samples from the target's distribution under that temperature,
        ``top_k`` (0: off) and ``top_p`` (1: off), exactly (speculative sampling: the draft's q goes
        up sparse and the verifier keeps or resamples each token). ``seed`` makes it reproducible:
        the same seed and policy give the same text. A seeded request runs an adaptive policy from its
        initial state and PipeSD at the tuner's settled thresholds (pass ``r1``/``r2`` to fix them),
        and changes neither. Without a seed each request draws one.
        """
        mode = "edge_only" if (private or self.local_only) else (mode or self.mode)
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        key = (mode, draft_k or self.draft_k, self.r1, self.r2)
        if key not in self._policies:
            self._policies[key] = make_policy(*key)
        # A seeded request starts from the policy's initial state (an adaptive trigger's threshold
        # would otherwise carry the history of earlier requests) and teaches it nothing.
        policy = make_policy(*key) if seed is not None else self._policies[key]
        if policy.uses_cloud and self.verifier is None:
            raise ConfigError(f"mode {mode!r} needs a verifier: pass verifier_url=...")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if isinstance(stop, str):
            stop = [stop]
        ids = self.tokenize(prompt, parse_special) if isinstance(prompt, str) else [int(t) for t in prompt]
        if any(not 0 <= t < self.drafter.vocab_size for t in ids):
            raise ConfigError(f"prompt token ids must lie in [0, {self.drafter.vocab_size})")
        try:
            sampling = None if temperature == 0 else SamplingParams(
                float(temperature), int(top_k), float(top_p), secrets.randbits(63) if seed is None else int(seed))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad sampling parameters: {exc}") from None
        stats = GenerationStats(mode=policy.name)
        return Generation(self.engine.run(ids, policy, max_new_tokens, stop, stats, sampling=sampling,
                                          seeded=seed is not None), ids, stats)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
        """Generate to the end and return text, token ids and statistics (same arguments as ``stream``)."""
        return self.stream(prompt, **kwargs).result

    def close(self) -> None:
        self.engine.close()
        if self.verifier is not None:
            self.verifier.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
