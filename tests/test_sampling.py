"""Lossless speculative sampling: the output distribution is the target's own, for every setting.

Three levels, all with fixed seeds (the tests are deterministic; a pass is not luck of the day):

1. The rule alone on synthetic distributions (fast, many samples).
2. The speculative path with the real models: the llama.cpp draft samples x ~ q with its keyed
   uniform, the request (draft + sparse float16 q) goes through the wire encoding, and the verifier's
   rule runs on the real target's logits. >= 10,000 first tokens per setting (T 0.7, T 1.0, top-p),
   chi-square against the target's exact truncated distribution.
3. The whole engine over the real verifier process: first-token marginal and the joint of the first
   two tokens (3,000 requests; one costs ~10 ms, so more would not fit CI), seeded reproducibility
   for every policy, and typed errors for bad parameters.
"""

from __future__ import annotations

import collections
import concurrent.futures

import numpy as np
import pytest
from scipy.stats import chisquare

from edge_sdk import EdgeClient
from edge_sdk.drafter import DRAFT_SUPPORT, choose_token
from edge_sdk.errors import ConfigError
from privacy import SamplingParams, SparseDist, VerifyRequest, decode, encode
from privacy.sampling import sample_index, truncate, uniforms
from cloud_verifier.nav import speculative_accept

PREFIX_TEXT = "def read_file(path):\n    with open(path) as f:\n"


def _chi2(counts: dict, probs: dict, n: int) -> float:
    """p-value of observed counts against expected probabilities; bins expected < 5 are pooled."""
    big = [k for k, p in probs.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big]
    exp = [probs[k] * n for k in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 5:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:
        assert rest_obs <= max(5, 3 * rest_exp), "mass where the target puts almost none"
        exp = [e * sum(obs) / sum(exp) for e in exp]
    assert len(obs) >= 3, "too few bins for a meaningful test"
    return float(chisquare(obs, exp).pvalue)


# -- 1. the rule on synthetic distributions ------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.6, top_k=4), SamplingParams(1.3, top_p=0.8)])
def test_rule_preserves_the_target_distribution_synthetic(params):
    rng = np.random.default_rng(1)
    V = 12
    p_logits, q_logits = rng.normal(size=V) * 2, rng.normal(size=V) * 2   # deliberately unlike each other
    ids, p = truncate(p_logits, params)
    target = dict(zip(ids.tolist(), p.tolist()))
    q_ids, q_p = truncate(q_logits, SamplingParams(params.temperature, 5))
    q = SparseDist.quantize(q_ids, q_p)
    rows = np.stack([p_logits, rng.normal(size=V)])
    counts: dict[int, int] = {}
    n = 20_000
    for seed in range(n):
        x = int(q.ids[sample_index(q.probs(), uniforms(seed, 7, 0, 1)[0])])
        s = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        accepted, token = speculative_accept([x], [q], rows, s, 7)
        first = x if accepted else token
        counts[first] = counts.get(first, 0) + 1
    assert set(counts) <= set(target)          # never a token the truncated target excludes
    assert _chi2(counts, target, n) > 0.01


def test_rule_is_a_pure_function_of_seed_and_position():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(3, 10))
    q = SparseDist.quantize(*truncate(rng.normal(size=10), SamplingParams(1.0)))
    draft = [int(q.ids[0]), int(q.ids[1])]
    s = SamplingParams(0.9, seed=42)
    assert speculative_accept(draft, [q, q], rows, s, 5) == speculative_accept(draft, [q, q], rows, s, 5)


def test_sparse_q_is_exact_and_the_draft_never_leaves_it():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=2048) * 3
    for params in (SamplingParams(1.0, seed=1), SamplingParams(0.7, top_p=0.9, seed=2), SamplingParams(1.5, 20, seed=3)):
        for pos in range(200):
            d = choose_token(logits, SamplingParams(params.temperature, params.top_k, params.top_p, pos), pos)
            assert len(d.q) <= min(params.top_k or DRAFT_SUPPORT, DRAFT_SUPPORT)
            assert d.q.prob_of(d.token) == pytest.approx(d.p_token) and d.p_token > 0
            assert d.confidence == d.p_token
            wire = VerifyRequest.from_dict(decode(encode(VerifyRequest(0, (1,), (d.token,), sampling=params,
                                                                       q=(d.q,)).to_dict())))
            assert np.array_equal(wire.q[0].probs(), d.q.probs())      # bit-identical after the wire


# -- 2. the speculative path with the real models ---------------------------------------------------
@pytest.fixture(scope="module")
def real_pair():
    from cloud_verifier.target import load_target
    from edge_sdk.drafter import LlamaCppDrafter
    from pipesd_models import pair_paths

    draft_path, target_path = pair_paths("embedded")
    drafter = LlamaCppDrafter(draft_path, threads=1)
    target = load_target(target_path, threads=1)
    prefix = drafter.tokenize(PREFIX_TEXT)
    rows: dict[tuple[int, ...], np.ndarray] = {}

    def row(tokens: tuple[int, ...]) -> np.ndarray:
        """The target's logits after `tokens` (cached: a forward pass per distinct sequence)."""
        if tokens not in rows:
            rows[tokens] = target.logits(target.new_state(), list(tokens), first_row=len(tokens) - 1)[-1]
        return rows[tokens]

    return drafter, prefix, row


@pytest.mark.parametrize("params", [SamplingParams(0.7), SamplingParams(1.0), SamplingParams(1.0, top_p=0.9)],
                         ids=["T0.7", "T1.0", "top_p0.9"])
@pytest.mark.integration
def test_first_token_through_the_speculative_path_matches_the_target(real_pair, params):
    drafter, prefix, row = real_pair
    n, pos = 10_000, len(prefix)
    ids, p = truncate(row(tuple(prefix)), params)
    target = dict(zip(ids.tolist(), p.tolist()))
    counts: dict[int, int] = {}
    accepted_n = 0
    for seed in range(n):
        s = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        drafter.set_sampling(s)
        drafter.set_context(prefix)
        d = drafter.next_token()
        req = VerifyRequest.from_dict(decode(encode(VerifyRequest(0, tuple(prefix), (d.token,), sampling=s,
                                                                  q=(d.q,)).to_dict())))
        rows = np.stack([row(tuple(prefix)), row(tuple(prefix) + (d.token,))])
        accepted, token = speculative_accept(req.draft, req.q, rows, req.sampling, pos)
        accepted_n += accepted
        first = d.token if accepted else token
        counts[first] = counts.get(first, 0) + 1
    drafter.set_sampling(None)
    assert set(counts) <= set(target)
    assert _chi2(counts, target, n) > 0.01
    assert 0.2 < accepted_n / n < 1.0        # the draft is useful and the rule does reject


# -- 3. the whole engine over the real verifier ---------------------------------------------------------
def test_engine_first_two_tokens_match_the_target_joint(verifier, real_pair):
    _, prefix, row = real_pair
    params = SamplingParams(1.0)
    n = 3_000
    def generate(seeds: range) -> tuple[list[list[int]], frozenset[int]]:
        with EdgeClient(verifier.url, verifier_key=verifier.public_key, mode="vanilla", draft_k=2, threads=1) as c:
            return [c.generate(prefix, max_new_tokens=2, temperature=1.0, seed=seed).tokens for seed in seeds], \
                c.drafter.eos_token_ids

    # Twelve edge sessions at once: the verifier batches their passes, and a pass of a dozen short rows costs
    # little more than one (the target's weights are read once per pass). The same draws in 40% of the time.
    sessions = 12
    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        parts = list(pool.map(generate, (range(i, n, sessions) for i in range(sessions))))
    outs = [toks for part, _ in parts for toks in part]
    eos = parts[0][1]
    counts1 = collections.Counter(toks[0] for toks in outs)
    counts2 = collections.Counter(tuple(toks) for toks in outs)
    assert len(outs) == n
    ids, p = truncate(row(tuple(prefix)), params)
    p1 = dict(zip(ids.tolist(), p.tolist()))
    assert _chi2(counts1, p1, n) > 0.01
    joint = {}
    for t1, pt1 in p1.items():
        if pt1 * n < 5:
            continue
        if t1 in eos:                          # generation ends: a one-token outcome
            joint[(t1,)] = pt1
            continue
        ids2, p2 = truncate(row(tuple(prefix) + (t1,)), params)
        joint.update({(t1, t2): pt1 * q for t2, q in zip(ids2.tolist(), p2.tolist())})
    assert _chi2(counts2, joint, n) > 0.01


@pytest.mark.parametrize("mode", ["vanilla", "hsl", "edgellm", "pipesd", "pipesd_fixed", "pipesd_per_token",
                                  "pipesd_no_proactive", "cloud_only", "edge_only"])
def test_same_seed_same_text_for_every_policy(verifier, mode):
    def run(seed):
        with EdgeClient(verifier.url, verifier_key=verifier.public_key, mode=mode, threads=1) as c:
            first = c.generate("class Stack:\n", max_new_tokens=40, temperature=0.8, top_p=0.95, seed=seed)
            again = c.generate("class Stack:\n", max_new_tokens=40, temperature=0.8, top_p=0.95, seed=seed)
            assert first.tokens == again.tokens                  # same client, later request
            return first.tokens

    a, b, other = run(123), run(123), run(124)
    assert a == b and len(a) == 40                               # a fresh client
    assert a != other


def test_a_tree_policy_samples_with_chains_and_says_why(client):
    """Token trees are verified greedily only: under sampling the tree policy's rounds are chains (the
    exact speculative-sampling path every chain policy takes), and the stats say so."""
    r = client.generate("class Stack:\n", max_new_tokens=24, mode="tree", temperature=0.8, seed=5)
    assert r.stats.tree_rounds == 0 and r.stats.draft_n > 0
    assert r.stats.tree_fallback == "sampling: trees are verified greedily only"
    greedy = client.generate("class Stack:\n", max_new_tokens=24, mode="tree")
    assert greedy.stats.tree_rounds > 0 and greedy.stats.tree_fallback == ""


def test_sampling_parameters_are_checked(client):
    for kwargs in ({"temperature": -1.0}, {"temperature": 0.5, "top_p": 0.0}, {"temperature": 0.5, "top_k": -2},
                   {"temperature": float("nan")}, {"temperature": 0.5, "seed": -1}):
        with pytest.raises(ConfigError, match="bad sampling parameters"):
            client.generate("x = ", max_new_tokens=2, **kwargs)


def test_temperature_zero_is_greedy_and_sends_no_distribution(client):
    client.generate("def main():\n", max_new_tokens=24, mode="vanilla")      # session open, caches warm
    greedy = client.generate("def main():\n", max_new_tokens=24, mode="vanilla")
    with pytest.warns(UserWarning, match="temperature"):          # a seed changes nothing when greedy: said
        zero = client.generate("def main():\n", max_new_tokens=24, mode="vanilla", temperature=0.0, seed=9)
    ref = client.generate("def main():\n", max_new_tokens=24, mode="cloud_only")
    assert greedy.tokens == zero.tokens == ref.tokens
    assert zero.stats.bytes_up == greedy.stats.bytes_up


def test_batching_and_proactive_drafting_do_not_change_sampled_text(verifier):
    """The randomness is keyed by position, and these ablations differ from PipeSD only in how the
    draft is uploaded or whether the next round is drafted during NAV, never in round boundaries:
    with the same seed and thresholds they must produce the same tokens. (Their distribution is then
    the one the rule guarantees for the round boundaries of the dual threshold.)"""
    from edge_sdk.policies import PaperPipeSD
    from edge_sdk.scheduling import AtTrigger, DPSchedule, PerToken
    from edge_sdk.triggers import DualThreshold

    variants = {"dp": (DPSchedule, True), "per_token": (PerToken, True), "at_trigger": (AtTrigger, True),
                "no_proactive": (DPSchedule, False)}
    outs, kept = {}, 0
    for mode, (schedule, proactive) in variants.items():
        policy = PaperPipeSD(mode, DualThreshold(0.3, 0.4), schedule(), proactive=proactive)
        with EdgeClient(verifier.url, verifier_key=verifier.public_key, mode=policy, threads=1) as c:
            results = [c.generate(p, max_new_tokens=48, temperature=0.9, seed=s)
                       for s, p in enumerate(["def main():\n", "class Stack:\n", "import os\n", "for i in range(10):\n"])]
            outs[mode] = [r.tokens for r in results]
            if mode == "dp":
                kept = sum(r.stats.proactive_kept for r in results)
    assert kept > 0                      # proactive rounds were kept, so the comparison means something
    first = outs["dp"]
    assert all(o == first for o in outs.values())


def test_tiny_temperatures_stay_finite():
    ids, p = truncate(np.array([1.0, 3.0, 2.0, 3.0 - 1e-9]), SamplingParams(1e-300))
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0) and ids[0] == 1
