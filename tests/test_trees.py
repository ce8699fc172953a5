"""Token trees on the verifier side: the wire form, the acceptance rule, the torch target's tree pass
and KV compaction, and the verifier core answering tree rounds exactly as target-only greedy decoding."""

import random

import numpy as np
import pytest

import pipesd_models
from cloud_verifier.batching import ModelWorker
from cloud_verifier.nav import greedy_accept, greedy_accept_tree
from cloud_verifier.target import LlamaCppTarget, PassJob, TorchTarget
from privacy import (ErrorCode, FrameType, SamplingParams, VerifyRequest,
                     VerifyResponse, WireError, decode, encode, prefix_hash)
from privacy.messages import SessionOpened, SparseDist, check_tree, tree_depths

from .test_service import _opened, make


def logits_for(argmaxes, vocab=16):
    rows = np.zeros((len(argmaxes), vocab), dtype=np.float32)
    rows[np.arange(len(argmaxes)), argmaxes] = 1.0
    return rows


# -- the acceptance rule (no model) --------------------------------------------------------------
def test_the_walk_follows_the_child_the_target_would_produce():
    #        base -> 3 (node 0) -> 5 (node 2) -> 7 (node 3)
    #             -> 4 (node 1) -> 6 (node 4)
    nodes, parents = [3, 4, 5, 7, 6], [-1, -1, 0, 2, 1]
    # the target after: base -> 4, node1 (4) -> 6, node4 (6) -> 9; other rows point nowhere useful
    rows = logits_for([4, 0, 6, 0, 0, 9])
    assert greedy_accept_tree(nodes, parents, rows) == ([1, 4], 9)
    rows = logits_for([3, 5, 0, 7, 2, 0])              # base -> 3 -> 5 -> 7 -> 2 (bonus after a leaf)
    assert greedy_accept_tree(nodes, parents, rows) == ([0, 2, 3], 2)
    rows = logits_for([8, 5, 0, 7, 2, 0])              # no child of the base is the target's token
    assert greedy_accept_tree(nodes, parents, rows) == ([], 8)


def test_a_chain_written_as_a_tree_is_judged_as_the_chain():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 8))
        draft = [int(t) for t in rng.integers(0, 4, n)]
        rows = rng.normal(size=(n + 1, 4)).astype(np.float32)
        accepted, token = greedy_accept(draft, rows)
        path, tree_token = greedy_accept_tree(draft, list(range(-1, n - 1)), rows)
        assert (len(path), tree_token) == (accepted, token) and path == list(range(accepted))


def test_the_rule_checks_its_rows():
    with pytest.raises(ValueError):
        greedy_accept_tree([1, 2], [-1, -1], logits_for([1, 2]))


# -- the wire --------------------------------------------------------------------------------------
def roundtrip(req: VerifyRequest) -> VerifyRequest:
    return VerifyRequest.from_dict(decode(encode(req.to_dict())))


def test_a_tree_request_and_its_answer_round_trip():
    req = VerifyRequest(3, (), (10, 11, 12, 13), b"h" * 16, round=4, parents=(-1, -1, 0, 2))
    assert req.is_tree and roundtrip(req) == req
    assert req.to_dict()["tree"] == np.asarray([0, 0, 1, 3], "<u4").tobytes()    # parent + 1, 0 the base
    chain = VerifyRequest(3, (), (10, 11), b"h" * 16)
    assert "tree" not in chain.to_dict() and not roundtrip(chain).is_tree
    res = VerifyResponse(2, 9, 40, 1.5, node=3)
    assert VerifyResponse.from_dict(decode(encode(res.to_dict()))) == res
    assert "node" not in VerifyResponse(0, 9, 40, 1.5).to_dict()
    opened = SessionOpened("s", "m", "f", 2048, (1,), 64, 512, True, 32)
    assert SessionOpened.from_dict(decode(encode(opened.to_dict()))).tree_nodes == 32
    assert SessionOpened.from_dict(decode(encode(SessionOpened("s", "m", "f", 2048, (1,), 64, 512).to_dict()))).tree_nodes == 0


@pytest.mark.parametrize("body, says", [
    ({"tree": np.asarray([0, 0], "<u4").tobytes()}, "needs 3 parents"),             # too few parents
    ({"tree": np.asarray([0, 3, 1], "<u4").tobytes()}, "does not come before"),      # a parent after its child
    ({"tree": np.asarray([0, 2, 1], "<u4").tobytes()}, "does not come before"),      # its own parent: a cycle
    ({"tree": np.asarray([0, 1, 0xFFFFFFFF], "<u4").tobytes()}, "does not come before"),
    ({"tree": b""}, "parent for every draft token"),
    ({"tree": b"\x00\x00\x00"}, "packed little-endian"),
    ({"tree": [0, 0, 1]}, "wrong type"),
    ({"tree": np.asarray([0, 0, 1], "<u4").tobytes(), "draft": np.asarray([5, 5, 6], "<u4").tobytes()},
     "repeats a sibling"),
    ({"tree": np.asarray([0, 0, 1], "<u4").tobytes(), "final": False}, "one final batch"),
    ({"tree": np.asarray([0, 0, 1], "<u4").tobytes(), "offset": 2}, "one final batch"),
])
def test_malformed_trees_are_refused_with_a_reason(body, says):
    d = VerifyRequest(0, (0, 1), (5, 6, 7)).to_dict()
    d.update(body)
    with pytest.raises(WireError) as err:
        VerifyRequest.from_dict(d)
    assert err.value.code is ErrorCode.MALFORMED and says in str(err.value)


def test_depths_follow_parents():
    check_tree([1, 2, 3, 4], [-1, -1, 0, 2])
    assert tree_depths([-1, -1, 0, 2, 1]) == [0, 0, 1, 2, 1]


# -- the torch target -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target():
    return TorchTarget(pipesd_models.target_path(), threads=1)


def root_path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


NODES, PARENTS = [100, 200, 300, 400, 500, 600, 700], [-1, -1, 0, 2, 1, 0, 4]


@pytest.mark.integration
def test_each_node_sees_exactly_its_root_path(target):
    prefix = list(range(5, 45))
    rows = target.logits_many([PassJob(target.new_state(), prefix + NODES, len(prefix) - 1, PARENTS)])[0]
    assert rows.shape[0] == len(NODES) + 1
    plain = target.new_state()
    expected = [target.logits(plain, prefix, len(prefix) - 1)[0]]
    for i in range(len(NODES)):
        seq = prefix + [NODES[j] for j in root_path(PARENTS, i)]
        expected.append(target.logits(plain, seq, len(seq) - 1)[0])
    np.testing.assert_allclose(rows, np.stack(expected), atol=1e-4)


@pytest.mark.integration
def test_keeping_a_path_leaves_the_cache_of_the_plain_sequence(target):
    prefix = list(range(5, 45))
    state = target.new_state()
    target.logits_many([PassJob(state, prefix + NODES, len(prefix) - 1, PARENTS)])
    target.keep_path(state, [1, 4, 6])                  # 200 -> 500 -> 700, stored at wire slots 1, 4, 6
    assert state.tokens == prefix + [200, 500, 700] and state.tree_at is None
    seq = prefix + [200, 500, 700, 8, 9]
    ran = target.logits(state, seq, len(prefix))        # only 8 and 9 run: the path comes from the cache
    np.testing.assert_allclose(ran, target.logits(target.new_state(), seq, len(prefix)), atol=1e-4)


@pytest.mark.integration
def test_an_unkept_tree_is_forgotten_by_the_next_pass(target):
    prefix = list(range(5, 45))
    state = target.new_state()
    target.logits_many([PassJob(state, prefix + NODES, len(prefix) - 1, PARENTS)])
    seq = prefix + [100, 300, 7]                        # nodes 0 and 2 as a chain: must not reuse their keys
    np.testing.assert_allclose(target.logits(state, seq, len(prefix) - 1),
                               target.logits(target.new_state(), seq, len(prefix) - 1), atol=1e-4)


@pytest.mark.integration
def test_trees_and_chains_share_one_batched_pass(target):
    a, b = list(range(5, 45)), list(range(60, 130))
    alone = [target.logits_many([PassJob(target.new_state(), a + NODES, len(a) - 1, PARENTS)])[0],
             target.logits(target.new_state(), b + [3, 4], len(b) - 1),
             target.logits_many([PassJob(target.new_state(), b + NODES[:3], len(b) - 1, PARENTS[:3])])[0]]
    together = target.logits_many([PassJob(target.new_state(), a + NODES, len(a) - 1, PARENTS),
                                   PassJob(target.new_state(), b + [3, 4], len(b) - 1),
                                   PassJob(target.new_state(), b + NODES[:3], len(b) - 1, PARENTS[:3])])
    for mine, ref in zip(together, alone):
        np.testing.assert_allclose(mine, ref, atol=1e-4)


# -- the verifier core ------------------------------------------------------------------------------
def connect(service, key):
    """A new session: its channel and what OPENED said."""
    ch, reply = _opened(service, key)
    return ch, SessionOpened.from_dict(ch.open(reply)[1])


def nav(service, ch, req):
    status, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, req.to_dict()))
    assert status == 200
    return VerifyResponse.from_dict(ch.open(reply)[1])


def refusal(service, ch, req):
    """The typed error a sealed VERIFY gets: (HTTP status, error code)."""
    status, reply, ftype = service.handle_frame(ch.seal(FrameType.VERIFY, req.to_dict()))
    assert ftype is FrameType.ERROR
    return status, ch.open(reply)[1]["error"]["code"]


def greedy(target, prompt, n):
    """Target-only greedy decoding, one token a pass."""
    state, seq = target.new_state(), list(prompt)
    for _ in range(n):
        seq.append(int(target.logits(state, seq, len(seq) - 1)[-1].argmax()))
    return seq[len(prompt):]


def top_tokens(target, seq, k):
    return [int(t) for t in np.argsort(-target.logits(target.new_state(), seq, len(seq) - 1)[-1])[:k]]


def random_tree(rng, target, prefix, reference, nodes_max):
    """A tree that holds a stretch of the target's own continuation among distractors."""
    nodes, parents = [], []
    spine, at = rng.randint(0, 6), -1
    for depth in range(spine):                    # the target's own tokens, as deep as `spine`
        nodes.append(reference[depth])
        parents.append(at)
        at = len(nodes) - 1
    while len(nodes) < nodes_max and rng.random() < 0.85:
        parent = rng.randrange(-1, len(nodes))
        taken = {t for t, p in zip(nodes, parents) if p == parent}
        token = rng.randrange(target.vocab_size)
        if token not in taken:
            nodes.append(token)
            parents.append(parent)
    order = sorted(range(len(nodes)), key=lambda i: (tree_depths(parents)[i], rng.random()))   # shuffle levels
    where = {old: new for new, old in enumerate(order)}
    return [nodes[i] for i in order], [where[parents[i]] if parents[i] >= 0 else -1 for i in order]


@pytest.mark.integration
def test_tree_rounds_commit_what_target_greedy_decoding_would(target):
    service, key = make(target)
    ch, opened = connect(service, key)
    assert opened.tree_nodes == 64
    prompt = [0] + list(range(40, 70))
    reference = greedy(target, prompt, 48)
    rng, committed, answers = random.Random(7), [], []
    req = VerifyRequest(0, tuple(prompt), ())
    res = nav(service, ch, req)
    committed = prompt + [res.token]
    while len(committed) - len(prompt) < 40:
        done = len(committed) - len(prompt)
        nodes, parents = random_tree(rng, target, committed, reference[done:], 12)
        res = nav(service, ch, VerifyRequest(len(committed), (), tuple(nodes), prefix_hash(committed),
                                             parents=tuple(parents)))
        path = root_path(parents, res.node) if res.node is not None else []
        assert res.accepted == len(path)
        committed += [nodes[i] for i in path] + [res.token]
        assert res.committed_len == len(committed)
        assert committed[len(prompt):] == reference[: len(committed) - len(prompt)]
        answers.append(res.accepted)
    assert max(answers) >= 3                          # deep paths were accepted, not only the base's child
    # and a chain round after the trees still finds the cache it expects
    res = nav(service, ch, VerifyRequest(len(committed), (), tuple(reference[len(committed) - len(prompt):][:3]),
                                         prefix_hash(committed)))
    assert res.accepted == 3


@pytest.mark.integration
def test_tree_rounds_of_two_sessions_run_in_one_pass(target):
    service, key = make(target)
    worker = ModelWorker(max_batch=8, max_wait_s=0.0, in_flight=lambda: 0)
    passes = []

    def logits_many(jobs):
        passes.append(sum(bool(job[3]) for job in jobs))      # tree jobs in this pass
        return target.logits_many(jobs)

    worker.logits_many = logits_many
    sessions = []
    for prompt in ([0] + list(range(40, 60)), [0] + list(range(300, 330))):
        ch, _ = connect(service, key)
        first = nav(service, ch, VerifyRequest(0, tuple(prompt), ()))
        committed = prompt + [first.token]
        sessions.append((ch, committed, greedy(target, committed, 4)))
    gate = __import__("threading").Event()
    worker.submit(gate.wait)                          # hold the worker so both frames join one cycle
    futures = []
    for ch, committed, ref in sessions:
        top = top_tokens(target, committed, 2)
        wrong = next(t for t in top + [7, 8] if t != ref[0])
        nodes, parents = [wrong, ref[0], ref[1], 5], [-1, -1, 1, 0]
        frame = ch.seal(FrameType.VERIFY, VerifyRequest(len(committed), (), tuple(nodes), prefix_hash(committed),
                                                        parents=tuple(parents)).to_dict())
        futures.append(worker.submit(service.open_and_dispatch, frame, key=ch.session_id))
    gate.set()
    for (ch, committed, ref), future in zip(sessions, futures):
        status, reply, _ = future.result(30)
        res = VerifyResponse.from_dict(ch.open(reply)[1])
        assert (res.accepted, res.node, res.token) == (2, 2, ref[2])
    worker.stop()
    assert passes == [2]                              # both trees in one target pass


@pytest.mark.integration
def test_what_a_verifier_cannot_verify_gets_a_typed_refusal(target):
    service, key = make(target, max_tree_nodes=4)
    ch, opened = connect(service, key)
    assert opened.tree_nodes == 4
    prompt = (0, 40, 41, 42)
    first = nav(service, ch, VerifyRequest(0, prompt, ()))
    committed = list(prompt) + [first.token]
    base = dict(base_len=len(committed), append=(), prefix_hash=prefix_hash(committed))
    big = VerifyRequest(**base, draft=(1, 2, 3, 4, 5), parents=(-1, -1, -1, -1, -1))
    q = SparseDist.quantize(np.array([1, 2]), np.array([0.5, 0.5]))
    sampled = VerifyRequest(**base, draft=(1, 2), parents=(-1, -1), sampling=SamplingParams(0.8, 0, 1.0, 3), q=(q, q))
    for req, code in ((big, ErrorCode.DRAFT_TOO_LONG), (sampled, ErrorCode.TREE_UNSUPPORTED)):
        assert refusal(service, ch, req) == (422, code.value)
    # nothing was lost: the session still verifies from where it was
    assert nav(service, ch, VerifyRequest(**base, draft=())).committed_len == len(committed) + 1
    off, key = make(target, max_tree_nodes=0)
    ch, opened = connect(off, key)
    assert opened.tree_nodes == 0
    assert refusal(off, ch, VerifyRequest(0, prompt, (1, 2), parents=(-1, -1))) == (422, "tree_unsupported")


@pytest.mark.integration
def test_the_llamacpp_target_refuses_trees_as_unsupported():
    target = LlamaCppTarget(pipesd_models.pair_paths("embedded")[1], threads=1, contexts=1)
    try:
        service, key = make(target)
        ch, opened = connect(service, key)
        assert opened.tree_nodes == 0
        status, reply, _ = service.handle_frame(ch.seal(FrameType.VERIFY, VerifyRequest(0, (0, 5, 6), (1, 2),
                                                                                        parents=(-1, -1)).to_dict()))
        error = ch.open(reply)[1]["error"]
        assert (status, error["code"]) == (422, "tree_unsupported") and "chains only" in error["message"]
    finally:
        target.close()


def reference_walk(target, committed, nodes, parents):
    """What target-only greedy decoding says of a tree, from plain one-sequence passes: (path, token)."""
    state, path, at = target.new_state(), [], -1
    while True:
        seq = committed + [nodes[i] for i in path]
        token = int(target.logits(state, seq, len(seq) - 1)[-1].argmax())
        child = next((i for i, (t, p) in enumerate(zip(nodes, parents)) if p == at and t == token), None)
        if child is None:
            return path, token
        path.append(child)
        at = child


@pytest.mark.integration
def test_fuzzed_tree_frames_get_typed_answers_and_valid_ones_the_greedy_answer(target):
    """Seeded and bounded: up to 300 tree frames, well-formed or not (parents after their children, cycles,
    repeated siblings, wrong lengths, over-deep and oversized trees, garbage in the field). Each gets
    200 or a typed 4xx; the session loses nothing; every answered tree equals the plain-pass walk."""
    service, key = make(target, max_tree_nodes=12)
    ch, _ = connect(service, key)
    rng = random.Random(11)
    prompt = [0] + list(range(80, 100))
    committed = prompt + [nav(service, ch, VerifyRequest(0, tuple(prompt), ())).token]
    reference = greedy(target, committed, 200)
    seen = {"ok": 0, "malformed": 0, "draft_too_long": 0}
    for _ in range(300):
        done = len(committed) - len(prompt) - 1
        nodes, parents = random_tree(rng, target, committed, reference[done:], rng.choice([4, 12, 20]))
        if not nodes:
            nodes, parents = [reference[done]], [-1]
        d = VerifyRequest(len(committed), (), tuple(nodes), prefix_hash(committed), parents=tuple(parents)).to_dict()
        kind = rng.random()
        if kind < 0.1:                             # a parent at or after its child (a cycle, or a forward edge)
            i = rng.randrange(len(nodes))
            bad = list(parents)
            bad[i] = rng.choice([i, i + 1, len(nodes) + 5])
            d["tree"] = np.asarray([p + 1 for p in bad], "<u4").tobytes()
        elif kind < 0.15 and len(nodes) > 1:       # one parent too few
            d["tree"] = d["tree"][:-4]
        elif kind < 0.2:                           # garbage bytes
            d["tree"] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
        elif kind < 0.25 and len(nodes) > 1:       # a repeated sibling
            d["draft"] = np.asarray(nodes + [nodes[0]], "<u4").tobytes()
            d["tree"] = np.asarray([p + 1 for p in parents] + [parents[0] + 1], "<u4").tobytes()
        elif kind < 0.3:                           # over-deep: a chain longer than the node limit
            chain = [rng.randrange(2048) for _ in range(13)]
            d["draft"] = np.asarray(chain, "<u4").tobytes()
            d["tree"] = np.asarray(range(13), "<u4").tobytes()
        status, reply, ftype = service.handle_frame(ch.seal(FrameType.VERIFY, d))
        body = ch.open(reply)[1]
        if ftype is FrameType.ERROR:
            assert 400 <= status < 500 and body["error"]["code"] in seen, body
            seen[body["error"]["code"]] += 1
            continue
        assert status == 200
        res = VerifyResponse.from_dict(body)
        sent = VerifyRequest.from_dict(d)
        path, token = reference_walk(target, committed, list(sent.draft), list(sent.parents))
        assert (res.accepted, res.token, res.node) == (len(path), token, path[-1] if path else None)
        committed += [sent.draft[i] for i in path] + [token]
        assert committed[len(prompt) + 1:] == reference[: len(committed) - len(prompt) - 1]
        seen["ok"] += 1
        if len(committed) - len(prompt) > 180:
            break
    assert seen["ok"] >= 40 and seen["malformed"] >= 10 and seen["draft_too_long"] >= 10, seen
