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
    alt: int | None = None        # greedy: the draft's runner-up at this position (a branch of a chain, trees.py)
    p_alt: float = 0.0            # ... and its probability

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
        alt = _runner_up(logits, token)
        return DraftToken(token, p_max, p_max, alt=alt, p_alt=p_max * float(np.exp(logits[alt] - logits[token])))
    top_k = min(sampling.top_k or DRAFT_SUPPORT, DRAFT_SUPPORT)
    ids, probs = truncate(logits, SamplingParams(sampling.temperature, top_k, sampling.top_p, sampling.seed))
    q = SparseDist.quantize(ids, probs)
    exact = q.probs()
    i = sample_index(exact, float(uniforms(sampling.seed, position, DRAFT_STREAM, 1)[0]))
    return DraftToken(int(q.ids[i]), float(exact.max()), float(exact[i]), q)


class TreeFull(ValueError):
    """A token tree's drafter has no room for more branches: the tree stops growing (its candidates may
    still join it as leaves)."""


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


def _runner_up(logits: np.ndarray, best: int) -> int:
    """The second-likeliest token of a row (its likeliest being `best`): a second argmax with `best` masked
    for a moment (an argpartition of a 152k vocabulary costs ~0.4 ms a token; this, a tenth)."""
    row = logits if logits.flags.writeable else logits.copy()
    top = row[best]
    row[best] = -np.inf
    try:
        return int(row.argmax())
    finally:
        row[best] = top


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

    def tree(self, chain: int = 0) -> "SequentialTree":
        """Start a token tree after the current context, grown one node at a time (``SequentialTree``);
        the llama.cpp drafter grows a level in one decode instead. `chain`: the context's last `chain`
        tokens are a chain already drafted -- they become the tree's first nodes (node i the i-th, each
        the parent of the next) and branches may grow off them."""
        return SequentialTree(self, chain)

    def next_token(self) -> DraftToken:
        if not self._tokens:
            raise ValueError("the draft context is empty: a prompt needs at least one token")
        if len(self._tokens) >= self.max_context:
            raise ValueError(f"the draft's context of {self.max_context} tokens is full")
        self._interrupted()
        d = choose_token(self._logits(), self.sampling, len(self._tokens))
        self._tokens.append(d.token)
        return d


class SequentialTree:
    """A token tree for any drafter that gives the logits after its context: each node's row comes from
    moving the context to the node's root path (``set_context`` keeps the common prefix cached, so a
    sibling costs its own token plus what its branch re-evaluates). The drafter's next ``set_context``
    ends it. Same calls as ``LlamaCppTree``."""

    def __init__(self, drafter: _LogitsDrafter, chain: int = 0):
        if not 0 <= chain < len(drafter._tokens):
            raise ValueError("a tree's chain is part of the context, after at least one token")
        self.drafter = drafter
        self.context = list(drafter._tokens[: len(drafter._tokens) - chain])
        self.root = drafter._logits().copy() if not chain else None
        self.tokens: list[int] = list(drafter._tokens[len(self.context):])
        self.parents: list[int] = list(range(-1, chain - 1))

    def grow(self, parents: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
        if len(tokens) != len(parents) or not tokens:
            raise ValueError("grow takes one parent per token, and at least one")
        rows = []
        for parent, token in zip(parents, tokens):
            if not -1 <= parent < len(self.tokens):
                raise ValueError(f"parent {parent} is not a node of the tree yet")
            self.tokens.append(int(token))
            self.parents.append(parent)
            self.drafter._interrupted()
            self.drafter.set_context(self.context + self._path_tokens(len(self.tokens) - 1))
            rows.append(self.drafter._logits().copy())
        return rows

    def _path_tokens(self, node: int) -> list[int]:
        return path_tokens(self.tokens, self.parents, node)


def root_path(parents: Sequence[int], node: int | None) -> list[int]:
    """Node indices from a tree's first level down to `node` (parents precede children; -1: the context;
    None: the empty path)."""
    path = []
    while node is not None and node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def path_tokens(tokens: Sequence[int], parents: Sequence[int], node: int) -> list[int]:
    """The tokens from a tree's first level down to `node`."""
    return [tokens[i] for i in root_path(parents, node)]


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
    """A GGUF draft on llama.cpp's own API: one context whose KV cache keeps the committed prefix (sequence
    0) and, while a token tree is drafted (``tree``), the tree's branches as further sequences sharing it.

    The logical context may run one token ahead of what llama.cpp has evaluated (the newest drafted
    token is only evaluated when the next one is asked for), so a round of k drafted tokens costs
    k - 1 evaluations plus the resync after NAV. Tokenizing, the GGUF metadata and token pieces come
    from a vocabulary-only ``llama_cpp.Llama``.
    """

    TREE_SEQUENCES = 16      # llama.cpp sequences: a token tree expands at most this many branches (its
                             # unexpanded leaves need none)

    def __init__(self, model_path: str | Path, *, n_ctx: int | None = None, threads: int | None = None,
                 verbose: bool = False):
        import llama_cpp
        from llama_cpp import Llama

        self._lib = llama_cpp
        self._model = self._ctx = self._batch = None
        self.threads = threads or min(4, len(os.sched_getaffinity(0)))
        if not verbose:
            quiet_llama_cpp(llama_cpp)
        # verbose=False makes llama-cpp-python silence the model load by swapping the process's fds 1
        # and 2 (dup2): two loads at once in different threads can leave stdout on /dev/null for good.
        with _LOAD_LOCK:
            try:
                self._vocab_llm = Llama(model_path=str(model_path), vocab_only=True, n_ctx=64, verbose=False)
                meta = self._vocab_llm.metadata
                trained = int(meta[f"{meta['general.architecture']}.context_length"])
                self.max_context = min(n_ctx or trained, trained)
                self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                                   llama_cpp.llama_model_default_params())
                if not self._model:
                    raise ValueError("llama.cpp could not load the model")
                self.n_batch = min(512, self.max_context)
                params = llama_cpp.llama_context_default_params()
                params.n_ctx = self.max_context
                params.n_batch = params.n_ubatch = self.n_batch
                params.n_seq_max = self.TREE_SEQUENCES
                params.kv_unified = True          # one cache: a branch shares its prefix's cells, no copies
                params.n_threads = params.n_threads_batch = self.threads
                params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED    # as the Llama class's default
                params.no_perf = True
                self._ctx = llama_cpp.llama_init_from_model(self._model, params)
                if not self._ctx:
                    raise ValueError(f"llama.cpp could not create a context of {self.max_context} positions")
            except (ValueError, KeyError, RuntimeError) as exc:
                self.close()
                raise ModelLoadError(f"cannot load the draft model {model_path}: not a GGUF llama.cpp can read "
                                     f"({exc})") from None
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.TREE_SEQUENCES)
        self.metadata: dict[str, str] = dict(meta)   # GGUF keys: chat template, token ids...
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(vocab)
        self.vocab_tokens = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace")
                             for i in range(self.vocab_size)]
        self.eos_token_ids = frozenset(i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self._pieces = [_piece(llama_cpp, vocab, i) for i in range(self.vocab_size)]
        self._tokens: list[int] = []      # logical context
        self._cached: list[int] = []      # what sequence 0 of the KV cache holds, in order
        self._logits_at = -1              # context length the current logits row belongs to
        self._branches = 0                # sequences 1.. a token tree used (cleared by the next set_context)
        self._abort = None                # llama.cpp's abort callback, installed by the first interrupt
        # Warm up: llama.cpp allocates its compute buffers on the first decode (hundreds of ms),
        # which would otherwise land in the first request's time to first token.
        self._decode([0], [0], [(0,)], [True])
        llama_cpp.llama_memory_seq_rm(self._memory, -1, 0, -1)

    def interrupt(self, on: bool = True) -> None:
        """Stop the token being drafted midway: llama.cpp checks an abort callback between the nodes of
        its graph. The callback is installed by the first ``interrupt(False)`` -- which the engine calls
        on its own thread before it drafts anything it may interrupt, so the context is never changed
        under a running decode -- and costs a few percent of drafting speed, which a draft too fast to be
        worth interrupting never pays."""
        super().interrupt(on)
        if self._abort is None and not on:
            stop = self._stop
            self._abort = self._lib.ggml_abort_callback(lambda _data: stop.is_set())
            self._lib.llama_set_abort_callback(self._ctx, self._abort, None)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._vocab_llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token]

    def set_context(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.max_context:
            raise ValueError(f"context of {len(tokens)} tokens exceeds the draft's {self.max_context}")
        self._drop_branches()
        n = min(len(self._cached), len(tokens))
        same = np.asarray(self._cached[:n]) == np.asarray(tokens[:n])
        keep = n if same.all() else int(np.argmin(same))
        self._forget(keep)                # (also what a tree's nodes left there)
        self._tokens = list(tokens)

    def _forget(self, keep: int) -> None:
        """Sequence 0 keeps its first `keep` positions."""
        self._lib.llama_memory_seq_rm(self._memory, 0, keep, -1)
        if keep < len(self._cached):
            del self._cached[keep:]
            self._logits_at = -1          # the logits row belonged to the removed tail

    def _drop_branches(self) -> None:
        for seq in range(1, self._branches + 1):
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._branches = 0

    def _decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[Sequence[int]],
                logits: Sequence[bool]) -> None:
        """One llama_decode of at most n_batch tokens; an abort (``interrupt``) is ``DraftInterrupted``."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, ids, out) in enumerate(zip(tokens, positions, seqs, logits)):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, out
            batch.n_seq_id[i] = len(ids)
            for j, seq in enumerate(ids):
                batch.seq_id[i][j] = seq
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            self._logits_at = -1
            if self._stop is not None and self._stop.is_set():    # aborted: llama.cpp keeps what it had
                self._interrupted()
            raise RuntimeError(f"llama_decode failed ({status})")

    def _row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, i), shape=(self.vocab_size,))

    def _logits(self) -> np.ndarray:
        """Logits after the whole logical context, evaluating what is missing."""
        n = len(self._tokens)
        if self._logits_at != n:
            if len(self._cached) >= n:        # all cached, but the logits row is stale: redo the last token
                self._forget(n - 1)
            start = len(self._cached)
            while start < n:
                chunk = self._tokens[start: start + self.n_batch]
                try:
                    self._decode(chunk, range(start, start + len(chunk)), [(0,)] * len(chunk),
                                 [start + i == n - 1 for i in range(len(chunk))])
                except BaseException:
                    self._lib.llama_memory_seq_rm(self._memory, 0, len(self._cached), -1)   # unknown state
                    raise
                self._cached.extend(chunk)
                start += len(chunk)
            self._logits_at = n
        return self._row(-1)

    # -- token trees ----------------------------------------------------------------------------------
    def tree(self, chain: int = 0) -> "LlamaCppTree":
        """Start a token tree after the current context (see ``LlamaCppTree``); an earlier tree's branches
        go. `chain`: the context's last `chain` tokens are a chain already drafted, which becomes the
        tree's first nodes: branches fork off its cells, nothing is decoded again."""
        if not 0 <= chain < len(self._tokens):
            raise ValueError("a tree's chain is part of the context, after at least one token")
        self._drop_branches()
        # The context evaluated, a chain's last token too (a branch's children would fork its cells). A
        # level grown overwrites the row after it, so the next guess evaluates that token again.
        self._logits()
        return LlamaCppTree(self, chain)

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:             # at interpreter exit the library may be half torn down
            pass


class LlamaCppTree:
    """A token tree drafted after a ``LlamaCppDrafter``'s context, a level at a time.

    ``grow(parents, tokens)`` adds nodes whose parents are already in the tree (-1: the context) and
    returns each new node's logits row (the draft's distribution after its root path), all from one
    llama_decode. Node i sits at the position of its depth; its KV cells carry a sequence id of its
    own branch, and a branch forks from its parent's by ``llama_memory_seq_cp`` (in the unified cache
    the new sequence tags the shared cells: no copy, no re-decoding of the prefix). llama.cpp masks a
    query by its first sequence id, so each node sees the context and its own ancestors only. The
    first child of a node stays on its parent's sequence (the context's is 0); each further child
    forks a new one, at most ``TREE_SEQUENCES - 1`` of them (``ValueError`` beyond). The drafter's
    next ``set_context`` drops the branches and keeps sequence 0's common prefix, as for a chain.
    """

    def __init__(self, drafter: LlamaCppDrafter, chain: int = 0):
        self.drafter = drafter
        self.base = len(drafter._tokens) - chain
        # the distribution at the tree's first position (a chain's tokens carry their own alternatives)
        self.root = drafter._row(-1).copy() if not chain else None
        # A chain already drafted: its nodes lie on sequence 0, each the first child of the one before.
        self.tokens: list[int] = list(drafter._tokens[self.base:])
        self.parents: list[int] = list(range(-1, chain - 1))
        self.depth: list[int] = list(range(chain))
        self._seq: list[int] = [0] * chain                     # each node's sequence
        self._children: dict[int, int] = {i: 1 for i in range(-1, chain - 1)}   # node -> children so far

    def grow(self, parents: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
        d, lib = self.drafter, self.drafter._lib
        if len(tokens) != len(parents) or not tokens:
            raise ValueError("grow takes one parent per token, and at least one")
        if len(tokens) > d.n_batch:
            raise ValueError(f"at most {d.n_batch} nodes a call")
        if len(self.tokens) + len(tokens) + self.base > d.max_context:
            raise TreeFull(f"the tree's nodes would not fit the draft's context of {d.max_context}")
        tokens = [int(t) for t in tokens]
        children, forks, plan = dict(self._children), 0, []
        for parent in parents:
            if not -1 <= parent < len(self.tokens):     # grown by an earlier call: its cells exist to fork
                raise ValueError(f"parent {parent} is not a node of the tree yet")
            fork = children.get(parent, 0) > 0          # a sibling holds the parent's sequence: fork a new one
            children[parent] = children.get(parent, 0) + 1
            forks += fork
            plan.append(fork)
        if d._branches + forks >= d.TREE_SEQUENCES:
            raise TreeFull(f"a tree has at most {d.TREE_SEQUENCES} branches on this drafter")
        d._interrupted()
        seqs, positions = [], []
        for parent, token, fork in zip(parents, tokens, plan):
            depth = 0 if parent < 0 else self.depth[parent] + 1
            seq = 0 if parent < 0 else self._seq[parent]
            if fork:
                d._branches += 1
                lib.llama_memory_seq_rm(d._memory, d._branches, -1, -1)
                lib.llama_memory_seq_cp(d._memory, seq, d._branches, 0, self.base + depth)   # context + ancestors
                seq = d._branches
            self.tokens.append(token)
            self.parents.append(parent)
            self.depth.append(depth)
            self._seq.append(seq)
            seqs.append((seq,))
            positions.append(self.base + depth)
        self._children = children
        d._logits_at = -1                              # the context's row is `root` now
        try:
            d._decode(tokens, positions, seqs, [True] * len(tokens))
        except BaseException:          # interrupted or failed: sequence 0 keeps what it held (the tree is dropped)
            lib.llama_memory_seq_rm(d._memory, 0, len(d._cached), -1)
            raise
        rows = [d._row(i).copy() for i in range(len(tokens))]
        # Sequence 0 now holds the context plus its branch's nodes: record them so that a set_context to
        # the accepted path keeps the cells where that path ran along sequence 0.
        d._cached = d._tokens[: self.base] + self._path_tokens(self._seq0_tip())
        return rows

    def _seq0_tip(self) -> int:
        tip = -1
        for i, seq in enumerate(self._seq):
            if seq == 0 and (tip < 0 or self.depth[i] > self.depth[tip]):
                tip = i
        return tip

    def _path_tokens(self, node: int) -> list[int]:
        return path_tokens(self.tokens, self.parents, node)


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
            self._add_bos = meta.get("add_bos", "1") == "1"   # older exports lack it: they all added BOS
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
        return ([self._bos] if add_bos and self._add_bos else []) + ids

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
