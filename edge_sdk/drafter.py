"""Draft models on the device, behind one small protocol.

A drafter holds a token context. ``set_context`` moves it to a new committed
sequence (keeping the longest common prefix in the KV cache: that is the rollback),
``next_token`` proposes the next token with its confidence and appends it. The
engine never sees KV caches or logits.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from privacy.sampling import DRAFT_STREAM, SamplingParams, SparseDist, sample_index, truncate, uniforms

from .errors import ConfigError, ModelLoadError

# The draft's own truncation under sampling: q may be any distribution the draft really samples
# from (speculative sampling stays exact), so the edge keeps at most this many candidates per token
# whatever the request's top_k/top_p: q travels as ~6 bytes per candidate instead of the vocabulary.
DRAFT_SUPPORT = 64


@dataclass(frozen=True)
class DraftToken:
    """One drafted token and the draft model's confidence in it."""

    token: int
    p_max: float     # max probability of the draft's next-token distribution
    p_token: float   # probability of the chosen token (equals p_max when greedy)
    q: SparseDist | None = None   # sampling: the distribution the token was drawn from (sent for NAV)
    looked_up: bool = False       # a guess from ``lookup.LookupGuesser``, not from the draft model

    @property
    def confidence(self) -> float:
        """P(d_n) for the trigger: the max probability when greedy, the sampled token's probability
        when sampling. A sampled token can be a low-probability draw from a peaked q; its own
        probability, not the peak, says how likely the target is to keep it (acceptance is
        min(1, p(x)/q(x)), so low-q draws are where p and q tend to disagree)."""
        return self.p_token if self.q is not None else self.p_max


def choose_token(logits: np.ndarray, sampling: SamplingParams | None, position: int) -> DraftToken:
    """The draft's token after a logits row: argmax when greedy; else a draw from its truncated,
    tempered distribution q (at most ``DRAFT_SUPPORT`` candidates, float16 as it travels) with the
    uniform keyed by (seed, `position`), so a redrafted position draws the same number."""
    if sampling is None or sampling.greedy:
        token, p_max = softmax_confidence(logits)
        return DraftToken(token, p_max, p_max)
    top_k = min(sampling.top_k or DRAFT_SUPPORT, DRAFT_SUPPORT)
    ids, probs = truncate(logits, SamplingParams(sampling.temperature, top_k, sampling.top_p, sampling.seed))
    q = SparseDist.quantize(ids, probs)
    exact = q.probs()
    i = sample_index(exact, float(uniforms(sampling.seed, position, DRAFT_STREAM, 1)[0]))
    return DraftToken(int(q.ids[i]), float(exact.max()), float(exact[i]), q)


class DraftInterrupted(Exception):
    """``next_token`` gave up: ``interrupt`` was called before or while the token was drafted. No token
    comes of the call, and the context is undefined until the next ``set_context``."""


class Drafter(Protocol):
    vocab_size: int
    vocab_tokens: list[str]
    eos_token_ids: frozenset[int]
    max_context: int
    threads: int

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`; `special` parses control-token text such as <|im_start|>."""

    def token_bytes(self, token: int) -> bytes: ...

    def set_context(self, tokens: Sequence[int]) -> None:
        """Make `tokens` the context, reusing the cached common prefix (rollback)."""

    def set_sampling(self, sampling: SamplingParams | None) -> None:
        """Greedy (None or temperature 0) or sampled drafting from now on (``choose_token``)."""

    def next_token(self) -> DraftToken:
        """Next token after the context (greedy or sampled); appended to the context. Raises
        ``DraftInterrupted`` after ``interrupt``."""

    def interrupt(self, on: bool = True) -> None:
        """From another thread: give up the token being drafted (or the next one) as soon as possible,
        because it is no longer wanted; ``interrupt(False)`` withdraws an interrupt not yet acted on.
        The engine calls ``interrupt(False)`` on its own thread before drafting anything it may
        interrupt: a backend that needs to set something up does it then."""

    def __len__(self) -> int: ...


def softmax_confidence(logits: np.ndarray) -> tuple[int, float]:
    """(argmax, max probability) of a logits row, computed stably."""
    best = int(logits.argmax())
    p_max = 1.0 / float(np.exp(logits - logits[best]).sum())
    return best, p_max


def _piece(llama_cpp, vocab, token: int) -> bytes:
    """The bytes a token stands for (control tokens such as EOS render as nothing)."""
    import ctypes

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


class _LogitsDrafter:
    """What every drafter shares once it can give the logits row after its context (``_logits``):
    the token choice (greedy or sampled, ``choose_token``) and the context bookkeeping."""

    _tokens: list[int]
    max_context: int
    sampling: SamplingParams | None = None

    def __len__(self) -> int:
        return len(self._tokens)

    def set_sampling(self, sampling: SamplingParams | None) -> None:
        self.sampling = sampling

    def _logits(self) -> np.ndarray:
        raise NotImplementedError

    _stop: threading.Event | None = None

    def interrupt(self, on: bool = True) -> None:
        """Give up the next token (between tokens; a backend that can stop a token midway overrides it)."""
        if self._stop is None:
            self._stop = threading.Event()
        self._stop.set() if on else self._stop.clear()

    def _interrupted(self) -> None:
        if self._stop is not None and self._stop.is_set():
            self._stop.clear()
            raise DraftInterrupted("the token was no longer wanted")

    def next_token(self) -> DraftToken:
        if not self._tokens:
            raise ValueError("the draft context is empty: a prompt needs at least one token")
        if len(self._tokens) >= self.max_context:
            raise ValueError(f"the draft's context of {self.max_context} tokens is full")
        self._interrupted()
        d = choose_token(self._logits(), self.sampling, len(self._tokens))
        self._tokens.append(d.token)
        return d


_LOAD_LOCK = threading.Lock()
_QUIET_LOG = None     # llama.cpp's log callback while it is silenced (kept referenced: C holds a pointer)


def quiet_llama_cpp(llama_cpp) -> None:
    """Send llama.cpp's own log lines nowhere, process-wide (``verbose=True`` drafters leave it on).

    llama-cpp-python's ``verbose=False`` still lets warnings through: every load of our GGUFs printed
    "n_ctx_seq (...) > n_ctx_train (0)" (a key llama.cpp reads under another name), and rollbacks
    "removing memory module entries". An app's stderr is its own."""
    global _QUIET_LOG
    if _QUIET_LOG is None:
        import ctypes

        _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))


class LlamaCppDrafter(_LogitsDrafter):
    """llama-cpp-python drafter: ``logits_all=False``, last row read with ``llama_get_logits_ith``.

    The logical context may run one token ahead of what llama.cpp has evaluated (the
    newest drafted token is only evaluated when the next one is asked for), so a round
    of k drafted tokens costs k - 1 evaluations plus the resync after NAV.
    """

    def __init__(self, model_path: str | Path, *, n_ctx: int | None = None, threads: int | None = None,
                 verbose: bool = False):
        import llama_cpp
        from llama_cpp import Llama

        self._llama_cpp = llama_cpp
        self.threads = threads or min(4, len(os.sched_getaffinity(0)))
        if not verbose:
            quiet_llama_cpp(llama_cpp)
        # verbose=False makes llama-cpp-python silence the model load by swapping the process's fds 1
        # and 2 (dup2): two loads at once in different threads can leave stdout on /dev/null for good.
        with _LOAD_LOCK:
            try:
                meta = Llama(model_path=str(model_path), vocab_only=True, n_ctx=64, verbose=False).metadata
                trained = int(meta[f"{meta['general.architecture']}.context_length"])
                self.max_context = min(n_ctx or trained, trained)
                self.llm = Llama(model_path=str(model_path), n_ctx=self.max_context,
                                 n_batch=min(512, self.max_context), logits_all=False, n_threads=self.threads,
                                 n_threads_batch=self.threads, verbose=verbose)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ModelLoadError(f"cannot load the draft model {model_path}: not a GGUF llama.cpp can read "
                                     f"({exc})") from None
        self.metadata: dict[str, str] = dict(self.llm.metadata)   # GGUF keys: chat template, token ids...
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.vocab_size = self.llm.n_vocab()
        self.vocab_tokens = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace")
                             for i in range(self.vocab_size)]
        self.eos_token_ids = frozenset(i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self._pieces = [_piece(llama_cpp, vocab, i) for i in range(self.vocab_size)]
        # Warm up: llama.cpp allocates its compute buffers on the first decode (hundreds of ms),
        # which would otherwise land in the first request's time to first token.
        self.llm.eval([0])
        self.llm.n_tokens = 0
        self._tokens: list[int] = []      # logical context
        self._logits_at = -1              # context length the current logits row belongs to
        self._abort = None                # llama.cpp's abort callback, installed by the first interrupt

    def interrupt(self, on: bool = True) -> None:
        """Stop the token being drafted midway: llama.cpp checks an abort callback between the nodes of
        its graph. The callback is installed by the first ``interrupt(False)`` -- which the engine calls
        on its own thread before it drafts anything it may interrupt, so the context is never changed
        under a running decode -- and costs a few percent of drafting speed, which a draft too fast to be
        worth interrupting never pays."""
        super().interrupt(on)
        if self._abort is None and not on:
            stop = self._stop
            self._abort = self._llama_cpp.ggml_abort_callback(lambda _data: stop.is_set())
            self._llama_cpp.llama_set_abort_callback(self.llm.ctx, self._abort, None)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token]

    def set_context(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.max_context:
            raise ValueError(f"context of {len(tokens)} tokens exceeds the draft's {self.max_context}")
        evaluated = self.llm.n_tokens
        n = min(evaluated, len(tokens))
        same = np.asarray(self.llm.input_ids[:n]) == np.asarray(tokens[:n], dtype=np.intc)
        keep = n if same.all() else int(np.argmin(same))
        if keep < evaluated:
            self.llm.n_tokens = keep   # llama-cpp-python removes the tail from the KV cache on the next eval
            self._logits_at = -1       # the logits row belonged to the removed tail
        self._tokens = list(tokens)

    def _logits(self) -> np.ndarray:
        """Logits after the whole logical context, evaluating what is missing."""
        n = len(self._tokens)
        if self._logits_at != n:
            start = self.llm.n_tokens
            if start >= n:                # all cached, but the logits row is stale: redo the last token
                start = n - 1
                self.llm.n_tokens = start
            try:
                self.llm.eval(self._tokens[start:n])
            except RuntimeError:
                if self._stop is not None and self._stop.is_set():    # aborted: llama.cpp keeps what it had
                    self._interrupted()
                raise
            self._logits_at = n
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (byte-level BPE token text -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class OnnxDrafter(_LogitsDrafter):
    """onnxruntime drafter for a model exported by ``pipesd_models.build.onnx_export`` (explicit KV
    cache tensors), with the byte-level BPE tokenizer from ``tokenizer.json`` (HF ``tokenizers``).

    Same contract as ``LlamaCppDrafter``: the KV cache keeps the longest common prefix on
    ``set_context`` (rollback is slicing the cache tensors), the newest token is evaluated when the
    next one is asked for, confidences and sampling come from ``choose_token``.
    """

    def __init__(self, model_path: str | Path, *, tokenizer_path: str | Path | None = None,
                 n_ctx: int | None = None, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.threads = threads or min(4, len(os.sched_getaffinity(0)))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:     # onnxruntime raises its own (Fail, InvalidProtobuf, ...) types
            raise ModelLoadError(f"cannot load the draft model {model_path}: not an ONNX model onnxruntime "
                                 f"can run ({str(exc).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        try:
            self.vocab_size = int(meta["vocab_size"])
            trained = int(meta["max_context"])
            self._bos = int(meta["bos"])
            self.eos_token_ids = frozenset(int(t) for t in json.loads(meta["eos"]))
            self._shape = (int(meta["layers"]), int(meta["kv_heads"]), 0, int(meta["head_dim"]))
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(f"{model_path} lacks the metadata of pipesd_models.build.onnx_export: {exc}") from None
        self.max_context = min(n_ctx or trained, trained)
        if tokenizer_path is None:
            tokenizer_path = Path(model_path).with_name("tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if self.tokenizer.get_vocab_size() != self.vocab_size:
            raise ValueError(f"{tokenizer_path} has {self.tokenizer.get_vocab_size()} tokens, the model {self.vocab_size}")
        self.vocab_tokens = [self.tokenizer.id_to_token(i) for i in range(self.vocab_size)]
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        decode = _byte_decoder()
        self._pieces = [b"" if tok in special else bytes(decode[c] for c in tok) for tok in self.vocab_tokens]
        self._tokens: list[int] = []
        self._kv_tokens: list[int] = []           # tokens whose keys/values are in the cache
        self._keys = self._values = np.zeros(self._shape, np.float32)
        self._row: np.ndarray | None = None
        self._logits_at = -1

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        self.tokenizer.encode_special_tokens = not special   # special=False: "<|endoftext|>" is plain text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self._bos] if add_bos else []) + ids

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token]

    def set_context(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.max_context:
            raise ValueError(f"context of {len(tokens)} tokens exceeds the draft's {self.max_context}")
        n = min(len(self._kv_tokens), len(tokens))
        same = np.asarray(self._kv_tokens[:n]) == np.asarray(tokens[:n])
        keep = n if same.all() else int(np.argmin(same))
        if keep < len(self._kv_tokens):
            self._crop(keep)
        self._tokens = list(tokens)

    def _crop(self, length: int) -> None:
        """Rollback: the cache keeps its first `length` positions."""
        self._keys, self._values = self._keys[:, :, :length], self._values[:, :, :length]
        del self._kv_tokens[length:]
        self._logits_at = -1

    def _logits(self) -> np.ndarray:
        n = len(self._tokens)
        if self._logits_at != n:
            if len(self._kv_tokens) >= n:         # all cached but the row is stale: rerun the last token
                self._crop(n - 1)
            start = len(self._kv_tokens)
            logits, self._keys, self._values = self.session.run(None, {
                "input_ids": np.asarray([self._tokens[start:n]], dtype=np.int64),
                "past_keys": np.ascontiguousarray(self._keys), "past_values": np.ascontiguousarray(self._values)})
            self._kv_tokens = list(self._tokens[:n])
            self._row, self._logits_at = logits[0, -1], n
        return self._row


DRAFT_BACKENDS = ("llamacpp", "onnx")


def load_drafter(path: str | Path, backend: str = "llamacpp", **kwargs) -> Drafter:
    """A drafter for `path` on `backend` ("llamacpp": a GGUF; "onnx": an exported .onnx)."""
    if backend == "llamacpp":
        return LlamaCppDrafter(path, **kwargs)
    if backend == "onnx":
        return OnnxDrafter(path, **kwargs)
    raise ConfigError(f"unknown draft backend {backend!r}; choose from {', '.join(DRAFT_BACKENDS)}")
