"""The shipped embedded pair and its builder."""

import json
import subprocess
import sys

import pytest

import pipesd_models
from edge_sdk import EdgeClient, VocabMismatchError
from privacy import ErrorCode

pytestmark = pytest.mark.integration


def test_shipped_files_match_manifest():
    assert pipesd_models.verify_files() == []


def test_manifest_records_a_useful_pair():
    m = pipesd_models.load_manifest()
    target, draft = m["models"]["target"], m["models"]["draft"]
    assert 10e6 < target["params"] < 15e6 and 1.5e6 < draft["params"] < 3e6
    # A target weaker than its draft would make every speed-up figure meaningless.
    assert target["heldout_ce"] < draft["heldout_ce"] - 0.1
    assert set(m["pair"]["greedy_acceptance"]) == {"k2", "k4", "k8"}
    assert 0 < m["pair"]["top1_agreement"] < 1
    for side in ("target", "draft"):
        assert m["llamacpp_vs_torch"][side]["argmax_equal"] == 1.0
    assert m["tokenizer"]["llamacpp_matches_hf"] == 1.0


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    """The builder's whole pipeline on tiny models: corpus, tokenizer, train, distil, export, evaluate."""
    root = tmp_path_factory.mktemp("smoke")
    subprocess.run([sys.executable, "-m", "pipesd_models.build", "--preset", "smoke", "--out", str(root / "out"),
                    "--work", str(root / "work"), "--threads", "1"], check=True, capture_output=True, timeout=300)
    return root / "out"


def test_builder_smoke_run_exports_matching_gguf(smoke_build):
    manifest = json.loads((smoke_build / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert (smoke_build / name).stat().st_size == entry["bytes"]
    for side in ("target", "draft"):
        parity = manifest["llamacpp_vs_torch"][side]
        assert parity["argmax_equal"] == 1.0 and parity["max_abs_diff"] < 0.01
    assert manifest["tokenizer"]["llamacpp_matches_hf"] == 1.0
    assert manifest["build"]["preset"]["name"] == "smoke"


def test_vocab_mismatch_is_refused(smoke_build, verifier):
    """A draft with another tokenizer (the smoke build's 300-token vocabulary) must not talk to this target."""
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, draft_model=smoke_build / pipesd_models.DRAFT_FILE,
                    threads=1) as c:
        with pytest.raises(VocabMismatchError) as err:
            c.generate("def f():", max_new_tokens=4)
    assert err.value.status == 409 and err.value.code is ErrorCode.VOCAB_MISMATCH


def test_hf_directory_target_matches_its_gguf_export(smoke_build):
    """The torch backend loads an HF model directory as well as a GGUF file; both give the same model."""
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from cloud_verifier.target import TorchTarget

    hf_dir = smoke_build.parent / "work" / "smoke" / "target"
    PreTrainedTokenizerFast(tokenizer_file=str(smoke_build / "tokenizer.json")).save_pretrained(str(hf_dir))
    from_dir = TorchTarget(hf_dir, threads=1)
    from_gguf = TorchTarget(smoke_build / pipesd_models.TARGET_FILE, threads=1)
    assert from_dir.vocab_tokens == from_gguf.vocab_tokens
    ids = [0, 5, 17, 42, 99, 7, 3]
    a = from_dir.logits(from_dir.new_state(), ids, first_row=0)
    b = from_gguf.logits(from_gguf.new_state(), ids, first_row=0)
    assert (a.argmax(-1) == b.argmax(-1)).all() and np.abs(a - b).max() < 0.05  # GGUF weights are f16
