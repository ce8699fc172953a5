"""Target models behind one small protocol.

A target keeps, per session, a KV cache and the token ids it holds. ``logits``
brings that cache to a requested token sequence -- cropping it back to the longest
common prefix first (rollback) and running only the new tail -- and returns the
logits rows the caller asks for. NAV (``nav.py``) never touches a model directly.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol, Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


@dataclass
class TargetState:
    """One session's KV cache and the tokens it covers (backend-specific cache object).

    After a token tree's pass, ``tokens`` holds the tree's nodes in wire order from ``tree_at`` on (the
    cache holds them there too); ``keep_path`` turns that back into a sequence. Until it does, the
    nodes are not a prefix of anything, and the next pass forgets them."""

    cache: object = None
    tokens: list[int] = field(default_factory=list)
    tree_at: int | None = None


class PassJob(NamedTuple):
    """One session's part of a target pass: hold `tokens` after it, return the rows from `first_row`.

    `parents` (a token tree): the last len(parents) tokens are a tree's nodes, parents[i] the index of
    node i's parent among them (-1: the token before the tree); each node sees its root path only, at
    the position of its depth. Empty: `tokens` is a plain sequence. A plain (state, tokens, first_row)
    tuple is the same job without a tree."""

    state: TargetState
    tokens: Sequence[int]
    first_row: int
    parents: Sequence[int] = ()


def as_job(job) -> PassJob:
    return job if isinstance(job, PassJob) else PassJob(*job)


class Target(Protocol):
    name: str
    vocab_size: int
    vocab_tokens: list[str]
    eos_token_ids: tuple[int, ...]
    max_context: int

    def new_state(self) -> TargetState: ...

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        """Logits (float32, [len(tokens) - first_row, vocab]) for positions first_row.. of `tokens`.

        Row i predicts the token after tokens[first_row + i]. The state's cache ends up
        covering all of `tokens`; callers crop it with ``rollback``.
        """

    def logits_many(self, jobs: Sequence[PassJob | tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        """``logits`` for several sessions (distinct states); a batching backend runs them as one pass.
        A job whose pass failed gets the exception in its place (the others' rows stand). Jobs with a
        tree (``PassJob.parents``) only where ``supports_trees`` is true."""

    def rollback(self, state: TargetState, length: int) -> None:
        """Forget every cached position at or after `length`."""

    # Token trees (optional): a target that verifies them sets ``supports_trees = True`` and has
    # keep_path(state, path): after a tree's pass, keep the root path `path` (node indices) and forget
    # the other nodes, so that the state holds the prefix plus the path as a plain sequence.

    def release(self, state: TargetState) -> None:
        """The session is gone: free what its cache holds."""


class ModelLoadError(ValueError):
    """A target model that cannot be loaded: its path and the reason, in one line (``path``,
    ``reason`` and ``backend`` as attributes).

    Loading goes through three libraries (gguf, transformers, llama.cpp) that fail with whatever they
    like -- ValueError, OSError, KeyError, multi-paragraph messages -- so callers (the CLI above all)
    catch this one type and print its message instead of a traceback. The library's exception is
    kept as ``__cause__``. A ValueError, as most of those failures were before it existed.
    """

    def __init__(self, path: str | Path, reason: str, backend: str | None = None):
        self.path, self.reason, self.backend = Path(path), reason, backend
        super().__init__(f"cannot load the target model {path}: {reason}")

    def __reduce__(self):             # picklable with its fields (a Ray replica may ship it)
        return type(self), (self.path, self.reason, self.backend)


def _reason(exc: BaseException, limit: int = 300) -> str:
    """One line saying why a library failed: its message's first line (transformers' run to paragraphs),
    with the exception type where the message alone says little (KeyError: 'x')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not (text and isinstance(exc, (ValueError, OSError))):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _loading(path: Path, backend: str, expected: str) -> Iterator[None]:
    """Whatever reading the model raises becomes a ModelLoadError naming the path, what the backend
    expected there (the libraries' messages alone -- "GGUF magic invalid" -- leave that to guess) and why."""
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory", backend)
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:          # the libraries' own types vary by version and by what is wrong
        raise ModelLoadError(path, f"not {expected} ({_reason(exc)})", backend) from exc


_QUIET_LLAMA_LOG = None               # the no-op log callback, kept referenced: llama.cpp holds a pointer to it


def _quiet_log(llama_cpp):
    """The no-op llama.cpp log callback, made once and kept referenced (llama.cpp holds a pointer to it)."""
    global _QUIET_LLAMA_LOG
    if _QUIET_LLAMA_LOG is None:
        _QUIET_LLAMA_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    return _QUIET_LLAMA_LOG


def quiet_libraries(backend: str) -> None:
    """Turn off the output the backend's libraries print on their own, process-wide.

    transformers draws progress bars and logs warnings while it loads; llama.cpp logs through its
    callback even with ``verbose=False`` (its warnings map to an error level in llama-cpp-python, so
    every context printed "n_ctx_seq (...) > n_ctx_train (0)"). A server's stderr is for its own
    messages; ``pipesd-verifier --verbose`` leaves all of it on. (transformers' GGUF converter draws
    its bar with tqdm directly: the CLI silences the load's stderr for that one.)
    """
    if backend == "torch":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    elif backend in ("llamacpp", "llama.cpp"):
        import ctypes

        import llama_cpp              # imports llama-cpp-python's own callback first, so ours replaces it

        llama_cpp.llama_log_set(_quiet_log(llama_cpp), ctypes.c_void_p(0))


_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")   # the GGUF's end-of-generation ids


def _gguf_metadata(path: Path, model=None) -> tuple[list[str], tuple[int, ...], int]:
    """The GGUF's vocabulary (token strings, as llama.cpp's drafters on the edge read them), its
    end-of-generation token ids and its trained context: from `model` if llama.cpp loaded it already,
    else by a vocabulary-only load (gguf-py's reader took ~3 s for SmolLM2's 49,152 tokens, parsing every
    field into numpy views first; llama.cpp reads the same strings in ~0.1 s), else -- a file llama.cpp
    cannot read, which transformers may -- by gguf-py. The ids come from the GGUF's own keys, not
    llama.cpp's guesses: llama.cpp takes a token named like an end of text for EOT where the file names
    none."""
    import ctypes

    import llama_cpp

    own = model is None
    if own:
        _init_llama_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with _llama_log_off(llama_cpp):      # our own read, not the model load the log is there for
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            return _gguf_metadata_by_gguf_py(path)
    try:
        def value(key: str) -> str | None:
            buf = ctypes.create_string_buffer(128)
            n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode() if 0 <= n < len(buf) else None

        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8")
                  for i in range(llama_cpp.llama_vocab_n_tokens(vocab))]
        eos = [int(v) for key in _EOS_KEYS if (v := value(key)) is not None]
        context = value(f"{value('general.architecture')}.context_length")
        if context is None:
            raise ValueError("the GGUF gives no context length")
        return tokens, tuple(dict.fromkeys(eos)), int(context)
    finally:
        if own:
            llama_cpp.llama_model_free(model)


def _gguf_metadata_by_gguf_py(path: Path) -> tuple[list[str], tuple[int, ...], int]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    eos = [int(reader.fields[key].contents()) for key in _EOS_KEYS if key in reader.fields]
    arch = reader.fields["general.architecture"].contents()
    return tokens, tuple(dict.fromkeys(eos)), int(reader.fields[f"{arch}.context_length"].contents())


@contextmanager
def _llama_log_off(llama_cpp):
    """llama.cpp's log off for a moment, then as it was (whatever callback was set: llama-cpp-python's,
    a quiet one, an app's). Not thread-safe, as llama.cpp's log state is not: for loads at start-up."""
    import ctypes

    callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
    llama_cpp.llama_log_set(_quiet_log(llama_cpp), ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(callback, data)


class TorchTarget:
    """A transformers causal LM (HF model directory or GGUF file) whose sessions share one KV pool.

    ``logits_many`` runs the NAV work of several sessions as one forward pass (``kvpool.py``
    says how); ``logits`` is the one-session case of it. Jobs whose new tails differ a lot
    in length (a resync's prefix next to a few draft tokens) run in separate passes, so a
    short row never pays for another row's padding by more than 2x.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, threads: int | None = None,
                 max_context: int | None = None, kv_slots: int = 64):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .kvpool import KVPool

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        path = Path(path)
        expected = ("a GGUF file transformers can read" if path.suffix == ".gguf"
                    else "a Hugging Face model directory transformers can read")
        with _loading(path, "torch", expected):
            if path.suffix == ".gguf":
                self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
                self.vocab_tokens, self.eos_token_ids, context = _gguf_metadata(path)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(str(path))
                self.vocab_tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
                eos = self.model.generation_config.eos_token_id
                self.eos_token_ids = tuple(eos if isinstance(eos, list) else [eos])
                context = self.model.config.max_position_embeddings
        self.model.eval()
        self.name = name or path.name
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_context = min(context, max_context or context)
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.pool = KVPool(c.num_hidden_layers, c.num_key_value_heads, head_dim, max_slots=kv_slots,
                           max_len=self.max_context)

    def new_state(self) -> TargetState:
        return TargetState()          # cache: the pool slot, taken at the first forward pass

    def release(self, state: TargetState) -> None:
        self.pool.release(state)

    def rollback(self, state: TargetState, length: int) -> None:
        if state.tree_at is not None:  # a tree's nodes become a sequence only through keep_path
            length, state.tree_at = min(length, state.tree_at), None
        del state.tokens[length:]     # positions past the length are masked out and overwritten later

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        rows = self.logits_many([(state, tokens, first_row)])[0]
        if isinstance(rows, Exception):
            raise rows
        return rows

    supports_trees = True

    def logits_many(self, jobs: Sequence[PassJob | tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        """``logits`` for several sessions (distinct states) at once; a failed pass's jobs get its exception."""
        jobs = [as_job(job) for job in jobs]
        if len({id(job.state) for job in jobs}) != len(jobs):
            raise ValueError("one forward pass takes each session at most once")
        for job in jobs:
            if job.state.tree_at is not None:        # a tree's nodes nobody kept a path of: not a prefix
                self.rollback(job.state, job.state.tree_at)
        # Where each row starts (after its cached prefix; at 0 without a slot) and the passes the rows make:
        # how long the pool's rows must be. More rows than the pool affords at that length: two calls.
        starts = [self._start(job) for job in jobs]
        work = sorted((len(job.tokens) - start, i, start) for i, (job, start) in enumerate(zip(jobs, starts)))
        groups = list(_similar_lengths(work, self.pool.longest_row() or self.pool.max_len))
        reach = max(max(start for _, _, start in group) + group[-1][0] for group in groups)
        fitting = self.pool.slots_fitting(reach)
        if len(jobs) > max(1, fitting):   # as many as fit first; each part regroups and checks again
            first = max(1, fitting)
            return self.logits_many(jobs[:first]) + self.logits_many(jobs[first:])
        try:   # no job of this call may lose its slot to another: the held ones are kept, perhaps moved
            self.pool.reserve(reach, {job.state.cache for job in jobs if self.pool.holds(job.state)})
            keep = {job.state.cache for job in jobs if self.pool.holds(job.state)}
            for job in jobs:
                keep.add(self.pool.acquire(job.state, keep=keep))
        except Exception as exc:     # PoolFull, or out of memory growing the pool (left as it was): these fail
            return [exc] * len(jobs)
        for job, start in zip(jobs, starts):
            self.rollback(job.state, start)
        out: list[np.ndarray | Exception] = [None] * len(jobs)
        for group in groups:
            try:
                self._run(jobs, group, out)
            except Exception as exc:     # this pass failed: its sessions fail, the call's other passes stand
                for _, i, _ in group:
                    jobs[i].state.tokens.clear()   # what the slot holds for them is unknown now
                    jobs[i].state.tree_at = None
                    out[i] = exc
        return out

    def _start(self, job: PassJob) -> int:
        """Where `job`'s row starts: after its cached prefix, keeping at least one token to run so that row
        `first_row` is produced by this pass; a tree's nodes always run (their cached keys sit at wire
        order, not at their depth's position). A session without a slot starts at 0 (``acquire`` clears it)."""
        cached = job.state.tokens if self.pool.holds(job.state) else ()
        return min(common_prefix(cached, job.tokens), job.first_row, len(job.tokens) - len(job.parents))

    def _run(self, jobs, group, out) -> None:
        torch = self._torch
        n = group[-1][0]
        rows = [jobs[i] for _, i, _ in group]
        starts = [start for _, _, start in group]
        trees = [(len(job.tokens) - len(job.parents) - start, job.parents) if job.parents else None
                 for job, start in zip(rows, starts)]
        view = self.pool.view([job.state.cache for job in rows], starts, n, trees)
        ids = torch.zeros((len(rows), n), dtype=torch.long)           # right padding: masked by causality
        for b, (job, start) in enumerate(zip(rows, starts)):
            ids[b, : len(job.tokens) - start] = torch.tensor(job.tokens[start:])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=view.mask(torch.float32), position_ids=view.positions,
                                cache=view, use_cache=True).logits
        for b, (job, start, (_, i, _)) in enumerate(zip(rows, starts, group)):
            state, tokens, first_row = job.state, job.tokens, job.first_row
            state.tokens.extend(tokens[start:])
            state.tree_at = len(tokens) - len(job.parents) if job.parents else None
            # A copy: a view would keep the whole batch's logits alive while a round is pending.
            out[i] = logits[b, first_row - start: len(tokens) - start].float().numpy().copy()

    def keep_path(self, state: TargetState, path: Sequence[int]) -> None:
        """After a tree's pass: the state holds the prefix plus the nodes of `path` (a root path, node
        indices), their keys moved down to the positions a plain sequence would give them."""
        at = state.tree_at
        if at is None:                # its slot went to another session: the next pass recomputes the prefix
            return
        nodes = state.tokens[at:]
        self.pool.compact(state, at, list(path))
        del state.tokens[at:]
        state.tokens.extend(nodes[i] for i in path)
        state.tree_at = None

def _similar_lengths(work: list[tuple[int, int, int]], max_len: int):
    """Split (new tokens, job, start), sorted by length, into passes whose padding is at most 2x and
    whose padded rows stay within the pool (a row near the end of the context is not padded past it)."""
    group: list[tuple[int, int, int]] = []
    for item in work:
        n = item[0]                       # the pass's width if this row joins (rows come sorted by n)
        if group and (n > max(8, 2 * group[0][0]) or any(start + n > max_len for _, _, start in group)):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


_LLAMA_BACKEND = False               # llama_backend_init() done in this process


def _init_llama_backend() -> None:
    global _LLAMA_BACKEND
    if not _LLAMA_BACKEND:
        import llama_cpp

        llama_cpp.llama_backend_init()
        _LLAMA_BACKEND = True


class ContextPool:
    """At most ``max_contexts`` llama.cpp contexts over one model, created as sessions first need them.

    A session (its ``TargetState``) borrows a context for its passes and keeps it while others leave
    it alone; when every context is in use, the least recently used session's is taken: that session's
    ``tokens`` empties and its next pass recomputes its prefix from the token ids the verifier holds
    (the same as the torch pool's ``kv_slots``: no round trip, no resync). Contexts are never freed while
    the target lives (making one costs ~0.1 s for a small model), so the pool is also what the memory
    budget counts (``LlamaCppTarget.held_bytes``). The same attributes as ``KVPool`` (``owners``,
    ``evictions``) feed the same gauges.
    """

    def __init__(self, make, max_contexts: int):
        if max_contexts < 1:
            raise ValueError("the context pool needs at least one context")
        self._make = make
        self.max_contexts = max_contexts
        self.contexts: list = []                       # raw llama_context pointers
        self.owners: dict[int, TargetState] = {}       # context index -> the state holding it
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.free: list[int] = []
        self.evictions = 0

    def holds(self, state: TargetState) -> bool:
        return state.cache is not None and self.owners.get(state.cache) is state

    def acquire(self, state: TargetState) -> int:
        """The context index for `state` (its own while it still has one); may take another session's."""
        if self.holds(state):
            self.recent.move_to_end(state.cache)
            return state.cache
        if self.free:
            index = self.free.pop()
        elif len(self.contexts) < self.max_contexts:
            try:
                self.contexts.append(self._make())
            except MemoryError:
                if not self.contexts:
                    raise
                self.max_contexts = len(self.contexts)     # no room for another: share those there are
                return self.acquire(state)
            index = len(self.contexts) - 1
        else:
            index = next(iter(self.recent))
            self._forget(index)
            self.evictions += 1
        self.owners[index] = state
        self.recent[index] = None
        state.cache = index
        state.tokens.clear()            # what the context holds belongs to no one now
        return index

    def release(self, state: TargetState) -> None:
        if self.holds(state):
            index = state.cache
            self._forget(index)
            self.free.append(index)
        state.cache = None
        state.tokens.clear()

    def _forget(self, index: int) -> None:
        owner = self.owners.pop(index)
        self.recent.pop(index, None)
        owner.cache = None
        owner.tokens.clear()


class LlamaCppTarget:
    """A GGUF target on llama.cpp: the model loaded once, a bounded pool of contexts (``ContextPool``).

    The low-level API (not the ``Llama`` class) so that contexts share one copy of the weights and a pass
    asks llama.cpp for the logits rows NAV needs only: ``Llama(logits_all=True)`` kept a [n_ctx, vocab]
    float32 score array per session (1.6 GB at SmolLM2's 8192 x 49152, resident as positions grew) and a
    copy of the weights each (~320 MB and ~0.2 s per OPEN before). A context costs its KV cache now.

    Not batched across sessions: one context with several sequences (``n_seq_max``) was measured
    1.35-1.6x faster here but is not wired in; ``logits_many`` runs jobs in turn.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, threads: int | None = None,
                 max_context: int | None = None, verbose: bool = False, contexts: int = 8):
        import llama_cpp

        path = Path(path)
        self._lib, self._threads = llama_cpp, threads or max(1, (os.cpu_count() or 2) // 2)  # Llama's default
        self._model = self._batch = None
        with _loading(path, "llamacpp", "a GGUF file llama.cpp can read"):
            if not verbose:
                quiet_libraries("llamacpp")
            _init_llama_backend()
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                                llama_cpp.llama_model_default_params())
            if not self._model:
                raise ValueError("llama.cpp could not load the model")
            try:
                self.vocab_tokens, self.eos_token_ids, context = _gguf_metadata(path, self._model)
            except BaseException:       # close() cannot free it yet (no pool): the weights would leak
                llama_cpp.llama_model_free(self._model)
                self._model = None
                raise
        self.max_context = min(context, max_context or context)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.name = name or path.name
        self.n_batch = min(self.max_context, 512)
        m = self._model
        head_dim = llama_cpp.llama_model_n_embd(m) // max(1, llama_cpp.llama_model_n_head(m))
        kv_width = llama_cpp.llama_model_n_head_kv(m) * head_dim
        # One context: its f16 KV cache over the whole context, plus output and compute buffers (estimated;
        # measured +190 MB for SmolLM2's 8192 positions against 189 MB of KV).
        self.context_bytes = 2 * llama_cpp.llama_model_n_layer(m) * self.max_context * kv_width * 2 + (8 << 20)
        self.pool = ContextPool(self._new_context, contexts)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _new_context(self):
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.max_context
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self._threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED    # as the Llama class's default
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise MemoryError(f"llama.cpp could not create a context of {self.max_context} positions")
        return ctx

    def held_bytes(self) -> int:
        return len(self.pool.contexts) * self.context_bytes

    def new_state(self) -> TargetState:
        return TargetState()          # cache: a context of the pool, borrowed at its first pass

    def release(self, state: TargetState) -> None:
        self.pool.release(state)

    supports_trees = False       # one sequence per context; the verifier refuses trees (tree_unsupported)

    def logits_many(self, jobs: Sequence[PassJob | tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        out: list[np.ndarray | Exception] = []
        for job in map(as_job, jobs):                   # one context per session: no shared pass (yet)
            try:
                if job.parents:
                    raise ValueError("the llama.cpp target verifies chains only, not token trees")
                out.append(self.logits(job.state, job.tokens, job.first_row))
            except Exception as exc:                    # this session fails, the others' rows stand
                job[0].tokens.clear()                   # what its context holds is unknown now
                out.append(exc)
        return out

    def rollback(self, state: TargetState, length: int) -> None:
        del state.tokens[length:]     # the next pass removes the context's tail before it decodes

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        if len(tokens) > self.max_context:
            raise ValueError(f"{len(tokens)} tokens exceed the context of {self.max_context}")
        if not 0 <= first_row < len(tokens):
            raise ValueError(f"first_row {first_row} outside the {len(tokens)} tokens")
        lib = self._lib
        ctx = self.pool.contexts[self.pool.acquire(state)]
        keep = min(common_prefix(state.tokens, tokens), first_row)
        del state.tokens[keep:]
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, keep, -1)
        batch, rows = self._batch, []
        for start in range(keep, len(tokens), self.n_batch):
            chunk = tokens[start: start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = start + i >= first_row      # only the rows NAV reads
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status})")
            state.tokens.extend(chunk)
            for i in range(max(0, first_row - start), len(chunk)):
                rows.append(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(self.vocab_size,)).copy())
        return np.stack(rows).astype(np.float32, copy=False)

    def close(self) -> None:
        """Free the contexts and the model (the process's end does it too)."""
        lib = self._lib
        for state in list(self.pool.owners.values()):
            self.pool.release(state)
        for ctx in self.pool.contexts:
            lib.llama_free(ctx)
        self.pool.contexts.clear()
        self.pool.free.clear()
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:             # at interpreter exit the library may be half torn down
            pass


class PaddedTarget:
    """Emulation, for benchmarks: every target pass takes at least ``fixed_s + per_token_s * rows``.

    Our targets are tiny CPU models whose passes take a few ms whatever their length; a 7B model on
    a datacenter GPU takes ~20 ms a pass plus a little per token. Padding each pass (sleeping out the
    rest of its budget) makes the cloud side of a benchmark cost what a real deployment's would,
    without a GPU: ``pipesd-verifier --emulate-pass-ms 20,0.2``. Everything else is the real target.
    """

    def __init__(self, inner: Target, fixed_s: float, per_token_s: float = 0.0):
        if fixed_s < 0 or per_token_s < 0:
            raise ValueError("an emulated pass time cannot be negative")
        self.inner, self.fixed_s, self.per_token_s = inner, fixed_s, per_token_s

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logits_many(self, jobs: Sequence[PassJob | tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        t0 = time.perf_counter()
        jobs = [as_job(job) for job in jobs]
        out = self.inner.logits_many(jobs)
        rows = sum(max(1, len(job.tokens) - job.first_row) for job in jobs)
        rest = self.fixed_s + self.per_token_s * rows - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return out


def load_target(path: str | Path, backend: str = "torch", **kwargs) -> Target:
    """The target at `path` on `backend`; a file or directory that cannot be loaded is a ModelLoadError."""
    if backend == "torch":
        return TorchTarget(path, **kwargs)
    if backend in ("llamacpp", "llama.cpp"):
        return LlamaCppTarget(path, **kwargs)
    raise ValueError(f"unknown target backend {backend!r} (choose 'torch' or 'llamacpp')")
