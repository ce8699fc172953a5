"""The onnxruntime draft backend: same tokenizer and contract as llama.cpp, same logits as torch,
exact rollback, and every policy still token-identical to target greedy with it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import EdgeClient, LlamaCppDrafter, OnnxDrafter
from edge_sdk.errors import ConfigError
from pipesd_models import draft_onnx_path, draft_path

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def onnx_drafter():
    return OnnxDrafter(draft_onnx_path(), threads=1)


@pytest.fixture(scope="module")
def llama_drafter():
    return LlamaCppDrafter(draft_path(), threads=1)


def _row(drafter, tokens):
    drafter.set_context(tokens)
    return np.array(drafter._logits(), dtype=np.float64)


def test_same_vocabulary_tokenizer_and_pieces_as_llamacpp(onnx_drafter, llama_drafter):
    assert onnx_drafter.vocab_tokens == llama_drafter.vocab_tokens      # the session fingerprint matches
    assert onnx_drafter.eos_token_ids == llama_drafter.eos_token_ids
    assert onnx_drafter.max_context == llama_drafter.max_context
    for text in PROMPTS + ["<|endoftext|> is text here", "unicode: é ü 漢字 🙂\n\t"]:
        assert onnx_drafter.tokenize(text) == llama_drafter.tokenize(text), text
    assert onnx_drafter.tokenize("a<|endoftext|>", special=True) == llama_drafter.tokenize("a<|endoftext|>", special=True)
    assert all(onnx_drafter.token_bytes(i) == llama_drafter.token_bytes(i) for i in range(onnx_drafter.vocab_size))


def test_logits_match_torch_and_llamacpp(onnx_drafter, llama_drafter):
    import torch

    from pipesd_models.build.export import load_gguf_torch

    hf = load_gguf_torch(draft_path())
    for text in PROMPTS[:6]:
        ids = onnx_drafter.tokenize(text)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
        ours, llama = _row(onnx_drafter, ids), _row(llama_drafter, ids)
        assert np.abs(ours - ref).max() < 1e-4                 # the same float32 graph
        assert np.abs(ours - llama).max() < 0.02               # llama.cpp computes in its own order
        assert ours.argmax() == ref.argmax()
        top2 = np.sort(ours)[-2:]
        if top2[1] - top2[0] > 2 * np.abs(ours - llama).max():   # not a near-tie llama.cpp's rounding can flip
            assert llama.argmax() == ours.argmax()


def test_rollback_is_exact(onnx_drafter):
    prompt = onnx_drafter.tokenize(PROMPTS[0])
    onnx_drafter.set_context(prompt)
    first = [onnx_drafter.next_token() for _ in range(12)]
    onnx_drafter.set_context(prompt + [d.token for d in first[:3]])        # roll back 9 tokens
    again = [onnx_drafter.next_token() for _ in range(9)]
    assert [d.token for d in again] == [d.token for d in first[3:]]
    assert [d.p_max for d in again] == pytest.approx([d.p_max for d in first[3:]], abs=1e-6)
    onnx_drafter.set_context(prompt + [7, 8])                               # a different branch
    branched = _row(onnx_drafter, prompt + [7, 8])
    fresh = OnnxDrafter(draft_onnx_path(), threads=1)
    assert np.abs(branched - _row(fresh, prompt + [7, 8])).max() < 1e-5


def test_every_policy_with_the_onnx_draft_equals_target_greedy(verifier, target_greedy):
    modes = ["vanilla", "hsl", "edgellm", "pipesd", "pipesd_fixed", "pipesd_per_token", "pipesd_at_trigger",
             "pipesd_no_proactive", "pipesd_c_only", "pipesd_p_only", "tree"]
    prompts = PROMPTS[:3]
    reference = {p: target_greedy(p, 40) for p in prompts}
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, draft_backend="onnx", threads=1) as c:
        assert isinstance(c.drafter, OnnxDrafter)
        for mode in modes:
            drafted = 0
            for p in prompts:
                r = c.generate(p, max_new_tokens=40, mode=mode)
                assert r.tokens == reference[p], (mode, p)
                drafted += r.stats.draft_n
            # Every mode really speculated with the ONNX draft. Counted over the prompts, not per prompt:
            # PipeSD's controller may price a whole generation as cloud-only rounds on this fast link.
            assert drafted > 0, mode
            if mode == "tree":           # the ONNX drafter grows trees a node at a time (SequentialTree)
                assert r.stats.tree_rounds > 0 and r.stats.tree_fallback == ""


def test_backend_selection_errors():
    with pytest.raises(ConfigError, match="unknown draft backend"):
        EdgeClient(mode="edge_only", draft_backend="tflite")
    with pytest.raises(ConfigError, match="no ONNX draft"):
        EdgeClient(mode="edge_only", pair="smollm2", draft_backend="onnx")


def test_exporter_reproduces_the_shipped_graph(tmp_path, onnx_drafter):
    pytest.importorskip("onnx")
    from pipesd_models.build.onnx_export import OPSET, export_onnx

    meta = export_onnx(draft_path(), tmp_path / "d.onnx")
    assert meta["opset"] == str(OPSET) and meta["source"] == "draft-f16.gguf"
    rebuilt = OnnxDrafter(tmp_path / "d.onnx", tokenizer_path=draft_onnx_path().with_name("tokenizer.json"), threads=1)
    ids = onnx_drafter.tokenize(PROMPTS[2])
    assert np.abs(_row(rebuilt, ids) - _row(onnx_drafter, ids)).max() < 1e-5
