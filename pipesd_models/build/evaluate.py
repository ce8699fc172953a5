"""Quality figures for the manifest, measured on the exported files as the cloud loads them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def _logits(model, windows: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    return torch.cat([model(input_ids=windows[i:i + chunk]).logits.float() for i in range(0, len(windows), chunk)])


@torch.no_grad()
def heldout_metrics(target, draft, windows: torch.Tensor) -> dict:
    """Held-out cross-entropy (nats/token) of each model and teacher-forced top-1 agreement."""
    lt, ld = _logits(target, windows[:, :-1]), _logits(draft, windows[:, :-1])
    labels = windows[:, 1:].reshape(-1)
    ce_t = F.cross_entropy(lt.reshape(-1, lt.shape[-1]), labels).item()
    ce_d = F.cross_entropy(ld.reshape(-1, ld.shape[-1]), labels).item()
    agree = (lt.argmax(-1) == ld.argmax(-1)).float().mean().item()
    return {"target_heldout_ce": round(ce_t, 4), "draft_heldout_ce": round(ce_d, 4),
            "heldout_tokens": int(labels.numel()), "top1_agreement": round(agree, 4)}


@torch.no_grad()
def greedy_acceptance(target, draft, prompts: torch.Tensor, new_tokens: int, ks=(2, 4, 8)) -> dict:
    """Greedy speculative decoding with a fixed draft length k, simulated exactly.

    Along the target's greedy continuation, the draft's k-token proposal from a committed
    prefix matches exactly as long as the draft's argmax agrees with the target's token at
    each next position, so one teacher-forced pass of each model gives every round.
    """
    seqs = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    p = prompts.shape[1]
    match = (draft(input_ids=seqs[:, :-1]).logits.argmax(-1) == seqs[:, 1:])[:, p - 1:].numpy()
    return fixed_k_rounds(match, ks)


def fixed_k_rounds(match, ks=(2, 4, 8)) -> dict:
    """Acceptance rate and mean acceptance length of fixed-k rounds over rows of "the draft's argmax is the
    target's next token" along greedy continuations: each round accepts up to its first miss, then the
    target's token (a last round cut short by the row's end still counts k drafted: slightly conservative)."""
    out = {}
    for k in ks:
        drafted = accepted = rounds = 0
        for row in match:
            i = 0
            while i < len(row):
                window = row[i:i + k]
                a = int(np.argmin(window)) if not window.all() else len(window)
                drafted, accepted, rounds = drafted + k, accepted + a, rounds + 1
                i += a + 1
        out[f"k{k}"] = {"acceptance_rate": round(accepted / drafted, 4),
                        "mean_acceptance_length": round(1 + accepted / rounds, 3)}
    return out


def llamacpp_parity(gguf_path, hf_model, ids: list[int]) -> dict:
    """Max |logit difference| and argmax agreement between llama.cpp and transformers on one sequence."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    a = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        b = hf_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return {"max_abs_diff": float(np.abs(a - b).max()), "argmax_equal": float((a.argmax(-1) == b.argmax(-1)).mean())}
