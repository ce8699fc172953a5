"""python -m pipesd_models.build [--preset full|quick|smoke] [--out DIR] [--work DIR]

Builds the embedded pair end to end. Stages are checkpointed in --work so an
interrupted build resumes where it stopped; the output is deterministic for a
given preset, seed and CPython version (the corpus digest is in the manifest).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from .. import DRAFT_FILE, TARGET_FILE, TOKENIZER_FILE, sha256_file
from . import corpus as corpus_mod
from . import parse_build_args
from .spec import PRESETS


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage_model(work: Path, name: str, build_fn):
    """Train once; later runs with the same work dir load the checkpoint instead."""
    from transformers import LlamaForCausalLM

    ckpt = work / name
    if (ckpt / "config.json").exists():
        _log(f"{name}: reusing checkpoint {ckpt}")
        return LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    model = build_fn()
    model.save_pretrained(str(ckpt))
    return model


def build(preset: str, out: Path, work: Path, threads: int) -> dict:
    from tokenizers import Tokenizer

    from .evaluate import greedy_acceptance, heldout_metrics, llamacpp_parity
    from .export import export_gguf, load_gguf_torch
    from .tokenizer import gguf_vocab, train_tokenizer
    from .train import distill_draft, encode_corpus, train_target, windows

    spec = PRESETS[preset]
    torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)
    work = work / preset
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    corpus = corpus_mod.collect(max_files=spec.max_files)
    _log(f"corpus: {len(corpus.train_files)} train files ({corpus.train_bytes / 1e6:.1f} MB), "
         f"{len(corpus.heldout_files)} held-out ({corpus.heldout_bytes / 1e6:.2f} MB), digest {corpus.digest[:12]}")
    tok_path = work / TOKENIZER_FILE
    if tok_path.exists():
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = train_tokenizer(corpus.train, spec.vocab_size)
        tokenizer.save(str(tok_path))
    train_stream = encode_corpus(tokenizer, corpus.train)
    held_stream = encode_corpus(tokenizer, corpus.heldout)
    _log(f"tokens: {len(train_stream)} train, {len(held_stream)} held-out "
         f"({corpus.train_bytes / len(train_stream):.2f} bytes/token)")

    target = _stage_model(work, "target", lambda: train_target(train_stream, spec, _log))
    draft = _stage_model(work, "draft", lambda: distill_draft(train_stream, target, spec, _log))

    vocab = gguf_vocab(tokenizer)
    tokenizer.save(str(out / TOKENIZER_FILE))
    export_gguf(target, vocab, out / TARGET_FILE, "pipesd-target")
    export_gguf(draft, vocab, out / DRAFT_FILE, "pipesd-draft")
    _log("exported GGUF files; evaluating the files as shipped")

    target_f, draft_f = load_gguf_torch(out / TARGET_FILE), load_gguf_torch(out / DRAFT_FILE)
    held = windows(held_stream, spec.context, spec.eval_windows)
    quality = heldout_metrics(target_f, draft_f, held)
    gen = torch.Generator().manual_seed(spec.seed + 4)
    starts = torch.randint(0, len(held_stream) - 64, (spec.eval_prompts,), generator=gen).tolist()
    prompts = torch.stack([torch.from_numpy(held_stream[s:s + 32].copy()) for s in starts])
    acceptance = greedy_acceptance(target_f, draft_f, prompts, spec.eval_new_tokens)
    sample = held_stream[: min(128, spec.context)].tolist()
    parity = {"target": llamacpp_parity(out / TARGET_FILE, target_f, sample),
              "draft": llamacpp_parity(out / DRAFT_FILE, draft_f, sample)}
    tok_check = _tokenizer_check(out / DRAFT_FILE, tokenizer, corpus.heldout[:20])
    _log(f"quality {quality}; acceptance {acceptance}; parity {parity}; tokenizer {tok_check}")

    manifest = {
        "format": 1,
        "files": {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
                  for name in (DRAFT_FILE, TARGET_FILE, TOKENIZER_FILE)},
        "models": {
            "target": {"params": sum(p.numel() for p in target.parameters()), "shape": spec.target.__dict__,
                       "heldout_ce": quality["target_heldout_ce"]},
            "draft": {"params": sum(p.numel() for p in draft.parameters()), "shape": spec.draft.__dict__,
                      "heldout_ce": quality["draft_heldout_ce"]},
        },
        "pair": {"heldout_tokens": quality["heldout_tokens"], "top1_agreement": quality["top1_agreement"],
                 "greedy_acceptance": acceptance, "acceptance_eval": {
                     "prompts": spec.eval_prompts, "prompt_tokens": 32, "new_tokens": spec.eval_new_tokens}},
        "llamacpp_vs_torch": parity,
        "tokenizer": {"vocab_size": spec.vocab_size, "llamacpp_matches_hf": tok_check},
        "build": {"preset": spec.to_dict(), "corpus": {
            "source": "CPython standard library .py sources (PSF licence)", "python": corpus.python_version,
            "digest": corpus.digest, "train_files": len(corpus.train_files), "heldout_files": len(corpus.heldout_files),
            "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(held_stream))},
            "torch": torch.__version__, "platform": platform.platform(), "threads": threads},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _log(f"wrote {out / 'manifest.json'}")
    return manifest


def _tokenizer_check(gguf_path: Path, tokenizer, texts: list[str]) -> float:
    """Fraction of sample texts that llama.cpp tokenizes exactly as the training tokenizer did."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=64, vocab_only=True, verbose=False)
    same = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == tokenizer.encode(t).ids for t in texts)
    return round(same / len(texts), 4)


def main(argv=None) -> int:
    args = parse_build_args("python -m pipesd_models.build", __doc__, PRESETS, argv)
    build(args.preset, args.out, args.work, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
