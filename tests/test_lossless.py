"""Greedy losslessness: speculative output is token-identical to the target's own greedy decoding.

Real draft (llama.cpp), real target (transformers) behind a real uvicorn process on
loopback; the reference is ``cloud_only``, where the target decodes alone.
"""

import pytest

from .conftest import PROMPTS

pytestmark = pytest.mark.integration

MAX_NEW = 48


@pytest.fixture(scope="module")
def reference(target_greedy):
    return {p: target_greedy(p, MAX_NEW) for p in PROMPTS}


def test_reference_is_real_generation(reference):
    assert len(PROMPTS) >= 20
    outputs = list(reference.values())
    assert all(len(t) > 0 for t in outputs)
    assert len({tuple(t) for t in outputs}) > len(outputs) // 2, "different prompts should give different text"


# k = 4 (vanilla's default) runs every prompt in tests/test_pipeline.py
@pytest.mark.parametrize("k", [1, 2, 8])
def test_vanilla_equals_target_greedy(client, reference, k):
    accepted = drafted = 0
    for prompt in PROMPTS:
        result = client.generate(prompt, max_new_tokens=MAX_NEW, mode="vanilla", draft_k=k)
        assert result.tokens == reference[prompt], f"k={k} diverged from target greedy on {prompt!r}"
        accepted += result.stats.draft_n_accepted
        drafted += result.stats.draft_n
        assert result.stats.nav_rounds < len(result.tokens) or result.stats.draft_n_accepted == 0
    assert drafted > 0 and accepted > 0, "the draft should get some tokens accepted"


def test_streaming_equals_generate(client, reference):
    prompt = PROMPTS[0]
    events = list(client.stream(prompt, max_new_tokens=MAX_NEW, mode="vanilla", draft_k=4))
    assert [e.token for e in events if e.token is not None] == reference[prompt]
    assert all(e.verified for e in events)
    assert "".join(e.text for e in events) == client.generate(prompt, max_new_tokens=MAX_NEW).text
