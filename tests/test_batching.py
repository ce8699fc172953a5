"""Batched NAV across sessions: the KV pool, the model worker, and losslessness under shared batches.

The pool and target tests use the real embedded target (transformers); the worker tests use
plain functions (the worker's logic has no I/O); the end-to-end tests run real edge clients
in threads against a real verifier process, so sessions really share forward passes.
"""

from __future__ import annotations

import random
import re
import threading
import time

import httpx
import numpy as np
import pytest
import torch

import pipesd_models
from cloud_verifier import LocalVerifier
from cloud_verifier.batching import ModelWorker
from cloud_verifier.settings import VerifierSettings
from cloud_verifier.target import TorchTarget
from edge_sdk import EdgeClient

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


# -- the pool inside the torch target ---------------------------------------------------------
@pytest.fixture(scope="module")
def target():
    return TorchTarget(pipesd_models.target_path(), threads=1, kv_slots=4)


def full_forward(target, tokens, first_row):
    """The target on the whole sequence, no cache at all: what every pooled row must match."""
    with torch.inference_mode():
        return target.model(input_ids=torch.tensor([tokens])).logits[0, first_row:].numpy()


def test_batched_rows_equal_unbatched_forward(target):
    rng = np.random.default_rng(0)
    seqs = [list(map(int, rng.integers(3, 2000, size=n))) for n in (3, 40, 17, 90)]
    states = [target.new_state() for _ in seqs]
    # Prefill of different lengths in one call (grouped by length), then three rounds of
    # 4-token drafts with a different rollback per row, as NAV does.
    outs = target.logits_many([(s, q, len(q) - 1) for s, q in zip(states, seqs)])
    for out, q in zip(outs, seqs):
        assert np.abs(out - full_forward(target, q, len(q) - 1)).max() < 1e-4
    for _ in range(3):
        jobs = [(s, q + list(map(int, rng.integers(3, 2000, size=4))), len(q) - 1) for s, q in zip(states, seqs)]
        outs = target.logits_many(jobs)
        for out, (_, tokens, first) in zip(outs, jobs):
            assert out.shape == (len(tokens) - first, target.vocab_size)
            assert np.abs(out - full_forward(target, tokens, first)).max() < 1e-4
            assert (out.argmax(-1) == full_forward(target, tokens, first).argmax(-1)).all()
        for i, (state, tokens, _) in enumerate(jobs):
            accepted = int(rng.integers(0, 5))
            target.rollback(state, len(seqs[i]) + accepted)
            seqs[i] = tokens[: len(seqs[i]) + accepted] + [int(rng.integers(3, 2000))]
            assert state.tokens == seqs[i][:-1]


def test_rows_of_different_lengths_share_a_padded_pass(target):
    """Tails of 5 and 7 tokens run as one right-padded pass; a row near the end of the pool's length
    is never padded past it (it goes in a narrower pass)."""
    rng = np.random.default_rng(2)
    ran = []
    hook = target.model.get_input_embeddings().register_forward_pre_hook(lambda _, a: ran.append(tuple(a[0].shape)))
    try:
        seqs = [list(map(int, rng.integers(3, 2000, size=n))) for n in (30, 60, 12, target.pool.max_len - 3)]
        states = [target.new_state() for _ in seqs]
        for state, q in zip(states, seqs):
            target.logits(state, q, len(q) - 1)
        ran.clear()
        tails = [2, 5, 7, 2]
        jobs = [(s, q + list(map(int, rng.integers(3, 2000, size=t - 1))), len(q) - 1)
                for s, q, t in zip(states, seqs, tails)]
        outs = target.logits_many(jobs)
        # The near-full row (start 508 of 512) shares a 2-wide pass, never the 7-wide one.
        assert sorted(ran) == [(2, 2), (2, 7)]
        for out, (_, tokens, first) in zip(outs, jobs):
            assert np.abs(out - full_forward(target, tokens, first)).max() < 1e-4
    finally:
        hook.remove()
        for state in states:
            target.release(state)


def test_a_session_that_loses_its_slot_recomputes_its_prefix(target):
    rng = np.random.default_rng(1)
    seqs = [list(map(int, rng.integers(3, 2000, size=30))) for _ in range(6)]   # 6 sessions, 4 slots
    states = [target.new_state() for _ in seqs]
    before = target.pool.evictions
    for state, q in zip(states, seqs):
        target.logits(state, q, len(q) - 1)
    assert target.pool.evictions >= before + 2
    assert states[0].cache is None and states[0].tokens == []      # the least recently used lost its slot
    out = target.logits(states[0], seqs[0] + [5, 6], len(seqs[0]) - 1)
    assert np.abs(out - full_forward(target, seqs[0] + [5, 6], len(seqs[0]) - 1)).max() < 1e-4
    assert states[0].tokens == seqs[0] + [5, 6]
    for state in states:
        target.release(state)
    assert not target.pool.owners and sorted(target.pool.free) == list(range(target.pool.slots))


def test_a_pass_never_evicts_a_session_of_the_same_call(target):
    rng = np.random.default_rng(3)
    seqs = [list(map(int, rng.integers(3, 2000, size=10))) for _ in range(4)]
    states = [target.new_state() for _ in seqs]
    for state, q in zip(states, seqs):            # fill the four slots; states[0] is the least recent
        target.logits(state, q, len(q) - 1)
    newcomer, before = target.new_state(), target.pool.evictions
    target.logits_many([(newcomer, [5, 6, 7], 2), (states[0], seqs[0] + [9], len(seqs[0]) - 1)])
    assert target.pool.evictions == before + 1
    assert states[0].tokens == seqs[0] + [9]      # kept its slot: states[1] made room instead
    assert states[1].cache is None
    for state in states + [newcomer]:
        target.release(state)


def test_the_pool_stays_within_its_bytes_when_one_session_grows_long():
    """Every slot has the longest row's capacity, so one long session would make every slot long. Within
    ``max_bytes`` the pool keeps fewer slots instead: the sessions of the pass keep theirs (their keys
    moved, not lost), the least recently used others lose theirs, and every row stays exact."""
    t = TorchTarget(pipesd_models.target_path(), threads=1, kv_slots=8)
    position = t.pool.position_bytes
    t.pool.limit_bytes(4 * 128 * position + 1)          # four slots at 128 positions, two at 256, one at 512
    assert t.pool.longest_row() == 512 and t.pool.slots_fitting(200) == 2 and t.pool.slots_fitting(129) == 2
    rng = np.random.default_rng(5)
    seqs = [list(map(int, rng.integers(3, 2000, size=20))) for _ in range(4)]
    states = [t.new_state() for _ in seqs]
    for state, q in zip(states, seqs):                   # four short sessions fill the four slots
        t.logits(state, q, len(q) - 1)
    assert t.pool.slots == 4 and all(s.cache is not None for s in states)
    # states[0] and states[1] (the least recently used, in slots 3 and 2) pass together, states[1] growing
    # past 128 positions: they keep their keys, moved to slots 0 and 1; the two others lose theirs.
    slots_before = {states[0].cache, states[1].cache}
    long_tail = list(map(int, rng.integers(3, 2000, size=150)))
    jobs = [(states[0], seqs[0] + [7], len(seqs[0]) - 1), (states[1], seqs[1] + long_tail, len(seqs[1]) - 1)]
    outs = t.logits_many(jobs)
    assert t.pool.slots == 2 and t.pool.capacity == 256 and t.pool.allocated_bytes <= t.pool.max_bytes
    assert {states[0].cache, states[1].cache} == {0, 1} != slots_before
    assert states[2].cache is None and states[3].cache is None and states[2].tokens == []
    for out, (_, tokens, first) in zip(outs, jobs):
        assert np.abs(out - full_forward(t, tokens, first)).max() < 1e-4
    # The moved ones go on from their cached prefix (only the new tokens run); the evicted recompute theirs.
    tokens = seqs[1] + long_tail + [11]
    out = t.logits(states[1], tokens, len(tokens) - 2)
    assert np.abs(out - full_forward(t, tokens, len(tokens) - 2)).max() < 1e-4
    out = t.logits(states[0], seqs[0] + [7, 8], len(seqs[0]))
    assert np.abs(out - full_forward(t, seqs[0] + [7, 8], len(seqs[0]))).max() < 1e-4
    out = t.logits(states[2], seqs[2] + [9, 10], len(seqs[2]) - 1)
    assert np.abs(out - full_forward(t, seqs[2] + [9, 10], len(seqs[2]) - 1)).max() < 1e-4
    # Three sessions at 256 positions do not fit at once: the call runs them in smaller passes.
    more = [t.new_state() for _ in range(3)]
    long_seqs = [list(map(int, rng.integers(3, 2000, size=200))) for _ in more]
    outs = t.logits_many([(s, q, len(q) - 1) for s, q in zip(more, long_seqs)])
    for out, q in zip(outs, long_seqs):
        assert np.abs(out - full_forward(t, q, len(q) - 1)).max() < 1e-4
    assert t.pool.allocated_bytes <= t.pool.max_bytes
    # The long rows gone, short sessions short of slots get them back: the capacity comes down again.
    for state in states + more:
        t.release(state)
    shorts = [t.new_state() for _ in range(4)]
    outs = t.logits_many([(st, q[:20], 19) for st, q in zip(shorts, seqs)])
    assert t.pool.capacity == 128 and t.pool.slots == 4 and all(st.cache is not None for st in shorts)
    for out, q in zip(outs, seqs):
        assert np.abs(out - full_forward(t, q[:20], 19)).max() < 1e-4
    # One row longer than the pool affords fails alone, with a typed error (the service caps the context
    # at longest_row(), so a session never gets there).
    t.pool.limit_bytes(2 * 128 * position)
    assert t.pool.longest_row() == 256 and t.pool.allocated_bytes <= t.pool.max_bytes
    from cloud_verifier.kvpool import PoolFull
    too_long = t.logits_many([(t.new_state(), list(range(3, 303)), 299)])[0]
    assert isinstance(too_long, PoolFull)


def test_a_pool_that_cannot_allocate_fails_the_pass_and_keeps_what_it_holds(monkeypatch):
    """Out of memory while reshaping (the pool allocates every new tensor before it moves anything): the
    call's sessions get the error, and every session's cached keys still match its tokens."""
    import cloud_verifier.kvpool as kvpool

    t = TorchTarget(pipesd_models.target_path(), threads=1, kv_slots=8)
    t.pool.limit_bytes(4 * 128 * t.pool.position_bytes)
    rng = np.random.default_rng(6)
    seqs = [list(map(int, rng.integers(3, 2000, size=20))) for _ in range(4)]
    states = [t.new_state() for _ in seqs]
    for state, q in zip(states, seqs):
        t.logits(state, q, len(q) - 1)
    calls, real_zeros = [], torch.zeros

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory (test)")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(kvpool.torch, "zeros", failing)
    long = seqs[0] + list(map(int, rng.integers(3, 2000, size=150)))
    outs = t.logits_many([(states[0], long, len(seqs[0]) - 1), (states[1], seqs[1] + [5], len(seqs[1]) - 1)])
    monkeypatch.undo()
    assert len(calls) >= 3 and all(isinstance(o, MemoryError) for o in outs)
    assert t.pool.slots == 4 and t.pool.capacity == 128
    for state, q in zip(states, seqs):                  # unchanged: each goes on from its cached prefix
        out = t.logits(state, q + [7], len(q) - 1)
        assert np.abs(out - full_forward(t, q + [7], len(q) - 1)).max() < 1e-4


def test_limiting_a_grown_pool_brings_its_capacity_down_instead_of_leaving_no_slot():
    from cloud_verifier.kvpool import KVPool
    from cloud_verifier.target import TargetState

    pool = KVPool(1, 1, 4, max_slots=8, max_len=512)
    short, long = TargetState(), TargetState()
    pool.acquire(short, keep=set())
    pool.acquire(long, keep={short.cache})
    short.tokens[:] = range(30)
    pool.reserve(400, {short.cache, long.cache})
    long.tokens[:] = range(400)
    assert pool.capacity == 512
    pool.limit_bytes(2 * 256 * pool.position_bytes - 1)     # one 512-position slot no longer fits
    assert pool.capacity == 256 and pool.slots == 1 and pool.allocated_bytes <= pool.max_bytes
    assert pool.holds(short) and short.tokens == list(range(30)) and not pool.holds(long) and long.tokens == []
    assert pool.longest_row() == 256
    # A context that is not start_len doubled: its rows take 128, 256 or 500 positions, never 250.
    odd = KVPool(1, 1, 4, max_slots=8, max_len=500)
    odd.limit_bytes(499 * odd.position_bytes)
    assert odd.longest_row() == 256 and odd.slots_fitting(250) == 1
    odd.limit_bytes(500 * odd.position_bytes)
    assert odd.longest_row() == 500


def test_the_service_gives_the_torch_pool_half_the_budget_and_caps_the_context():
    from cloud_verifier.service import VerifierService
    from privacy.channel import StaticKey

    t = TorchTarget(pipesd_models.target_path(), threads=1, kv_slots=64)
    per_row = t.pool.max_len * t.pool.position_bytes               # one slot at the full 512 positions
    service = VerifierService(t, VerifierSettings(max_memory_bytes=3 * per_row), static_key=StaticKey.generate())
    assert t.pool.max_bytes == 3 * per_row // 2 and service.max_context == t.max_context == 512
    assert service.memory()["kv"] == t.pool.allocated_bytes > 0
    small = TorchTarget(pipesd_models.target_path(), threads=1, kv_slots=64)
    service = VerifierService(small, VerifierSettings(max_memory_bytes=per_row), static_key=StaticKey.generate())
    assert service.max_context == 256 and service.info()["max_context"] == 256    # half of 512 positions' KV
    with pytest.raises(ValueError, match="memory budget"):
        VerifierService(TorchTarget(pipesd_models.target_path(), threads=1),
                        VerifierSettings(max_memory_bytes=1 << 20), static_key=StaticKey.generate())


def test_one_pass_takes_a_session_once(target):
    state = target.new_state()
    with pytest.raises(ValueError, match="at most once"):
        target.logits_many([(state, [1, 2, 3], 2), (state, [1, 2, 3, 4], 3)])


def test_settings_bound_the_batch():
    with pytest.raises(ValueError, match="kv_slots"):
        VerifierSettings(max_batch=32, kv_slots=16)
    with pytest.raises(ValueError, match="max_batch"):
        VerifierSettings(max_batch=0)


# -- the model worker (plain functions, no model) ---------------------------------------------
class FakeForward:
    def __init__(self, state, tokens, first_row):
        self.state, self.tokens, self.first_row, self.parents = state, tokens, first_row, ()


def occupy(worker):
    """Keep the worker busy (returns the gate that frees it) so that later calls queue up."""
    entered, gate = threading.Event(), threading.Event()
    worker.submit(lambda: (entered.set(), gate.wait()))
    assert entered.wait(5)
    return gate


def make_worker(max_batch=8, wait=0.05, in_flight=lambda: 0):
    passes = []

    def logits_many(jobs):
        passes.append([state for state, *_ in jobs])
        return [f"rows-{state}" for state, *_ in jobs]

    worker = ModelWorker(max_batch=max_batch, max_wait_s=wait, in_flight=in_flight)
    worker.logits_many = logits_many
    return worker, passes


def dispatch(name, log, n_passes=1):
    def gen():
        got = []
        for i in range(n_passes):
            got.append((yield FakeForward(name, [], 0)))
        log.append(name)
        return got
    return gen


def test_worker_runs_queued_dispatches_as_one_pass():
    worker, passes = make_worker()
    log = []
    gate = occupy(worker)
    futures = [worker.submit(dispatch(f"s{i}", log), key=f"s{i}") for i in range(5)]
    gate.set()
    assert [f.result(5) for f in futures] == [[f"rows-s{i}"] for i in range(5)]
    assert passes == [[f"s{i}" for i in range(5)]]
    worker.stop()


def test_worker_bounds_the_batch_and_keeps_a_session_in_order():
    worker, passes = make_worker(max_batch=3)
    log = []
    gate = occupy(worker)
    futures = [worker.submit(dispatch(name, log, n_passes=2), key=name[0])
               for name in ("a1", "b1", "a2", "c1", "d1")]
    gate.set()
    for f in futures:
        f.result(5)
    assert all(len(p) <= 3 for p in passes)
    assert log.index("a1") < log.index("a2")          # the same session never shares a cycle
    assert not any("a1" in p and "a2" in p for p in passes)
    assert passes[0] == ["a1", "b1", "c1"] and passes[1] == ["a1", "b1", "c1"]   # two passes each
    worker.stop()


def test_a_lone_call_does_not_wait_for_company():
    worker, passes = make_worker(wait=5.0, in_flight=lambda: 1)       # nothing else in flight
    t0 = time.monotonic()
    assert worker.submit(dispatch("alone", []), key="x").result(5) == ["rows-alone"]
    assert time.monotonic() - t0 < 2.0
    worker.stop()


def test_a_call_queued_behind_another_does_not_wait_for_company():
    """The app counts a call in flight until the worker resolves it, not until the app's coroutine resumes:
    a session's next call, queued while its previous one ran (a pipelined round behind the round it was
    drafted on), starts as soon as that one ends. It used to wait the whole batch_wait_s for company."""
    import asyncio

    from cloud_verifier.app import VerifierApp
    from pipesd_lab.toy import ToyTarget, toy_pair
    from privacy import StaticKey

    app = VerifierApp(lambda: ToyTarget(toy_pair()[0]), VerifierSettings(batch_wait_s=5.0), StaticKey.generate(), None)
    app.load()

    async def two_calls() -> float:
        first = asyncio.ensure_future(app.run(lambda: time.sleep(0.05) or "first", key="s"))
        await asyncio.sleep(0.01)                              # the first is running: the second queues
        second = asyncio.ensure_future(app.run(lambda: "second", key="s"))
        assert await first == "first"
        t0 = time.monotonic()
        assert await second == "second"
        return time.monotonic() - t0

    try:
        assert asyncio.run(two_calls()) < 2.0
        assert app.in_flight == 0 and not app.in_flight_by
    finally:
        app.worker.stop()


def test_worker_waits_for_calls_in_flight_then_batches_them():
    in_flight = [3]
    worker, passes = make_worker(wait=1.0, in_flight=lambda: in_flight[0])
    log = []
    futures = [worker.submit(dispatch("s0", log), key="s0")]
    time.sleep(0.05)
    futures += [worker.submit(dispatch(f"s{i}", log), key=f"s{i}") for i in (1, 2)]
    for f in futures:
        f.result(5)
    assert passes == [["s0", "s1", "s2"]]
    worker.stop()


def test_a_failed_row_fails_only_its_session():
    worker, _ = make_worker()
    worker.logits_many = lambda jobs: [RuntimeError("this row's pass failed") if state == "bad" else f"rows-{state}"
                                       for state, *_ in jobs]
    gate = occupy(worker)
    good, bad = worker.submit(dispatch("good", []), key="g"), worker.submit(dispatch("bad", []), key="b")
    gate.set()
    assert good.result(5) == ["rows-good"]
    with pytest.raises(RuntimeError, match="this row"):
        bad.result(5)
    worker.stop()


def test_a_failed_pass_fails_its_calls_only():
    worker, _ = make_worker()

    def broken(jobs):
        raise RuntimeError("out of memory")

    worker.logits_many = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        worker.submit(dispatch("x", []), key="x").result(5)
    assert worker.submit(lambda: 42).result(5) == 42       # the worker lives on
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(5)
    worker.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(lambda: 1)


# -- real clients sharing a real verifier's batches -------------------------------------------
MAX_NEW = 40
MODES = ["pipesd", "vanilla", "edgellm", "hsl", "pipesd_per_token", "cloud_only", "pipesd_fixed", "tree"]


def batch_histogram(url):
    text = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"^pipesd_batch_rows_count (\S+)", text, re.M).group(1))
    single = float(re.search(r'^pipesd_batch_rows_bucket\{le="1.0"\} (\S+)', text, re.M).group(1))
    evictions = float(re.search(r"^pipesd_kv_slot_evictions (\S+)", text, re.M).group(1))
    return count, single, evictions


def run_concurrently(verifier, work, seed):
    """work: per client a list of (prompt, generate kwargs). Random start delays; returns results."""
    results, errors = {}, []

    def one(i, jobs):
        rng = random.Random(seed * 100 + i)
        try:
            with EdgeClient(verifier.url, verifier_key=verifier.public_key, threads=1) as c:
                for j, (prompt, kwargs) in enumerate(jobs):
                    time.sleep(rng.uniform(0, 0.05))
                    results[i, j] = c.generate(prompt, max_new_tokens=MAX_NEW, **kwargs)
        except Exception as exc:   # surfaced below with the client's index
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=one, args=(i, jobs)) for i, jobs in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.fixture(scope="module")
def long_prompts():
    """Mixed prefix lengths: some prompts are a few tokens, some several hundred characters."""
    return [PROMPTS[i] for i in range(8)] + ["\n".join(PROMPTS[:12]), "\n\n".join(PROMPTS[4:16])]


@pytest.fixture(scope="module")
def references(client, long_prompts):
    """Each prompt decoded by the target alone (cloud_only, one session at a time)."""
    return {p: client.generate(p, max_new_tokens=MAX_NEW, mode="cloud_only").tokens for p in long_prompts}


def test_sessions_sharing_batches_stay_lossless(verifier, references, long_prompts):
    rng = random.Random(7)
    work = [[(rng.choice(long_prompts), {"mode": MODES[i]}) for _ in range(3)] for i in range(len(MODES))]
    before = batch_histogram(verifier.url)
    results = run_concurrently(verifier, work, seed=1)
    for (i, j), r in results.items():
        prompt = work[i][j][0]
        assert r.tokens == references[prompt], f"{work[i][j][1]} diverged on {prompt[:30]!r} under batching"
    count, single, _ = batch_histogram(verifier.url)
    shared = (count - before[0]) - (single - before[1])
    assert shared > 0, "no forward pass was shared by two sessions: the test would prove nothing"


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(verifier, client, long_prompts):
    kwargs = {"mode": "vanilla", "temperature": 0.8, "seed": 11}
    alone = client.generate(long_prompts[1], max_new_tokens=MAX_NEW, **kwargs).tokens
    work = [[(long_prompts[1], kwargs)]] + [[(p, {"mode": "pipesd"})] for p in long_prompts[2:7]]
    results = run_concurrently(verifier, work, seed=2)
    assert results[0, 0].tokens == alone


def test_slot_eviction_under_load_stays_lossless(references, long_prompts):
    """Four slots for eight sessions: sessions lose their KV slot mid-generation and recompute it."""
    with LocalVerifier(model="embedded", threads=1, extra_args=["--kv-slots", "4", "--max-batch", "4"]) as v:
        work = [[(long_prompts[(i + j) % len(long_prompts)], {"mode": MODES[i]}) for j in range(2)]
                for i in range(len(MODES))]
        results = run_concurrently(v, work, seed=3)
        for (i, j), r in results.items():
            assert r.tokens == references[work[i][j][0]]
        _, _, evictions = batch_histogram(v.url)
        assert evictions > 0, "eight sessions on four slots should have evicted some"
