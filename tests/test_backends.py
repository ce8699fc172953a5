"""Draft and target backends on the embedded pair: cross-runtime parity and rollback exactness."""

import numpy as np
import pytest

import pipesd_models
from cloud_verifier.target import LlamaCppTarget, TorchTarget
from edge_sdk import LlamaCppDrafter

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def drafter():
    return LlamaCppDrafter(pipesd_models.draft_path(), threads=1)


@pytest.fixture(scope="module")
def sequences(drafter):
    """Prompts extended with the draft's own greedy continuation: realistic token sequences."""
    seqs = []
    for p in PROMPTS[:6]:
        drafter.set_context(drafter.tokenize(p))
        for _ in range(24):
            drafter.next_token()
        seqs.append(list(drafter._tokens))
    return seqs


@pytest.fixture(scope="module", params=["draft", "target"])
def model_pair(request):
    """The same GGUF file on both runtimes: (llama.cpp target, torch target)."""
    path = pipesd_models.draft_path() if request.param == "draft" else pipesd_models.target_path()
    return request.param, LlamaCppTarget(path, threads=1), TorchTarget(path, threads=1)


def test_llamacpp_and_torch_agree(model_pair, sequences):
    """Same logits up to f16 arithmetic; the same argmax wherever the top two are not a near-tie.

    llama.cpp multiplies in f16 and torch in f32, so logits differ by a few 1e-3 and a top-2 tie
    closer than that may flip (seen: 1 position in ~760 for the draft, margin 0.001).
    """
    name, lcpp, torch_t = model_pair
    worst, flips, positions = 0.0, 0, 0
    for seq in sequences:
        a = lcpp.logits(lcpp.new_state(), seq, first_row=0)
        b = torch_t.logits(torch_t.new_state(), seq, first_row=0)
        assert a.shape == b.shape == (len(seq), torch_t.vocab_size)
        diff = np.abs(a - b).max(axis=-1)
        top2 = np.sort(b, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
        assert (a.argmax(-1) == b.argmax(-1))[clear].all(), f"{name}: argmax differs at a clear margin"
        worst = max(worst, float(diff.max()))
        flips += int((a.argmax(-1) != b.argmax(-1)).sum())
        positions += len(seq)
    assert worst < 0.05, f"{name}: max |logit diff| {worst}"
    assert flips <= positions // 200, f"{name}: {flips} argmax flips in {positions} positions"


@pytest.mark.parametrize("backend", ["torch", "llamacpp"])
def test_target_rollback_is_exact(backend, sequences):
    cls = TorchTarget if backend == "torch" else LlamaCppTarget
    target = cls(pipesd_models.target_path(), threads=1)
    seq = sequences[0]
    state = target.new_state()
    target.logits(state, seq, first_row=len(seq) - 1)        # cache covers the whole sequence
    target.rollback(state, 10)                                 # NAV rejected everything after 10
    assert state.tokens == seq[:10]
    diverged = seq[:10] + [seq[12], seq[11], seq[13]]         # a different continuation
    after = target.logits(state, diverged, first_row=9)
    fresh = target.logits(target.new_state(), diverged, first_row=9)
    assert np.allclose(after, fresh, atol=1e-3)
    assert (after.argmax(-1) == fresh.argmax(-1)).all()


def test_target_reuses_cache_for_common_prefix(sequences):
    target = TorchTarget(pipesd_models.target_path(), threads=1)
    seq = sequences[1]
    state = target.new_state()
    ran = []                                    # the token ids each forward pass embeds
    target.model.get_input_embeddings().register_forward_pre_hook(lambda _, args: ran.append(args[0].shape))
    target.logits(state, seq[:20], first_row=19)
    slot = state.cache
    target.logits(state, seq[:25], first_row=19)
    assert state.cache == slot and state.tokens == seq[:25]
    assert ran == [(1, 20), (1, 6)]             # then only row 19 (asked for again) and the five new tokens


def test_drafter_rollback_is_exact(drafter, sequences):
    seq = sequences[2]
    for cut in (len(seq) - 1, 15, 8):
        drafter.set_context(seq)               # cache holds the whole sequence
        drafter.next_token()
        drafter.next_token()
        drafter.set_context(seq[:cut])         # roll back into the middle
        a = drafter.next_token()
        fresh = LlamaCppDrafter(pipesd_models.draft_path(), threads=1)   # evaluates from scratch
        fresh.set_context(seq[:cut])
        b = fresh.next_token()
        assert a.token == b.token
        assert abs(a.p_max - b.p_max) < 1e-3
        assert len(drafter) == cut + 1


def test_an_interrupted_drafter_gives_up_the_token_midway_and_drafts_on_exactly(sequences):
    """llama.cpp's abort callback stops the token being drafted (here: set before the call, so the very
    first graph node aborts); what the drafter then drafts from any context is what it would have."""
    import threading

    from edge_sdk.drafter import DraftInterrupted

    drafter = LlamaCppDrafter(pipesd_models.draft_path(), threads=1)
    seq = sequences[3]
    drafter.set_context(seq[:10])
    expected = [drafter.next_token().token for _ in range(3)]
    drafter.set_context(seq[:10])
    drafter.interrupt()
    with pytest.raises(DraftInterrupted):
        drafter.next_token()
    drafter.set_context(seq[:10])
    assert [drafter.next_token().token for _ in range(3)] == expected
    # Midway: the callback is installed, so a long evaluation (the whole sequence) aborts part-way.
    drafter.set_context([])
    drafter.set_context(seq)
    timer = threading.Timer(0.0005, drafter.interrupt)
    timer.start()
    try:
        drafter.next_token()
    except DraftInterrupted:
        pass
    timer.join()
    drafter.interrupt(False)
    drafter.set_context(seq[:10])
    assert [drafter.next_token().token for _ in range(3)] == expected


def test_drafter_reports_confidence(drafter):
    drafter.set_context(drafter.tokenize("def main():\n"))
    d = drafter.next_token()
    assert 0.0 < d.p_max <= 1.0 and d.p_token == d.p_max
    assert 0 <= d.token < drafter.vocab_size


def test_drafter_and_target_share_vocabulary(drafter):
    target = TorchTarget(pipesd_models.target_path(), threads=1)
    assert drafter.vocab_tokens == target.vocab_tokens
    assert set(target.eos_token_ids) <= drafter.eos_token_ids


@pytest.mark.parametrize("path", [pipesd_models.target_path(), pipesd_models.draft_path()], ids=["target", "draft"])
def test_the_vocabulary_read_through_llama_cpp_is_the_ggufs_own(path):
    """The verifier reads a GGUF's tokens, end-of-generation ids and context through llama.cpp (fast); they
    must be exactly what the file stores, as gguf-py reads it (the vocabulary check compares these strings)."""
    import gguf

    from cloud_verifier.target import _gguf_metadata

    reader = gguf.GGUFReader(str(path))
    tokens, eos, context = _gguf_metadata(path)
    assert tokens == list(reader.fields["tokenizer.ggml.tokens"].contents())
    assert eos == (int(reader.fields["tokenizer.ggml.eos_token_id"].contents()),)
    assert context == int(reader.fields["llama.context_length"].contents())


def test_the_vocabulary_read_is_silent_leaves_the_log_as_it_was_and_falls_back_to_gguf_py(monkeypatch, capfd):
    """The read is ours, not the model load llama.cpp's log is for: nothing on stderr, and whatever log
    callback was set before is set again after. A file llama.cpp cannot read (transformers may) is read
    by gguf-py instead."""
    import ctypes

    import llama_cpp

    from cloud_verifier import target

    before, before_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(before), ctypes.byref(before_data))
    lines: list[bytes] = []
    app_log = llama_cpp.llama_log_callback(lambda level, text, user_data: lines.append(text))
    llama_cpp.llama_log_set(app_log, ctypes.c_void_p(0))
    try:
        capfd.readouterr()
        expected = target._gguf_metadata(pipesd_models.target_path())
        assert capfd.readouterr().err == "" and lines == []
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(pipesd_models.target_path()).encode(), params)
        llama_cpp.llama_model_free(model)
        assert lines, "the app's log callback is back"
    finally:
        llama_cpp.llama_log_set(before, before_data)
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", lambda path, params: None)
    assert target._gguf_metadata(pipesd_models.target_path()) == expected
