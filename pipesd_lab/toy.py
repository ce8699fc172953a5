"""A tiny deterministic model pair: the engine's logic exercised in microseconds per token.

``ToyLanguage`` is a language model in the plainest sense: the next token's logits are a fixed
random table indexed by the last two tokens (a trigram model with made-up weights). The target
is the language itself; the draft is the same language with its logits perturbed by a second
table, so it agrees with the target's argmax most of the time, disagrees at fixed, reproducible
places, and is confident or not as its own softmax says -- which is all the engine ever sees.

``ToyTarget`` implements the verifier's ``Target`` protocol (its "KV cache" is the token list it
covers; rollback shortens it) and ``ToyDrafter`` the edge's ``Drafter`` protocol (with the same
token choice as the real drafters, greedy or sampled). Neither is a mock: the verifier service,
the wire, NAV and the engine run unchanged on top of them.
"""

from __future__ import annotations

import string
import time
from typing import Sequence

import numpy as np

from cloud_verifier.target import TargetState, as_job, common_prefix
from edge_sdk.drafter import _LogitsDrafter

BOS, EOS = 0, 1
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?-_()[]{}<>=+*/&%$#@~^|"


class ToyLanguage:
    """Next-token logits as a function of the last two tokens: ``logits(context)``."""

    def __init__(self, vocab_size: int = 64, seed: int = 0, sharpness: float = 3.0, eos_logit: float = -6.0):
        if not 4 <= vocab_size <= len(ALPHABET) + 2:
            raise ValueError(f"vocab_size must lie in [4, {len(ALPHABET) + 2}]")
        rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.table = (sharpness * rng.standard_normal((vocab_size, vocab_size, vocab_size))).astype(np.float32)
        self.table[:, :, BOS] = -30.0            # BOS only starts a prompt
        self.table[:, :, EOS] = eos_logit        # EOS is possible but rare
        self.vocab_tokens = ["<s>", "</s>"] + list(ALPHABET[: vocab_size - 2])
        self.pieces = [b"", b""] + [c.encode() for c in ALPHABET[: vocab_size - 2]]

    def logits(self, context: Sequence[int]) -> np.ndarray:
        a = context[-2] if len(context) >= 2 else BOS
        return self.table[a, context[-1]]

    def perturbed(self, noise: float, seed: int = 1) -> "ToyLanguage":
        """A draft of this language: its logits plus `noise` x a second random table."""
        draft = ToyLanguage.__new__(ToyLanguage)
        draft.__dict__.update(self.__dict__)
        rng = np.random.default_rng(seed)
        draft.table = self.table + (noise * rng.standard_normal(self.table.shape)).astype(np.float32)
        draft.table[:, :, BOS] = -30.0
        return draft

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """This model's own greedy continuation of `prompt`: n tokens, or fewer ending in EOS."""
        out = list(prompt)
        for _ in range(n):
            out.append(int(self.logits(out).argmax()))
            if out[-1] == EOS:
                break
        return out[len(prompt):]

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [2 + ALPHABET.index(c) % (self.vocab_size - 2) if c in ALPHABET else 2 for c in text]
        return ([BOS] if add_bos else []) + ids


class ToyTarget:
    """The verifier's ``Target`` protocol over a ``ToyLanguage``; counts the positions it computes."""

    def __init__(self, language: ToyLanguage, max_context: int = 512, name: str = "toy-target"):
        self.language, self.name, self.max_context = language, name, max_context
        self.vocab_size, self.vocab_tokens = language.vocab_size, language.vocab_tokens
        self.eos_token_ids = (EOS,)
        self.positions_computed = 0      # tokens run through the "model" (a rollback saves recomputing)
        self.passes = 0

    def new_state(self) -> TargetState:
        return TargetState()

    def release(self, state: TargetState) -> None:
        state.tokens.clear()

    def rollback(self, state: TargetState, length: int) -> None:
        if state.tree_at is not None:     # a tree's nodes become a sequence only through keep_path
            length, state.tree_at = min(length, state.tree_at), None
        del state.tokens[length:]

    def logits(self, state: TargetState, tokens: Sequence[int], first_row: int) -> np.ndarray:
        if len(tokens) > self.max_context:
            raise ValueError(f"{len(tokens)} tokens exceed the context of {self.max_context}")
        if state.tree_at is not None:
            self.rollback(state, state.tree_at)
        keep = min(common_prefix(state.tokens, tokens), first_row)
        self.rollback(state, keep)
        self.positions_computed += len(tokens) - keep
        self.passes += 1
        state.tokens.extend(tokens[keep:])
        return np.stack([self.language.logits(tokens[: i + 1]) for i in range(first_row, len(tokens))])

    supports_trees = True

    def logits_tree(self, state: TargetState, tokens: Sequence[int], first_row: int,
                    parents: Sequence[int]) -> np.ndarray:
        """A token tree's rows: the last len(parents) tokens are its nodes, each seen after its root path."""
        at = len(tokens) - len(parents)
        rows = self.logits(state, tokens[:at], first_row)
        paths: list[list[int]] = []
        for token, parent in zip(tokens[at:], parents):
            paths.append((paths[parent] if parent >= 0 else []) + [token])
        self.positions_computed += len(parents)
        state.tokens.extend(tokens[at:])
        state.tree_at = at
        return np.concatenate([rows] + [self.language.logits(list(tokens[:at]) + p)[None] for p in paths])

    def keep_path(self, state: TargetState, path: Sequence[int]) -> None:
        if state.tree_at is None:
            return
        at, nodes = state.tree_at, state.tokens[state.tree_at:]
        del state.tokens[at:]
        state.tokens.extend(nodes[i] for i in path)
        state.tree_at = None

    def logits_many(self, jobs):
        out = []
        for job in map(as_job, jobs):
            try:
                if job.parents:
                    out.append(self.logits_tree(*job))
                else:
                    out.append(self.logits(job.state, job.tokens, job.first_row))
            except Exception as exc:      # this session fails, the others' rows stand
                out.append(exc)
        return out


class ToyDrafter(_LogitsDrafter):
    """The edge's ``Drafter`` protocol over a ``ToyLanguage``. ``seconds_per_token`` makes it as slow as
    a real device (a sleep per drafted token); ``evaluated`` counts the positions it ran."""

    def __init__(self, language: ToyLanguage, max_context: int = 512, seconds_per_token: float = 0.0):
        self.language = language
        self.vocab_size, self.vocab_tokens = language.vocab_size, language.vocab_tokens
        self.eos_token_ids = frozenset({EOS})
        self.max_context = max_context
        self.threads = 1
        self.seconds_per_token = seconds_per_token
        self._tokens: list[int] = []
        self._cached = 0                  # context positions whose "KV" is kept (the common prefix)
        self.evaluated = 0

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.language.tokenize(text, add_bos)

    def token_bytes(self, token: int) -> bytes:
        return self.language.pieces[token]

    def set_context(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.max_context:
            raise ValueError(f"context of {len(tokens)} tokens exceeds the draft's {self.max_context}")
        self._cached = min(self._cached, common_prefix(self._tokens, tokens))
        self._tokens = list(tokens)

    def _logits(self) -> np.ndarray:
        self.evaluated += len(self._tokens) - self._cached
        self._cached = len(self._tokens)
        if self.seconds_per_token:
            if self._stop is None:
                time.sleep(self.seconds_per_token)
            elif self._stop.wait(self.seconds_per_token):     # interrupted midway, like llama.cpp's abort
                self._interrupted()
        return self.language.logits(self._tokens)


def toy_pair(noise: float = 1.5, vocab_size: int = 64, seed: int = 0) -> tuple[ToyLanguage, ToyLanguage]:
    """(target language, draft language): a draft that agrees with the target's argmax ~70% of the
    time at the default noise."""
    target = ToyLanguage(vocab_size, seed)
    return target, target.perturbed(noise, seed + 1)
