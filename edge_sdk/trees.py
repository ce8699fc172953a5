"""Token trees on the edge: which candidates a round sends, chosen best-first (no I/O here).

The target accepts at most one node per depth of a tree, so the tree's expected accepted length
is the sum, over its nodes, of the probability that the node is accepted -- the product, along its
root path, of the chance that the target's token is the node's. ``draft_tree`` estimates each factor
by the draft's own probability of the token (a node's *value*), and grows the tree best-first: it
admits candidates in decreasing value, so the tree it returns holds the most valuable nodes a tree
of that size can hold. A child is never worth more than its parent, so before admitting a candidate
it expands every admitted node that could still have a child worth more (the drafter's ``grow``:
several nodes in one decode); nodes never expanded are leaves, whose tokens came from their parent's
distribution at no cost of their own. Branches therefore appear where the draft is unsure (two
candidates of similar probability) and depth where it is sure, as the issue's measurements ask.

A chain is the special case: ``width`` 1 admits the draft's top token at each step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from .drafter import DraftToken, TreeFull, root_path

__all__ = ["TreeContext", "TreeShape", "draft_tree", "root_path"]


class TreeContext(Protocol):
    """What a drafter gives to grow a tree after its context (``LlamaCppDrafter.tree``)."""

    root: np.ndarray | None   # logits at the tree's first position (None on a chain: its tokens carry theirs)

    def grow(self, parents: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
        """Add nodes (parents: indices of nodes added before, -1 the context); each one's logits row."""


@dataclass(frozen=True)
class TreeShape:
    """How large a round's tree may grow. ``nodes``: the most nodes it holds; ``width``: candidates
    taken from each expanded node's distribution; ``batch``: nodes expanded per drafter call;
    ``min_value``: a node less likely than this to be accepted is left out (it costs a verifier row
    and bytes for almost nothing); ``max_depth``: levels at most (branches off a chain: levels below
    the chain); ``min_expand``: a node is expanded -- its children drafted, a drafter call -- only if
    it is at least this likely to be accepted."""

    nodes: int = 24
    width: int = 4
    batch: int = 4
    min_value: float = 0.02
    max_depth: int = 16
    min_expand: float = 0.0

    def __post_init__(self):
        if self.nodes < 1 or self.width < 1 or self.batch < 1 or self.max_depth < 1:
            raise ValueError("a tree shape needs nodes, width, batch and max_depth of at least 1")
        if not (0 <= self.min_value < 1 and 0 <= self.min_expand < 1):
            raise ValueError("min_value and min_expand are probabilities in [0, 1)")


@dataclass
class _Node:
    draft: DraftToken
    parent: int                   # index among the tree's nodes, -1 for the context
    value: float                  # estimated probability that the target accepts this node
    depth: int
    grown: int | None = None      # its index in the drafter's tree once expanded (its row computed)
    below: int = 0                # levels below the chain it branches off (0: a node of that chain; without
                                  # a chain, its depth + 1)


def _candidates(row: np.ndarray, width: int) -> list[tuple[int, float, float]]:
    """(token, its probability, the row's max probability) of the `width` likeliest tokens."""
    top = np.argpartition(-row, min(width, len(row) - 1))[:width] if width < len(row) else np.arange(len(row))
    p = np.exp(row - row.max())
    p /= p.sum()
    top = sorted(top, key=lambda t: -p[t])
    return [(int(t), float(p[t]), float(p[top[0]])) for t in top]


def draft_tree(tree: TreeContext | None, shape: TreeShape, *, max_depth: int | None = None,
               ends: Callable[[int], bool] = lambda token: False,
               chain: Sequence[DraftToken] = ()) -> tuple[list[DraftToken], list[int], list[float]]:
    """Grow a tree (see the module docstring): its nodes' tokens, their parents (-1: the context;
    every parent comes before its children) and their values. `max_depth` caps the levels below
    ``shape.max_depth`` (the output's remaining budget); `ends(token)`: a token after which nothing
    follows (EOS), never expanded.

    With a `chain` (a round's drafted chain, ``tree`` started on it: ``drafter.tree(len(chain))``), the
    tree starts as that chain -- its first nodes, returned first -- and grows branches off it (then
    ``shape.nodes`` counts the branch nodes, ``shape.max_depth`` the levels below the chain, and
    `max_depth` still the whole path's length): at each
    position the draft's runner-up (``DraftToken.alt``, no drafting) and, where a branch is worth
    expanding, what the draft drafts after it, up to ``shape.max_depth`` levels below the chain. The
    chain itself is never extended (where it ends is the round controller's choice). A tree that only
    takes runner-ups (``max_depth`` 1) draws nothing from the drafter: `tree` may be None."""
    levels = len(chain) + shape.max_depth          # (with a chain, shape.max_depth counts levels below it)
    depth_cap = levels if max_depth is None else min(levels, max_depth)
    nodes: list[_Node] = []
    heap: list[tuple[float, int, int, DraftToken, int]] = []      # (-value, tie, parent, draft, depth)
    tie = 0

    def push(value: float, parent: int, draft: DraftToken, depth: int) -> None:
        nonlocal tie
        tie += 1
        heapq.heappush(heap, (-value, tie, parent, draft, depth))

    def offer(row: np.ndarray, parent: int, value: float, depth: int) -> None:
        for token, p, p_max in _candidates(row, shape.width):
            push(value * p, parent, DraftToken(token, p_max, p), depth)

    if chain:
        reach = 1.0
        for j, d in enumerate(chain):
            if d.alt is not None and j < depth_cap:
                push(reach * d.p_alt, j - 1, DraftToken(d.alt, d.p_max, d.p_alt), j)
            reach *= d.confidence
            nodes.append(_Node(d, j - 1, reach, j, grown=j))
    elif depth_cap >= 1:
        offer(tree.root, -1, 1.0, 0)
    budget = shape.nodes + len(chain)
    full = False                      # the drafter has no room for more branches: leaves only from now
    while len(nodes) < budget:
        best = max(-heap[0][0] if heap else 0.0, shape.min_value, shape.min_expand)
        # Admitted nodes that could still have a child worth more than the best candidate (and worth
        # keeping) are expanded first; a chain's nodes are not (their runner-ups are offered already).
        due = [i for i, n in enumerate(nodes) if n.grown is None and n.value >= best and n.depth + 1 < depth_cap
               and n.below < shape.max_depth and not ends(n.draft.token)] if not full else []
        if due:
            due = sorted(due, key=lambda i: -nodes[i].value)[: shape.batch]
            try:
                rows = tree.grow([nodes[nodes[i].parent].grown if nodes[i].parent >= 0 else -1 for i in due],
                                 [nodes[i].draft.token for i in due])
            except TreeFull:
                full = True
                continue
            grown_before = sum(n.grown is not None for n in nodes)
            for j, (i, row) in enumerate(zip(due, rows)):
                nodes[i].grown = grown_before + j
                offer(row, i, nodes[i].value, nodes[i].depth + 1)
            continue
        if not heap or -heap[0][0] < shape.min_value:
            break
        neg, _, parent, draft, depth = heapq.heappop(heap)
        nodes.append(_Node(draft, parent, -neg, depth, below=nodes[parent].below + 1 if parent >= 0 else 1))
    return [n.draft for n in nodes], [n.parent for n in nodes], [n.value for n in nodes]
