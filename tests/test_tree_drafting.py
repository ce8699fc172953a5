"""Growing token trees on the edge: the best-first rule on a fake distribution (no model), and the
llama.cpp drafter's tree (branches on sequences) against plain chain drafting."""

import itertools

import numpy as np
import pytest

import pipesd_models
from edge_sdk.drafter import LlamaCppDrafter
from edge_sdk.trees import TreeShape, draft_tree, root_path


class FakeTree:
    """Rows that depend on the whole path (seeded), so every node has its own distribution."""

    def __init__(self, vocab=12, seed=0, sharp=3.0):
        self.vocab, self.seed, self.sharp = vocab, seed, sharp
        self.paths: list[tuple[int, ...]] = []
        self.calls = 0
        self.root = self.row(())

    def row(self, path):
        rng = np.random.default_rng(abs(hash((self.seed,) + tuple(path))) % 2**32)
        return (rng.normal(size=self.vocab) * self.sharp).astype(np.float32)

    def grow(self, parents, tokens):
        self.calls += 1
        rows = []
        for parent, token in zip(parents, tokens):
            assert -1 <= parent < len(self.paths)
            path = (self.paths[parent] if parent >= 0 else ()) + (token,)
            self.paths.append(path)
            rows.append(self.row(path))
        return rows


def probs(row):
    p = np.exp(row - row.max())
    return p / p.sum()


def all_values(fake, depth, width):
    """Every node reachable with `width` candidates a level: its value (product of probabilities)."""
    out = {}

    def walk(path, value):
        if len(path) >= depth:
            return
        p = probs(fake.row(path))
        for t in np.argsort(-p)[:width]:
            v = value * float(p[t])
            out[path + (int(t),)] = v
            walk(path + (int(t),), v)
    walk((), 1.0)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_the_tree_holds_the_most_valuable_nodes(seed):
    shape = TreeShape(nodes=10, width=3, batch=2, min_value=0.0, max_depth=4)
    fake = FakeTree(seed=seed)
    drafts, parents, values = draft_tree(fake, shape)
    assert len(drafts) == 10 and all(p < i for i, p in enumerate(parents))
    paths = [tuple(drafts[j].token for j in root_path(parents, i)) for i in range(len(drafts))]
    assert len(set(paths)) == len(paths)                       # siblings distinct
    every = all_values(FakeTree(seed=seed), 4, 3)
    for path, value in zip(paths, values):
        assert value == pytest.approx(every[path])
    best = sorted(every.values(), reverse=True)[:10]
    assert sorted(values, reverse=True) == pytest.approx(best)  # the top 10 of all reachable nodes
    assert values == sorted(values, reverse=True)               # admitted best first


def test_width_one_is_the_greedy_chain():
    fake = FakeTree(seed=3)
    drafts, parents, _ = draft_tree(fake, TreeShape(nodes=6, width=1, min_value=0.0))
    assert parents == [-1, 0, 1, 2, 3, 4]
    path = ()
    for d in drafts:
        assert d.token == int(np.argmax(fake.row(path)))
        path += (d.token,)


def test_the_tree_stops_at_worthless_nodes_at_the_depth_cap_and_after_an_end():
    fake = FakeTree(seed=1, sharp=0.1)                   # flat rows: every candidate is unlikely
    drafts, _, values = draft_tree(fake, TreeShape(nodes=20, width=4, min_value=0.2))
    assert drafts == [] and values == []
    drafts, parents, _ = draft_tree(FakeTree(seed=2), TreeShape(nodes=30, width=2, min_value=0.0), max_depth=2)
    assert max(len(root_path(parents, i)) for i in range(len(drafts))) <= 2
    fake = FakeTree(seed=2)
    first = int(np.argmax(fake.root))
    drafts, parents, _ = draft_tree(fake, TreeShape(nodes=30, width=1, min_value=0.0), ends=lambda t: t == first)
    assert [d.token for d in drafts] == [first] and fake.calls == 0


def test_a_shape_is_checked():
    with pytest.raises(ValueError):
        TreeShape(nodes=0)
    with pytest.raises(ValueError):
        TreeShape(min_value=1.0)


# -- the llama.cpp drafter ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafters():
    path = pipesd_models.pair_paths("embedded")[0]
    a, b = LlamaCppDrafter(path, threads=1), LlamaCppDrafter(path, threads=1)
    yield a, b
    a.close()
    b.close()


@pytest.mark.integration
def test_each_tree_node_gets_the_distribution_chain_drafting_gives_its_path(drafters):
    tree_drafter, plain = drafters
    context = tree_drafter.tokenize("def fibonacci(n):\n    if n < 2:\n")
    tree_drafter.set_context(context)
    tree = tree_drafter.tree()
    rows, grow = [], tree.grow
    tree.grow = lambda parents, tokens: rows.extend(grow(parents, tokens)) or rows[-len(tokens):]
    drafts, parents, _ = draft_tree(tree, TreeShape(nodes=20, width=3, batch=3, min_value=0.0, max_depth=5))
    assert len(tree.tokens) >= 5 and len(set(parents)) > 3          # branched, several nodes expanded
    for i in range(len(tree.tokens)):
        plain.set_context(context + tree._path_tokens(i))
        np.testing.assert_allclose(plain._logits(), rows[i], atol=5e-3)   # f16 weights, other batch shapes
    # every node's probability is the one its parent's row gives it
    for i, d in enumerate(drafts):
        plain.set_context(context + [drafts[j].token for j in root_path(parents, parents[i])])
        row = plain._logits()
        p = np.exp(row - row.max())
        assert d.p_token == pytest.approx(float(p[d.token] / p.sum()), abs=2e-3)


@pytest.mark.integration
def test_branches_off_a_drafted_chain_fork_its_cells_and_get_their_paths_distributions(drafters):
    """``tree(chain)`` on the chain just drafted: branches fork off its cells (nothing decoded again),
    every branch node's row equals chain drafting along its path, and chain drafting then goes on from
    the chain as if no tree had been grown (the next round drafted ahead) or from any branch."""
    tree_drafter, plain = drafters
    context = tree_drafter.tokenize("def fibonacci(n):\n    if n < 2:\n")
    tree_drafter.set_context(context)
    chain = [tree_drafter.next_token() for _ in range(5)]
    tree = tree_drafter.tree(len(chain))
    assert tree.tokens == [d.token for d in chain] and tree.base == len(context)
    rows, grow = {}, tree.grow
    tree.grow = lambda parents, tokens: [rows.setdefault(len(tree.tokens) - len(tokens) + i, r)
                                         for i, r in enumerate(grow(parents, tokens))]
    drafts, parents, _ = draft_tree(tree, TreeShape(nodes=12, width=2, batch=4, min_value=0.0, max_depth=3),
                                    chain=chain)
    assert len(drafts) == 17 and rows and min(rows) >= len(chain)
    for i, row in rows.items():
        plain.set_context(context + tree._path_tokens(i))
        np.testing.assert_allclose(plain._logits(), row, atol=5e-3)
    on = context + [d.token for d in chain]
    for accepted in (on, context + [drafts[j].token for j in root_path(parents, len(drafts) - 1)]):
        tree_drafter.set_context(accepted)
        plain.set_context(accepted)
        assert [tree_drafter.next_token().token for _ in range(4)] == [plain.next_token().token for _ in range(4)]


@pytest.mark.integration
def test_chain_drafting_after_a_tree_continues_from_any_accepted_branch(drafters):
    tree_drafter, plain = drafters
    context = tree_drafter.tokenize("import os\nimport sys\n\n")
    for pick in itertools.count():
        tree_drafter.set_context(context)
        tree = tree_drafter.tree()
        drafts, parents, _ = draft_tree(tree, TreeShape(nodes=16, width=3, batch=2, min_value=0.0, max_depth=4))
        if pick >= len(drafts):
            break
        accepted = context + [drafts[j].token for j in root_path(parents, pick)]
        tree_drafter.set_context(accepted)
        plain.set_context(accepted)
        assert [tree_drafter.next_token().token for _ in range(4)] == [plain.next_token().token for _ in range(4)]


@pytest.mark.integration
def test_a_tree_wider_than_the_drafters_sequences_stops_branching_and_keeps_its_leaves(drafters):
    tree_drafter, _ = drafters
    tree_drafter.set_context(tree_drafter.tokenize("x = "))
    tree = tree_drafter.tree()
    drafts, parents, values = draft_tree(tree, TreeShape(nodes=64, width=4, batch=4, min_value=0.0, max_depth=8))
    assert len(drafts) == 64 and all(p < i for i, p in enumerate(parents))
    assert tree_drafter._branches < LlamaCppDrafter.TREE_SEQUENCES      # it ran out of sequences, not memory
    assert len(set(parents)) - 1 <= len(tree.tokens)                     # every parent was grown (decoded)


def test_branches_off_a_chain_are_the_runner_ups_worth_their_row():
    from edge_sdk.drafter import DraftToken, choose_token

    row = np.log(np.array([0.05, 0.6, 0.3, 0.05], dtype=np.float32))
    d = choose_token(row, None, 0)
    assert (d.token, d.alt) == (1, 2) and d.p_alt == pytest.approx(0.3, rel=1e-5)
    chain = [DraftToken(1, 0.6, 0.6, alt=2, p_alt=0.3), DraftToken(5, 0.5, 0.5, alt=6, p_alt=0.4),
             DraftToken(7, 0.9, 0.9, alt=8, p_alt=0.05)]

    def leaves(min_value, nodes=8):     # runner-ups alone: no drafter needed
        drafts, parents, values = draft_tree(None, TreeShape(nodes=nodes, min_value=min_value, max_depth=1),
                                             chain=chain)
        assert drafts[:3] == chain and parents[:3] == [-1, 0, 1]          # the chain first, as it was
        return [x.token for x in drafts[3:]], parents[3:], values[3:]

    # values: 0.3 at the base, 0.6 * 0.4 = 0.24 after the first token, 0.6 * 0.5 * 0.05 = 0.015 after the second
    tokens, parents, values = leaves(0.1)
    assert tokens == [2, 6] and parents == [-1, 0] and values == pytest.approx([0.3, 0.24])
    assert leaves(0.0, nodes=1)[:2] == ([2], [-1])                     # the most valuable one when room is short
    assert leaves(0.5) == ([], [], [])


def test_branches_off_a_chain_grow_under_the_likeliest_runner_ups():
    """Branches below a chain: the chain's nodes are never extended; a runner-up worth expanding gets the
    draft's continuation, each node valued at its parent's value times its own probability, at most
    ``max_depth`` levels below the chain; the chain's nodes stay first and unchanged."""
    from edge_sdk.drafter import DraftToken

    fake = FakeTree(seed=3)
    chain, path, reach, reaches = [], (), 1.0, []
    for _ in range(4):                               # a chain drafted along the fake's first choices
        p = probs(fake.row(path))
        first, second = (int(t) for t in np.argsort(-p)[:2])
        chain.append(DraftToken(first, float(p[first]), float(p[first]), alt=second, p_alt=float(p[second])))
        reaches.append(reach)
        reach *= float(p[first])
        path += (first,)
        fake.paths.append(path)                      # the drafter's tree holds the chain as its first nodes
    drafts, parents, values = draft_tree(fake, TreeShape(nodes=12, width=2, min_value=0.0, max_depth=3),
                                         chain=chain)
    assert drafts[:4] == chain and parents[:4] == [-1, 0, 1, 2] and len(drafts) == 16
    paths, below = [], []
    for i, (d, parent) in enumerate(zip(drafts, parents)):
        assert parent < i and (i < 4 or parent != 3)       # the chain's last node gets no children
        paths.append((paths[parent] if parent >= 0 else ()) + (d.token,))
        below.append(0 if i < 4 else below[parent] + 1 if parent >= 4 else 1)
        if i >= 4 and below[i] == 1:                       # a runner-up of the chain
            assert d.token == chain[parent + 1].alt and values[i] == pytest.approx(reaches[parent + 1] * d.p_token)
        elif i >= 4:                                       # drafted below a branch: from its row
            p = probs(fake.row(paths[parent]))
            assert d.token in np.argsort(-p)[:2] and values[i] == pytest.approx(values[parent] * p[d.token])
    assert 1 < max(below) <= 3 and len(set(paths)) == len(paths)


@pytest.mark.integration
def test_a_tree_near_the_end_of_the_drafts_context_stops_growing_instead_of_failing():
    drafter = LlamaCppDrafter(pipesd_models.pair_paths("embedded")[0], n_ctx=64, threads=1)
    try:
        drafter.set_context((drafter.tokenize("x = ") * 40)[:58])     # 6 positions left: 24 nodes do not fit
        drafts, parents, _ = draft_tree(drafter.tree(), TreeShape(nodes=24, width=4, batch=4, min_value=0.0),
                                        max_depth=5)
        assert len(drafts) == 24 and max(len(root_path(parents, i)) for i in range(24)) <= 5
        tree = drafter.tree()
        with pytest.raises(ValueError, match="not a node of the tree yet"):   # a parent grown in the same call
            tree.grow([-1, 0], [5, 6])
        assert tree.tokens == [] and drafter._branches == 0                   # refused before changing anything
    finally:
        drafter.close()
