"""The verifier's second target backend (llama.cpp) is lossless too."""

import pytest

from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lcpp_client():
    with LocalVerifier(model="embedded", backend="llamacpp", threads=1) as v, \
            EdgeClient(v.url, verifier_key=v.public_key, threads=1) as c:
        yield c


@pytest.mark.parametrize("k", [2, 5])
def test_vanilla_equals_llamacpp_target_greedy(lcpp_client, k):
    for prompt in PROMPTS[:6]:
        ref = lcpp_client.generate(prompt, max_new_tokens=32, mode="cloud_only").tokens
        assert lcpp_client.generate(prompt, max_new_tokens=32, mode="vanilla", draft_k=k).tokens == ref


def test_a_tree_policy_on_the_llamacpp_target_sends_chains_and_stays_lossless(lcpp_client):
    for prompt in PROMPTS[:3]:
        ref = lcpp_client.generate(prompt, max_new_tokens=32, mode="cloud_only").tokens
        r = lcpp_client.generate(prompt, max_new_tokens=32, mode="tree")
        assert r.tokens == ref
        assert r.stats.tree_rounds == 0 and r.stats.tree_fallback == "the verifier verifies chains only"
