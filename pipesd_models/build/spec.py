"""Build presets: every number that shapes the embedded pair, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    ffn: int

    def llama_config(self, vocab_size: int, context: int):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads,
                           intermediate_size=self.ffn, max_position_embeddings=context,
                           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)


@dataclass(frozen=True)
class BuildSpec:
    name: str
    vocab_size: int
    target: ModelShape
    draft: ModelShape
    context: int            # training sequence length = context length written to the GGUF
    batch: int              # sequences per optimiser step
    target_steps: int
    draft_steps: int
    target_lr: float
    draft_lr: float
    warmup: int
    ce_weight: float        # distillation loss = ce_weight * CE + (1 - ce_weight) * KL(target || draft)
    seed: int = 1234
    max_files: int | None = None          # corpus cap (smoke only)
    eval_windows: int = 160               # held-out windows of `context` tokens for CE / agreement
    eval_prompts: int = 48                # prompts for the greedy-acceptance simulation
    eval_new_tokens: int = 96
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # The shipped pair. ~12M / ~2M parameters (docs/design.md §8).
    "full": BuildSpec(name="full", vocab_size=2048,
                      target=ModelShape(hidden=384, layers=6, heads=6, ffn=1024),
                      draft=ModelShape(hidden=192, layers=3, heads=3, ffn=512),
                      context=512, batch=16, target_steps=1200, draft_steps=800,
                      target_lr=2e-3, draft_lr=3e-3, warmup=100, ce_weight=0.3),
    # Minutes: a usable but weak pair, for developing against while `full` trains.
    "quick": BuildSpec(name="quick", vocab_size=2048,
                       target=ModelShape(hidden=384, layers=6, heads=6, ffn=1024),
                       draft=ModelShape(hidden=192, layers=3, heads=3, ffn=512),
                       context=512, batch=8, target_steps=120, draft_steps=80,
                       target_lr=2e-3, draft_lr=3e-3, warmup=20, ce_weight=0.3,
                       eval_windows=16, eval_prompts=8, eval_new_tokens=32),
    # Seconds: tiny random-ish models that exercise every stage (tests use it).
    "smoke": BuildSpec(name="smoke", vocab_size=300,
                       target=ModelShape(hidden=64, layers=2, heads=2, ffn=128),
                       draft=ModelShape(hidden=32, layers=1, heads=1, ffn=64),
                       context=64, batch=4, target_steps=3, draft_steps=3,
                       target_lr=1e-3, draft_lr=1e-3, warmup=1, ce_weight=0.3, max_files=80,
                       eval_windows=4, eval_prompts=3, eval_new_tokens=8),
}
