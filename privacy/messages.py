"""Message schemas of the edge <-> verifier protocol.

Token ids travel as packed little-endian uint32 (4 bytes a token, no per-item
msgpack overhead). Every ``from_dict`` validates types and ranges and raises
``WireError(MALFORMED)`` on anything unexpected, so handlers only see clean values.
"""

from __future__ import annotations

import math

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ErrorCode, WireError
from .sampling import SamplingParams, SparseDist

PROTOCOL_VERSION = 1


def pack_tokens(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


def unpack_tokens(data: Any, field: str) -> tuple[int, ...]:
    if not isinstance(data, (bytes, bytearray)) or len(data) % 4:
        raise WireError(ErrorCode.MALFORMED, f"'{field}' must be packed little-endian uint32 bytes")
    return tuple(np.frombuffer(data, dtype="<u4").tolist())


def prefix_hash(tokens: Sequence[int]) -> bytes:
    """BLAKE2b-128 of the packed token ids: names a committed prefix without sending it."""
    return hashlib.blake2b(pack_tokens(tokens), digest_size=16).digest()


def vocab_fingerprint(tokens: Sequence[str]) -> str:
    """Identity of a vocabulary: the ordered token strings, hashed. Equal fingerprints = same ids."""
    return hashlib.sha256(json.dumps(list(tokens), ensure_ascii=False).encode()).hexdigest()[:32]


def _field(d: dict, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in d:
        if default is ...:
            raise WireError(ErrorCode.MALFORMED, f"missing field '{name}'")
        return default
    value = d[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(ErrorCode.MALFORMED, f"field '{name}' has the wrong type")
    return value


def _count(d: dict, name: str) -> int:
    value = _field(d, name, int)
    if value < 0:
        raise WireError(ErrorCode.MALFORMED, f"field '{name}' must be >= 0")
    return value


@dataclass(frozen=True)
class OpenSession:
    """Edge -> verifier: start a session for a draft with this vocabulary."""

    vocab_fingerprint: str
    vocab_size: int
    version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict:
        return {"v": self.version, "vocab_fingerprint": self.vocab_fingerprint, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> "OpenSession":
        return cls(_field(d, "vocab_fingerprint", str), _count(d, "vocab_size"), _field(d, "v", int))


@dataclass(frozen=True)
class SessionOpened:
    """Verifier -> edge: the session id and what the target accepts."""

    session_id: str
    model: str
    vocab_fingerprint: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_draft: int
    max_context: int
    rebase: bool = False      # answers a failed conditional round as the target's next token (VerifyRequest)
    tree_nodes: int = 0       # the most nodes a token tree may have (VerifyRequest.parents); 0: chains only

    def to_dict(self) -> dict:
        d = {"session_id": self.session_id, "model": self.model, "vocab_fingerprint": self.vocab_fingerprint,
             "vocab_size": self.vocab_size, "eos": pack_tokens(self.eos_token_ids),
             "max_draft": self.max_draft, "max_context": self.max_context}
        if self.rebase:
            d["rebase"] = True
        if self.tree_nodes:
            d["tree_nodes"] = self.tree_nodes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SessionOpened":
        return cls(_field(d, "session_id", str), _field(d, "model", str), _field(d, "vocab_fingerprint", str),
                   _count(d, "vocab_size"), unpack_tokens(_field(d, "eos", bytes), "eos"),
                   _count(d, "max_draft"), _count(d, "max_context"), _field(d, "rebase", bool, False),
                   _count(d, "tree_nodes") if "tree_nodes" in d else 0)


@dataclass(frozen=True)
class VerifyRequest:
    """Edge -> verifier: one batch of a round's draft; the round's last batch (``final``) asks for NAV.

    ``base_len`` is how many committed tokens the edge believes the verifier holds and
    ``prefix_hash`` their hash (``prefix_hash(committed[:base_len])``, empty when 0);
    a verifier holding anything else answers RESYNC. ``append`` are committed tokens
    the verifier has not seen yet (the prompt, or the whole prefix after a resync).
    ``draft`` are this batch's draft tokens; they sit at ``offset`` in the round's draft,
    after the batches sent before (a round sent in one piece has offset 0). An empty
    final draft asks the target for its next token alone (cloud-only decoding).

    ``conditional``: a final batch sent while the round before it is still being verified (pipelined
    NAV). The round names the base that round's verdict would leave if everything was accepted and
    the target's token is the one the edge assumed; the verifier runs it as soon as that holds, and
    answers RESYNC if it does not (the edge has dropped it by then; it is not counted as a resync).
    ``after`` (with ``conditional``, to a verifier whose ``SessionOpened.rebase`` is set): the round
    it was drafted on top of. When the assumption fails and the last round the verifier answered is
    exactly that one, answered as drafted (not itself rebased), the verifier does not drop the round
    but *rebases* it: it answers it as an empty round on what it holds -- the target's next token,
    ``VerifyResponse.rebased`` set -- so the round trip already spent on it is not lost; the edge,
    which sees the same verdict, expects exactly that answer. Rebased answers never chain: at most
    one per verdict, so the target never decodes on its own beyond one token.

    A **token tree** (``parents`` set, to a verifier whose ``SessionOpened.tree_nodes`` allows it): the
    draft is a tree's nodes in an order where every node comes after its parent, and ``parents[i]`` is
    the index of node i's parent in the draft, -1 for a node that follows the base directly (the
    round's first position may have several candidates). Siblings carry distinct tokens. The verifier
    runs the whole tree in one target pass and accepts the longest root path that the target's greedy
    decoding would produce; ``VerifyResponse.node`` names the deepest node on it. A tree goes up in
    one final batch (offset 0) and is greedy only. An empty ``parents`` is a chain, as before.

    Sampling (``sampling`` set, temperature > 0): ``q`` carries, per draft token, the draft's
    truncated distribution it was sampled from (sparse: support ids + float16 probabilities), and
    the verifier applies the speculative-sampling rule instead of argmax matching. Greedy requests
    carry neither (the wire stays ids only).
    """

    base_len: int
    append: tuple[int, ...]
    draft: tuple[int, ...]
    prefix_hash: bytes = b""
    round: int = 0
    offset: int = 0
    final: bool = True
    sampling: SamplingParams | None = None
    q: tuple[SparseDist, ...] = ()
    conditional: bool = False
    after: int | None = None
    parents: tuple[int, ...] = ()

    @property
    def is_tree(self) -> bool:
        return bool(self.parents)

    def to_dict(self) -> dict:
        d = {"base_len": self.base_len, "prefix_hash": self.prefix_hash, "append": pack_tokens(self.append),
             "draft": pack_tokens(self.draft), "round": self.round, "offset": self.offset, "final": self.final}
        if self.conditional:
            d["cond"] = True
        if self.after is not None:
            d["after"] = self.after
        if self.parents:
            d["tree"] = pack_tokens([p + 1 for p in self.parents])     # 0: a child of the base
        if self.sampling is not None and not self.sampling.greedy:
            d["s"] = self.sampling.to_dict()
            d["q_n"] = pack_tokens([len(q) for q in self.q])
            d["q_ids"] = b"".join(q.ids.astype("<u4").tobytes() for q in self.q)
            d["q_p"] = b"".join(q.p16.astype("<f2").tobytes() for q in self.q)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VerifyRequest":
        req = cls(_count(d, "base_len"), unpack_tokens(_field(d, "append", bytes), "append"),
                  unpack_tokens(_field(d, "draft", bytes), "draft"), _field(d, "prefix_hash", bytes, b""),
                  _count(d, "round") if "round" in d else 0, _count(d, "offset") if "offset" in d else 0,
                  _field(d, "final", bool, True), *_sampling_from(d), _field(d, "cond", bool, False),
                  _count(d, "after") if "after" in d else None, _tree_from(d))
        if req.parents:
            check_tree(req.draft, req.parents)
            if not req.final or req.offset:
                raise WireError(ErrorCode.MALFORMED, "a token tree goes up in one final batch (offset 0)")
        if req.after is not None and not (req.conditional and req.final):
            raise WireError(ErrorCode.MALFORMED, "'after' belongs to a conditional final batch only")
        if len(req.prefix_hash) != (16 if req.base_len else 0):
            raise WireError(ErrorCode.MALFORMED, "'prefix_hash' must be 16 bytes when base_len > 0, else empty")
        if req.sampling is not None and len(req.q) != len(req.draft):
            raise WireError(ErrorCode.MALFORMED, "a sampled draft needs one q distribution per draft token")
        for token, q in zip(req.draft, req.q):
            if q.prob_of(token) <= 0.0:
                raise WireError(ErrorCode.MALFORMED, "a draft token lies outside the q it was sampled from")
        return req


def _tree_from(d: dict) -> tuple[int, ...]:
    if "tree" not in d:
        return ()
    encoded = unpack_tokens(_field(d, "tree", bytes), "tree")
    if not encoded:
        raise WireError(ErrorCode.MALFORMED, "'tree' must name a parent for every draft token")
    return tuple(e - 1 for e in encoded)


def check_tree(nodes: Sequence[int], parents: Sequence[int]) -> None:
    """A well-formed token tree, or WireError(MALFORMED) saying what is wrong: one parent per node,
    each parent before its child (-1: the base), so no cycle can be written, and siblings distinct."""
    if len(parents) != len(nodes):
        raise WireError(ErrorCode.MALFORMED, f"a tree of {len(nodes)} nodes needs {len(nodes)} parents, "
                        f"got {len(parents)}")
    seen: set[tuple[int, int]] = set()
    for i, (token, parent) in enumerate(zip(nodes, parents)):
        if not -1 <= parent < i:
            raise WireError(ErrorCode.MALFORMED, f"node {i}'s parent {parent} does not come before it "
                            "(parents precede their children; -1 is the base)")
        if (parent, token) in seen:
            raise WireError(ErrorCode.MALFORMED, f"node {i} repeats a sibling's token {token}")
        seen.add((parent, token))


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Each node's depth (0: a child of the base) in a well-formed tree."""
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


def _sampling_from(d: dict) -> tuple[SamplingParams | None, tuple[SparseDist, ...]]:
    """Sampling parameters and the sparse q rows of a request; every malformation is a WireError."""
    if "s" not in d:
        return None, ()
    s = _field(d, "s", dict)
    try:
        params = SamplingParams(float(_field(s, "t", (int, float))), _count(s, "k"), float(_field(s, "p", (int, float))),
                                _count(s, "seed"))
    except ValueError as exc:
        raise WireError(ErrorCode.MALFORMED, f"bad sampling parameters: {exc}") from None
    if params.greedy:
        raise WireError(ErrorCode.MALFORMED, "temperature 0 is greedy: send no sampling block")
    sizes = unpack_tokens(_field(d, "q_n", bytes), "q_n")
    ids, p16 = _field(d, "q_ids", bytes), _field(d, "q_p", bytes)
    if len(ids) != 4 * sum(sizes) or len(p16) != 2 * sum(sizes) or any(n == 0 for n in sizes):
        raise WireError(ErrorCode.MALFORMED, "'q_ids'/'q_p' do not match the support sizes in 'q_n'")
    all_ids = np.frombuffer(ids, dtype="<u4")
    all_p = np.frombuffer(p16, dtype="<f2")
    if not np.all(np.isfinite(all_p)) or np.any(all_p < 0):
        raise WireError(ErrorCode.MALFORMED, "q probabilities must be finite and >= 0")
    rows, at = [], 0
    for n in sizes:
        row = SparseDist(all_ids[at: at + n].astype(np.uint32), all_p[at: at + n].astype(np.float16))
        if row.p16.astype(np.float64).sum() <= 0 or len(np.unique(row.ids)) != n:
            raise WireError(ErrorCode.MALFORMED, "each q must have positive mass and distinct ids")
        rows.append(row)
        at += n
    return params, tuple(rows)


@dataclass(frozen=True)
class BatchAck:
    """Verifier -> edge, for a non-final batch: did it join the round (``staged``), and how many tokens
    of the round the verifier now holds. A refused batch (stale round, base mismatch, out of order)
    changes nothing; the edge resends from ``held`` in its final batch."""

    round: int
    staged: bool
    held: int

    def to_dict(self) -> dict:
        return {"round": self.round, "staged": self.staged, "held": self.held}

    @classmethod
    def from_dict(cls, d: dict) -> "BatchAck":
        return cls(_count(d, "round"), _field(d, "staged", bool), _count(d, "held"))


@dataclass(frozen=True)
class VerifyResponse:
    """Verifier -> edge: how many draft tokens the target accepted and its own next token.

    ``token`` is the correction at the first rejected position, or the bonus token
    after the last draft token when all were accepted. ``committed_len`` is the
    verifier's committed length after this round (base + append + accepted + 1).
    ``rebased``: a conditional round whose assumption failed, answered as an empty round on the
    committed sequence the verifier held (``accepted`` 0, ``token`` the target's next one).
    """

    accepted: int
    token: int
    committed_len: int
    verify_ms: float
    queue_ms: float = 0.0     # how long the final batch waited at the verifier before it was verified
                              # (behind the round before it, or other sessions' passes); absent when 0
    rebased: bool = False
    node: int | None = None   # a tree round with an accepted node: the deepest one (its path is accepted)

    def to_dict(self) -> dict:
        d = {"accepted": self.accepted, "token": self.token, "committed_len": self.committed_len,
             "verify_ms": self.verify_ms}
        if self.queue_ms > 0:
            d["queue_ms"] = self.queue_ms
        if self.rebased:
            d["rebased"] = True
        if self.node is not None:
            d["node"] = self.node
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VerifyResponse":
        queue = float(_field(d, "queue_ms", (int, float), 0.0))
        if not math.isfinite(queue) or queue < 0:
            raise WireError(ErrorCode.MALFORMED, "field 'queue_ms' must be a finite number >= 0")
        return cls(_count(d, "accepted"), _count(d, "token"), _count(d, "committed_len"),
                   float(_field(d, "verify_ms", (int, float))), queue, _field(d, "rebased", bool, False),
                   _count(d, "node") if "node" in d else None)
