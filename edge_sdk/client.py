"""The public entry point an app embeds: ``EdgeClient``.

>>> from edge_sdk import EdgeClient
>>> with EdgeClient(verifier_url="http://127.0.0.1:8000", verifier_key=KEY, mode="vanilla", draft_k=4) as client:
...     result = client.generate("def fibonacci(n):", max_new_tokens=64)
...     print(result.text, result.stats.summary())
"""

from __future__ import annotations

import functools
import math
import numbers
import secrets
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from privacy import SamplingParams

from .chat import ChatTemplate
from .drafter import DRAFT_BACKENDS, Drafter, load_drafter
from .engine import Decoding, Engine, GenerationResult, TokenEvent
from .errors import ConfigError
from .offline import OFFLINE_POLICIES
from .policies import EdgeOnly, Policy, make_policy
from .session import CloudSession
from .stats import GenerationStats
from .transport import HttpVerifier, Verifier


def resolve_draft_model(pair: str = "embedded", draft_model: str | Path | None = None,
                        backend: str = "llamacpp") -> Path:
    from pipesd_models import PairUnavailable, pair_draft

    if backend not in DRAFT_BACKENDS:
        raise ConfigError(f"unknown draft backend {backend!r}; choose from {', '.join(DRAFT_BACKENDS)}")
    if draft_model is not None:
        path = Path(draft_model)
    else:
        try:
            path = pair_draft(pair, backend)
        except PairUnavailable as exc:
            raise ConfigError(str(exc)) from None
    if not path.is_file():
        raise ConfigError(f"draft model file not found: {path}")
    return path


class Generation:
    """A generation in progress: iterate it for ``TokenEvent``s; ``result`` once it is done."""

    def __init__(self, decoding: Decoding, prompt: list[int]):
        self._events, self._prompt = iter(decoding), prompt    # one run: iterating again continues it
        self.stats: GenerationStats = decoding.stats
        self._seen: list[TokenEvent] = []
        self._done = False

    def __iter__(self) -> Iterator[TokenEvent]:
        for event in self._events:
            self._seen.append(event)
            yield event
        self._done = True

    def close(self) -> None:
        """Stop the generation now (an app's user went away): the round in flight is abandoned, its
        uploads stop, and the client is free for the next request. ``stats`` keeps what was done."""
        self._events.close()
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
        pair: named model pair whose draft to run ("embedded", the default, or "smollm2").
        draft_model: path of a draft model instead of the pair's (GGUF, or .onnx with ``draft_backend="onnx"``).
        draft_backend: "llamacpp" (default, GGUF) or "onnx" (onnxruntime, a model exported by
            ``pipesd_models.build.onnx_export``; the embedded pair ships one).
        mode: the decoding policy, by name -- "pipesd" (default: the round controller, which prices
            every round from the live link and a calibrated acceptance model, DP token batches,
            proactive drafting), "pipesd_bo" (the paper's dual threshold tuned by BO), the baselines
            "vanilla" (fixed draft length), "hsl", "edgellm", the ablations "pipesd_*", or
            "cloud_only" / "edge_only" (see policies.py) -- or a ``Policy`` object of your own.
        objective: what PipeSD's controller minimises per output token: "latency" (default),
            "cloud_cost" (target compute) or "edge_energy" (modelled device joules).
        draft_k: draft length of the vanilla mode (default 4).
        r1, r2: fixed dual thresholds (C_n < r1 or P(d_n) < r2) of the paper's modes
            ("pipesd_bo", "pipesd_fixed", ...); ``r2`` is also HSL's threshold. A mode given a
            setting it has no use for is a ``ConfigError``.
        threads: draft compute threads (default: available cores, at most 4).
        n_ctx: draft context length (default: the model's trained context).
        verifier: a ``Verifier`` implementation to use instead of HTTP (an emulated link, an
            in-process verifier: ``pipesd_lab``).
        drafter: a ``Drafter`` to use instead of loading one.
        offline: what to do when the verifier is unreachable or a NAV overruns its deadline:
            "continue" (default: emit draft tokens marked unverified), "wait" (block up to
            ``offline_wait_s`` for the verifier, then continue), "verify_late" (emit unverified
            tokens, verify them once the verifier is back and revise the tail where the target
            disagrees), "fail" (raise ``VerifierUnavailable``: every token yielded is verified).
            See offline.py for each guarantee. A verifier that answers 429 overloaded is waited for
            (its ``Retry-After``, bounded and jittered) and retried; overload that outlasts the NAV
            deadline is handled as an overdue NAV (``OverloadTimeout`` under "fail"): no 429 reaches
            the app. After an outage a background prober watches for the verifier's return only while a
            cloud request is in progress: an idle client, or one running only ``private=True``
            requests, opens no connection at all; the next cloud request probes once at its start.
            See docs/offline.md.
        verbose: let llama.cpp print its own log lines (off: an app's stderr stays its own).
        nav_deadline_s: how long a NAV round may take before the verifier is declared gone
            (default: 8x what NAV has recently taken, at least 2 s).
    """

    def __init__(self, verifier_url: str | Sequence[str] | None = None, *, verifier_key: str | bytes | None = None,
                 psk: str | bytes | None = None, pair: str = "embedded", draft_model: str | Path | None = None,
                 draft_backend: str = "llamacpp", mode: str | Policy = "pipesd", draft_k: int | None = None,
                 r1: float | None = None, r2: float | None = None, objective: str | None = None,
                 threads: int | None = None,
                 n_ctx: int | None = None, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 local_only: bool = False, verifier: Verifier | None = None, drafter: Drafter | None = None,
                 offline: str = "continue", offline_wait_s: float = 5.0, nav_deadline_s: float | None = None,
                 verbose: bool = False):
        # Everything that can be checked is checked before a model loads or a socket opens.
        if isinstance(mode, Policy):
            if draft_k is not None or r1 is not None or r2 is not None or objective is not None:
                raise ConfigError("draft_k, r1, r2 and objective configure a mode given by name; "
                                  "build your Policy with them")
            self._mode, self._settings = None, {}
        else:
            self._mode, self._settings = mode, {"draft_k": draft_k, "r1": r1, "r2": r2, "objective": objective}
        self._policies: dict[tuple, Policy] = {}   # adaptive policies keep what they learn across requests
        default = mode if isinstance(mode, Policy) else self._make(mode, **self._settings)
        if offline not in OFFLINE_POLICIES:
            raise ConfigError(f"offline must be one of {', '.join(OFFLINE_POLICIES)}, not {offline!r}")
        if not (isinstance(offline_wait_s, (int, float)) and offline_wait_s >= 0):
            raise ConfigError(f"offline_wait_s must be >= 0 seconds, got {offline_wait_s!r}")
        if nav_deadline_s is not None and not (isinstance(nav_deadline_s, (int, float)) and nav_deadline_s > 0
                                               and math.isfinite(nav_deadline_s)):
            raise ConfigError(f"nav_deadline_s must be a positive number of seconds, got {nav_deadline_s!r}")
        self.local_only = local_only
        if local_only:
            verifier = None
        elif verifier is None and verifier_url:
            verifier = HttpVerifier(verifier_url, verifier_key=verifier_key, psk=psk,
                                    connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.verifier = verifier
        self.drafter = drafter if drafter is not None else load_drafter(
            resolve_draft_model(pair, draft_model, draft_backend), draft_backend, n_ctx=n_ctx, threads=threads,
            **({"verbose": verbose} if draft_backend == "llamacpp" else {}))
        cloud = None if verifier is None else CloudSession(verifier, self.drafter.vocab_tokens,
                                                           self.drafter.vocab_size, nav_deadline_s=nav_deadline_s)
        self.engine = Engine(self.drafter, cloud, offline=offline, offline_wait_s=offline_wait_s)
        self._default = default

    def _make(self, mode: str, **settings) -> Policy:
        try:
            key = (mode, *sorted(settings.items()))
            known = self._policies.get(key)
        except TypeError:            # unhashable: not a mode name or setting at all
            raise ConfigError(f"a mode is a name or a Policy and its settings numbers, not {mode!r} {settings}") \
                from None
        if known is None:
            known = self._policies[key] = make_policy(mode, **settings)
        return known

    def policy(self, mode: str | Policy | None = None, draft_k: int | None = None) -> Policy:
        """The policy a request with these arguments runs: the same object each time, so that what an
        adaptive policy learns (EdgeLLM's threshold, PipeSD's tuner and batch plan) carries over.

        The client's own settings (``draft_k``, ``r1``, ``r2``, ``objective``) belong to its mode: a request for
        another mode by name starts from that mode's defaults (plus its own ``draft_k``)."""
        if isinstance(mode, Policy):
            if draft_k is not None:
                raise ConfigError("draft_k configures a mode given by name, not a Policy object")
            return mode
        if mode is None and self._mode is None:          # the client runs a Policy object of the app's
            if draft_k is not None:
                raise ConfigError("this client runs a Policy object: draft_k cannot change it")
            return self._default
        if mode is None or mode == self._mode:
            if draft_k is None or draft_k == self._settings["draft_k"]:
                return self._default
            return self._make(self._mode, **{**self._settings, "draft_k": draft_k})
        return self._make(mode, draft_k=draft_k)

    @property
    def is_offline(self) -> bool:
        """True while the verifier counts as gone (circuit breaker open): generations run on the device."""
        return self.engine.cloud is not None and self.engine.cloud.offline

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        """Token ids of a prompt (with BOS where the model wants one).

        ``parse_special`` turns control-token text (e.g. a chat template's <|im_start|>)
        into control tokens; leave it off for untrusted text.
        """
        return self.drafter.tokenize(text, add_bos=True, special=parse_special)

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 128, stop: str | Sequence[str] = (),
               mode: str | Policy | None = None, draft_k: int | None = None, parse_special: bool = False,
               private: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, timeline: bool = False) -> Generation:
        """Start a generation; iterate the result for tokens as they are committed.

        ``mode`` / ``draft_k`` choose this request's policy (``policy()`` says which object runs).
        ``private=True`` (or a client made with ``local_only=True``) keeps the request on the
        device: it runs edge_only and opens no connection, whatever the mode.

        Sampling: ``temperature`` > 0 samples from the target's distribution under that temperature,
        ``top_k`` (0: off) and ``top_p`` (1: off), exactly (speculative sampling: the draft's q goes
        up sparse and the verifier keeps or resamples each token). ``seed`` makes it reproducible:
        the same seed and policy give the same text. A seeded request runs ``policy.reproducible()``
        (an adaptive policy from its initial state; PipeSD's controller frozen at its current plan and
        acceptance model, which later unseeded requests may still move; ``mode="pipesd_fixed"`` with
        ``r1``/``r2`` fixes round boundaries for good) and teaches the client's policy nothing. Without a seed each request draws one.

        ``timeline=True`` records when drafting, uploads and NAV happened in ``stats.timeline``.
        """
        policy = EdgeOnly() if (private or self.local_only) else self.policy(mode, draft_k)
        if policy.uses_cloud and self.verifier is None:
            raise ConfigError(f"mode {policy.name!r} needs a verifier: pass verifier_url=...")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop must be a non-empty string or a sequence of them, got {stop!r}")
        ids = self._prompt_ids(prompt, parse_special)
        try:
            sampling = None if temperature == 0 else SamplingParams(
                float(temperature), int(top_k), float(top_p), secrets.randbits(63) if seed is None else int(seed))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad sampling parameters: {exc}") from None
        if sampling is None and (seed is not None or top_k or top_p != 1.0):
            warnings.warn("seed, top_k and top_p change nothing without temperature > 0: greedy decoding is "
                          "deterministic", UserWarning, stacklevel=2)
        if seed is not None:
            policy = policy.reproducible()
        decoding = self.engine.start(ids, policy, max_new_tokens=max_new_tokens, stop=stop, sampling=sampling,
                                     timeline=timeline)
        return Generation(decoding, ids)

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 128, stop: str | Sequence[str] = (),
                 mode: str | Policy | None = None, draft_k: int | None = None, parse_special: bool = False,
                 private: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, timeline: bool = False) -> GenerationResult:
        """Generate to the end and return text, token ids and statistics (the arguments of ``stream``)."""
        return self.stream(prompt, max_new_tokens=max_new_tokens, stop=stop, mode=mode, draft_k=draft_k,
                           parse_special=parse_special, private=private, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, timeline=timeline).result

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 128,
             stop: str | Sequence[str] = (), mode: str | Policy | None = None, draft_k: int | None = None,
             private: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, timeline: bool = False) -> GenerationResult:
        """Answer a conversation: `messages` (``{"role": "system" | "user" | "assistant", "content": str}``)
        rendered with the draft model's chat template (its GGUF's ``tokenizer.chat_template``; the
        embedded pair, trained on code, a plain ``User:`` / ``Assistant:`` transcript: ``chat.py``),
        then generated as ``generate`` does; the template's control tokens are parsed as such."""
        prompt = self.render_chat(messages)
        stop = [stop] if isinstance(stop, str) else list(stop)
        return self.generate(prompt, max_new_tokens=max_new_tokens, stop=[*stop, *self.chat_template.stop],
                             mode=mode, draft_k=draft_k, parse_special=True, private=private,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, timeline=timeline)

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        """The template ``chat`` renders with: the draft GGUF's own, else the plain transcript."""
        return ChatTemplate.for_drafter(self.drafter)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text ``chat`` would generate from (a ``ConfigError`` for malformed messages)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ConfigError(f"each message needs a string 'role' and 'content', got {m!r}")
        return self.chat_template.render([dict(m) for m in messages])

    def _prompt_ids(self, prompt: str | Sequence[int], parse_special: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, parse_special)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise ConfigError(f"a prompt is a string or a sequence of token ids, not {type(prompt).__name__}")
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < self.drafter.vocab_size for t in ids):
            raise ConfigError(f"prompt token ids must lie in [0, {self.drafter.vocab_size})")
        return ids

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
