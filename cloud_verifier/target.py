"""Target models behind one small protocol.

A target keeps, per session, a KV cache and the token ids it holds. ``logits``
brings that cache to a requested token sequence -- cropping it back to the longest
common prefix first (rollback) and running only the new tail -- and returns the
logits rows the caller asks for. NAV (``nav.py``) never touches a model directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

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

    def rollback(self, state: TargetState, length: int) -> None:
        """Forget every cached position at or after `length`."""


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
    """A transformers causal LM (HF model directory or GGUF file) with a DynamicCache per session."""

    def __init__(self, path: str | Path, *, name: str | None = None, threads: int | None = None,
                 max_context: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        path = Path(path)
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

    def new_state(self) -> TargetState:
        from transformers import DynamicCache

        return TargetState(cache=DynamicCache(config=self.model.config))

    def rollback(self, state: TargetState, length: int) -> None:
        drop = len(state.tokens) - length
        if drop > 0:
            state.cache.crop(-drop)
            del state.tokens[length:]

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        # Keep at least one token to run so that row `first_row` is produced by this pass.
        keep = min(common_prefix(state.tokens, tokens), first_row)
        self.rollback(state, keep)
        new = list(tokens[keep:])
        with self._torch.inference_mode():
            out = self.model(input_ids=self._torch.tensor([new]), cache=state.cache, use_cache=True)
        state.tokens.extend(new)
        return out.logits[0, first_row - keep:].float().numpy()


class LlamaCppTarget:
    """A GGUF target on llama.cpp: one context per session, logits for every evaluated position."""

    def __init__(self, path: str | Path, *, name: str | None = None, threads: int | None = None,
                 max_context: int | None = None):
        from llama_cpp import Llama

        path = Path(path)
        self._path, self._threads = str(path), threads
        self.vocab_tokens, self.eos_token_ids, context = _gguf_metadata(path)
        self.max_context = min(context, max_context or context)
        probe = Llama(model_path=self._path, vocab_only=True, verbose=False)
        self.vocab_size = probe.n_vocab()
        self.name = name or path.name
        self._Llama = Llama

    def new_state(self) -> TargetState:
        llm = self._Llama(model_path=self._path, n_ctx=self.max_context, n_batch=self.max_context,
                          logits_all=True, n_threads=self._threads, n_threads_batch=self._threads, verbose=False)
        return TargetState(cache=llm)

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


def load_target(path: str | Path, backend: str = "torch", **kwargs) -> Target:
    if backend == "torch":
        return TorchTarget(path, **kwargs)
    if backend in ("llamacpp", "llama.cpp"):
        return LlamaCppTarget(path, **kwargs)
    raise ValueError(f"unknown target backend {backend!r} (choose 'torch' or 'llamacpp')")
