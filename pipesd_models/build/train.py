"""Training loops: the target by next-token cross-entropy, the draft by distillation from the target."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .spec import BuildSpec, ModelShape


def encode_corpus(tokenizer, texts: list[str]) -> np.ndarray:
    """One stream of ids: every document preceded by <|endoftext|> (id 0)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.append(0)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, length: int, count: int) -> torch.Tensor:
    """Non-overlapping evaluation windows of `length` tokens from the start of the stream."""
    n = min(count, (len(stream) - 1) // length)
    return torch.from_numpy(stream[: n * length].reshape(n, length).copy())


class Batches:
    """Seeded random windows of the training stream (inputs and next-token labels)."""

    def __init__(self, stream: np.ndarray, spec: BuildSpec, seed: int):
        self.stream = torch.from_numpy(stream)
        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        L = self.spec.context
        starts = torch.randint(0, len(self.stream) - L - 1, (self.spec.batch,), generator=self.gen)
        return torch.stack([self.stream[s: s + L + 1] for s in starts.tolist()])


def new_model(shape: ModelShape, spec: BuildSpec, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.llama_config(spec.vocab_size, spec.context))


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model, lr: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _run(model, steps: int, peak: float, warmup: int, loss_fn, batches: Batches, label: str, log) -> list[float]:
    opt = _optimizer(model, peak)
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, peak, warmup)
        batch = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == steps - 1):
            rate = (step + 1) * batch.numel() / (time.time() - t0)
            log(f"{label} step {step + 1}/{steps} loss {np.mean(losses[-50:]):.3f} ({rate:.0f} tok/s)")
    model.eval()
    return losses


def train_target(stream: np.ndarray, spec: BuildSpec, log=print):
    model = new_model(spec.target, spec, spec.seed)
    batches = Batches(stream, spec, spec.seed + 1)

    def loss_fn(batch):
        logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    _run(model, spec.target_steps, spec.target_lr, spec.warmup, loss_fn, batches, "target", log)
    return model


def distill_draft(stream: np.ndarray, target, spec: BuildSpec, log=print):
    """Draft trained on ce_weight * CE(labels) + (1 - ce_weight) * KL(target || draft).

    Distillation is what makes the draft agree with the target (docs/design.md §8: greedy
    acceptance at k=4 was 0.56 distilled vs 0.23 trained on labels alone).
    """
    model = new_model(spec.draft, spec, spec.seed + 2)
    batches = Batches(stream, spec, spec.seed + 3)
    target.eval()

    def loss_fn(batch):
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            teacher = F.log_softmax(target(input_ids=inputs).logits.float(), dim=-1)
        student = F.log_softmax(model(input_ids=inputs).logits.float(), dim=-1)
        ce = F.nll_loss(student.reshape(-1, student.shape[-1]), labels.reshape(-1))
        kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
        return spec.ce_weight * ce + (1 - spec.ce_weight) * kl

    _run(model, spec.draft_steps, spec.draft_lr, spec.warmup, loss_fn, batches, "draft", log)
    return model
