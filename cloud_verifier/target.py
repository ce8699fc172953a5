"""Target models behind one small protocol.

A target keeps, per session, a KV cache and the token ids it holds. ``logits``
brings that cache to a requested token sequence -- cropping it back to the longest
common prefix first (rollback) and running only the new tail -- and returns the
logits rows the caller asks for. NAV (``nav.py``) never touches a model directly.
"""

from __future__ import annotations

import time

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


@dataclass
class TargetState:
    """One session's KV cache and the tokens it covers (backend-specific cache object)."""

    cache: object = None
    tokens: list[int] = field(default_factory=list)


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

    def logits_many(self, jobs: Sequence[tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        """``logits`` for several sessions (distinct states); a batching backend runs them as one pass.
        A job whose pass failed gets the exception in its place (the others' rows stand)."""

    def rollback(self, state: TargetState, length: int) -> None:
        """Forget every cached position at or after `length`."""

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


def quiet_libraries(backend: str) -> None:
    """Turn off the output the backend's libraries print on their own, process-wide.

    transformers draws progress bars and logs warnings while it loads; llama.cpp logs through its
    callback even with ``verbose=False`` (its warnings map to an error level in llama-cpp-python, so
    every context printed "n_ctx_seq (...) > n_ctx_train (0)"). A server's stderr is for its own
    messages; ``pipesd-verifier --verbose`` leaves all of it on. (transformers' GGUF converter draws
    its bar with tqdm directly: the CLI silences the load's stderr for that one.)
    """
    global _QUIET_LLAMA_LOG
    if backend == "torch":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    elif backend in ("llamacpp", "llama.cpp"):
        import ctypes

        import llama_cpp              # imports llama-cpp-python's own callback first, so ours replaces it

        if _QUIET_LLAMA_LOG is None:
            _QUIET_LLAMA_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET_LLAMA_LOG, ctypes.c_void_p(0))


def _gguf_metadata(path: Path) -> tuple[list[str], tuple[int, ...], int]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in reader.fields:
            eos.append(int(reader.fields[key].contents()))
    arch = reader.fields["general.architecture"].contents()
    context = int(reader.fields[f"{arch}.context_length"].contents())
    return tokens, tuple(dict.fromkeys(eos)), context


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
        del state.tokens[length:]     # positions past the length are masked out and overwritten later

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        rows = self.logits_many([(state, tokens, first_row)])[0]
        if isinstance(rows, Exception):
            raise rows
        return rows

    def logits_many(self, jobs: Sequence[tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        """``logits`` for several sessions (distinct states) at once; a failed pass's jobs get its exception."""
        if len({id(state) for state, _, _ in jobs}) != len(jobs):
            raise ValueError("one forward pass takes each session at most once")
        # No job of this call may lose its slot to another: protect the slots already held first.
        keep = {state.cache for state, _, _ in jobs if self.pool.holds(state)}
        for state, _, _ in jobs:
            keep.add(self.pool.acquire(state, keep=keep))
        work = []
        for i, (state, tokens, first_row) in enumerate(jobs):
            # Keep at least one token to run so that row `first_row` is produced by this pass.
            start = min(common_prefix(state.tokens, tokens), first_row)
            self.rollback(state, start)
            work.append((len(tokens) - start, i, start))
        out: list[np.ndarray | Exception] = [None] * len(jobs)
        for group in _similar_lengths(sorted(work), self.pool.max_len):
            try:
                self._run(jobs, group, out)
            except Exception as exc:     # this pass failed: its sessions fail, the call's other passes stand
                for _, i, _ in group:
                    jobs[i][0].tokens.clear()      # what the slot holds for them is unknown now
                    out[i] = exc
        return out

    def _run(self, jobs, group, out) -> None:
        torch = self._torch
        n = group[-1][0]
        rows = [jobs[i] for _, i, _ in group]
        starts = [start for _, _, start in group]
        view = self.pool.view([state.cache for state, _, _ in rows], starts, n)
        ids = torch.zeros((len(rows), n), dtype=torch.long)           # right padding: masked by causality
        for b, ((state, tokens, _), start) in enumerate(zip(rows, starts)):
            ids[b, : len(tokens) - start] = torch.tensor(tokens[start:])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=view.mask(torch.float32), position_ids=view.positions,
                                cache=view, use_cache=True).logits
        for b, ((state, tokens, first_row), start, (_, i, _)) in enumerate(zip(rows, starts, group)):
            state.tokens.extend(tokens[start:])
            # A copy: a view would keep the whole batch's logits alive while a round is pending.
            out[i] = logits[b, first_row - start: len(tokens) - start].float().numpy().copy()


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


class LlamaCppTarget:
    """A GGUF target on llama.cpp: one context per session, logits for every evaluated position.

    Not batched across sessions: one context with several sequences (``n_seq_max``) was
    measured 1.35-1.6x faster here but is not wired in; ``logits_many`` runs jobs in turn.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, threads: int | None = None,
                 max_context: int | None = None, verbose: bool = False):
        from llama_cpp import Llama

        path = Path(path)
        self._path, self._threads, self._verbose = str(path), threads, verbose
        with _loading(path, "llamacpp", "a GGUF file llama.cpp can read"):
            self.vocab_tokens, self.eos_token_ids, context = _gguf_metadata(path)
            probe = Llama(model_path=self._path, vocab_only=True, verbose=verbose)
        self.max_context = min(context, max_context or context)
        self.vocab_size = probe.n_vocab()
        self.name = name or path.name
        self._Llama = Llama

    def new_state(self) -> TargetState:
        llm = self._Llama(model_path=self._path, n_ctx=self.max_context, n_batch=self.max_context,
                          logits_all=True, n_threads=self._threads, n_threads_batch=self._threads,
                          verbose=self._verbose)
        return TargetState(cache=llm)

    def release(self, state: TargetState) -> None:
        state.cache = None
        state.tokens.clear()

    def logits_many(self, jobs: Sequence[tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        out: list[np.ndarray | Exception] = []
        for job in jobs:                                # one context per session: no shared pass (yet)
            try:
                out.append(self.logits(*job))
            except Exception as exc:                    # this session fails, the others' rows stand
                out.append(exc)
        return out

    def rollback(self, state: TargetState, length: int) -> None:
        if len(state.tokens) > length:
            state.cache.n_tokens = length  # llama-cpp-python removes the tail on the next eval
            del state.tokens[length:]

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        keep = min(common_prefix(state.tokens, tokens), first_row)
        self.rollback(state, keep)
        llm = state.cache
        llm.eval(list(tokens[keep:]))
        state.tokens.extend(tokens[keep:])
        return np.array(llm.scores[first_row: len(tokens)], dtype=np.float32)


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

    def logits_many(self, jobs: Sequence[tuple[TargetState, Sequence[int], int]]) -> list[np.ndarray | Exception]:
        t0 = time.perf_counter()
        out = self.inner.logits_many(jobs)
        rows = sum(max(1, len(tokens) - first_row) for _, tokens, first_row in jobs)
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
