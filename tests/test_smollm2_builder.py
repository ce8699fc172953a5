"""The SmolLM2 draft builder's pure pieces (python -m pipesd_models.build.smollm2_draft): which prompts
are held out, the acceptance simulation that the manifest's figures come from, the teacher-cut start. The build itself
(about two hours) is not run in tests; tests/test_smollm2.py checks its shipped file."""

import pytest


def test_held_out_prompts_share_no_topic_or_file_with_training():
    from pipesd_models.build import corpus as corpus_mod
    from pipesd_models.build.smollm2_draft import PRESETS, prompts

    corpus = corpus_mod.collect(max_files=120)
    spec = PRESETS["smoke"]
    sets = prompts(corpus, spec.__class__(**{**spec.to_dict(), "chat_prompts": 400, "code_prompts": 100,
                                              "eval_prompts": 20, "max_files": 120}))
    train_topics = {p["topic"] for p in sets["train"]}
    assert sets["heldout"] and not train_topics & {p["topic"] for p in sets["heldout"]}
    assert {p["kind"] for p in sets["heldout"]} == {"chat_topics", "chat_free", "code"}
    assert {p["kind"] for p in sets["train"]} == {"chat", "code"}
    train_texts = {p["text"] for p in sets["train"]}
    assert not train_texts & {p["text"] for p in sets["heldout"]}
    held_files = set(corpus.heldout_files)
    assert all(p["topic"] in held_files for p in sets["heldout"] if p["kind"] == "code")
    train_text = "".join(corpus.train)
    assert not any(p["text"] in train_text for p in sets["heldout"] if p["kind"] == "code")


def test_acceptance_simulation_counts_rounds_exactly():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipesd_models.build.smollm2_draft import acceptance, greedy_continuations

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, intermediate_size=48, pad_token_id=0, eos_token_id=None)
    a, b = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    runs = greedy_continuations(a, [[1, 2, 3], [4, 5]], new_tokens=15)
    assert [len(r) for r in runs] == [1 + 3 + 15, 1 + 2 + 15] and runs[0][:4] == [3, 1, 2, 3]
    same = acceptance(a, runs)
    assert same["k4"] == {"acceptance_rate": 1.0, "mean_acceptance_length": 5.0}   # 3 rounds of 4 + the bonus token
    assert same["top1_agreement_on_greedy"] == 1.0
    # 12 tokens: rounds of 4, 4 and a last one cut to 2 by the end, still counted as 4 drafted (conservative)
    assert acceptance(a, greedy_continuations(a, [[1, 2, 3]], new_tokens=12))["k4"] == {
        "acceptance_rate": 0.8333, "mean_acceptance_length": 4.333}
    other = acceptance(b, runs)
    assert other["k2"]["acceptance_rate"] < 1.0


def test_a_teacher_cut_draft_keeps_the_chosen_layers_and_everything_else():
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipesd_models.build.smollm2_draft import PRESETS, _teacher_cut

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).eval()
    spec = dataclasses.replace(PRESETS["teacher-layers"], hidden=32, heads=4, ffn=48, layers=2, init_layers=(0, 3))
    draft = _teacher_cut(spec, teacher)
    t, d = teacher.state_dict(), draft.state_dict()
    assert draft.config.num_hidden_layers == 2 and draft.config.num_key_value_heads == 2
    assert torch.equal(d["model.layers.1.mlp.down_proj.weight"], t["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(d["model.layers.0.self_attn.k_proj.weight"], t["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(d["model.norm.weight"], t["model.norm.weight"])
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()   # still tied
    d["model.layers.1.mlp.down_proj.weight"].add_(1.0)     # a copy: training the draft leaves the teacher alone
    assert not torch.equal(d["model.layers.1.mlp.down_proj.weight"], t["model.layers.3.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="teacher's width"):
        _teacher_cut(dataclasses.replace(spec, hidden=16), teacher)


def test_a_distillation_stopped_mid_way_resumes_to_the_same_draft(tmp_path):
    """`--hours` stops the distillation at a checkpoint and the same command resumes it: the resumed run
    must take the same batches and end with the same weights, losses and learning curve as one never
    stopped (a build of several sittings is the same build)."""
    import dataclasses

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipesd_models.build.smollm2_draft import PRESETS, Mix, distill

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=48)
    torch.manual_seed(3)
    teacher, fresh = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).state_dict()
    spec = dataclasses.replace(PRESETS["smoke"], window=8, batch=2, steps=7, warmup=2, curve_every=2)
    rng = np.random.default_rng(0)
    teacher_seqs, code = [list(rng.integers(1, 64, 40)) for _ in range(4)], rng.integers(1, 64, 300)

    def run(pause=None, checkpoint=None, start=fresh):
        draft = LlamaForCausalLM(cfg)
        draft.load_state_dict(start)
        curve = lambda step: {"step": step, "norm": float(draft.lm_head.weight.detach().norm())}   # noqa: E731
        out = distill(draft, teacher, Mix(teacher_seqs, code, spec, eos=0), spec, lambda msg: None, curve,
                      checkpoint=checkpoint, pause=pause)
        return draft, out

    whole, straight = run()
    assert straight.finished and len(straight.losses) == 7 and [p["step"] for p in straight.curve] == [2, 4, 6]
    ckpt = tmp_path / "distill-checkpoint.pt"
    _, first = run(pause=lambda step: step == 3, checkpoint=ckpt)
    assert not first.finished and len(first.losses) == 3 and ckpt.exists()
    # Resumed from another start on purpose: everything it continues from must come from the checkpoint.
    torch.manual_seed(4)
    resumed, second = run(checkpoint=ckpt, start=LlamaForCausalLM(cfg).state_dict())
    assert second.finished and second.losses == straight.losses and second.curve == straight.curve
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert second.seconds >= first.seconds
