"""ONNX export of a Llama draft with an explicit KV cache, for onnxruntime on the device.

    python -m pipesd_models.build.onnx_export            # the embedded draft -> data/draft.onnx
    python -m pipesd_models.build.onnx_export --gguf other.gguf --out dir/other.onnx --tokenizer
                                                      # ... and dir/tokenizer.json from the GGUF's vocabulary

The graph is a plain re-statement of the Llama forward pass (RMSNorm, rotary embeddings in the HF
layout, grouped-query attention, SwiGLU) written so that the cache is ordinary tensors:

    inputs   input_ids    int64 [1, n]
             past_keys    float32 [layers, kv_heads, past, head_dim]
             past_values  float32 [layers, kv_heads, past, head_dim]
    outputs  logits       float32 [1, n, vocab]
             keys         float32 [layers, kv_heads, past + n, head_dim]   (past and new)
             values       float32 [layers, kv_heads, past + n, head_dim]

`n` and `past` are dynamic; positions are past .. past + n - 1. Rolling back is slicing `keys` and
`values` to a shorter `past`, nothing else. Weights come from the GGUF through transformers (the same
f32 tensors torch runs), stored in float32. The model's metadata records the opset, the source file's
sha256, the vocabulary size, the context length and the special tokens, so the runtime needs no
other file but the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

OPSET = 17


class KVLlama(nn.Module):
    """A transformers ``LlamaForCausalLM``'s weights behind a forward pass with tensor KV caches."""

    def __init__(self, hf):
        super().__init__()
        cfg = hf.config
        self.layers, self.heads, self.kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 1e4)
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32)
                                                         / self.head_dim), persistent=False)
        self.model = hf.model
        self.lm_head = hf.lm_head

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        n, past = input_ids.shape[1], past_keys.shape[2]
        pos = torch.arange(n, dtype=torch.float32) + past
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]            # [1, 1, n, head_dim]
        # Row i (absolute position past + i) sees every cached position and new positions <= i.
        total = past + n
        cols = torch.arange(total)[None, :]
        rows = torch.arange(n)[:, None] + past
        mask = torch.where(cols <= rows, 0.0, float("-inf"))[None, None]   # [1, 1, n, total]
        x = self.model.embed_tokens(input_ids)
        keys, values = [], []
        group = self.heads // self.kv_heads
        for i, layer in enumerate(self.model.layers):
            att = layer.self_attn
            h = self._norm(x, layer.input_layernorm.weight)
            q = att.q_proj(h).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            k = att.k_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = att.v_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            k = torch.cat((past_keys[i][None], k), dim=2)                   # [1, kv_heads, total, head_dim]
            v = torch.cat((past_values[i][None], v), dim=2)
            keys.append(k[0])
            values.append(v[0])
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, n, self.heads * self.head_dim)
            x = x + att.o_proj(out)
            h = self._norm(x, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            x = x + mlp.down_proj(nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        logits = self.lm_head(self._norm(x, self.model.norm.weight))
        return logits, torch.stack(keys), torch.stack(values)


def export_onnx(gguf_path: Path, out: Path) -> dict:
    """Write `out`; return the metadata it records."""
    import onnx

    import gguf

    from .. import sha256_file
    from .export import load_gguf_torch

    hf = load_gguf_torch(gguf_path)
    cfg = hf.config
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if scaling.get("rope_type", "default") != "default":
        raise ValueError(f"{gguf_path}: rope scaling {scaling} is not supported by this exporter")
    module = KVLlama(hf).eval()
    head_dim = module.head_dim
    ids = torch.tensor([[0, 5, 9]], dtype=torch.int64)
    empty = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, 2, head_dim)
    seq = {1: "n"}
    cache = {2: "past"}
    with torch.inference_mode():
        torch.onnx.export(module, (ids, empty, empty), str(out), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "past_keys", "past_values"],
                          output_names=["logits", "keys", "values"],
                          dynamic_axes={"input_ids": seq, "past_keys": cache, "past_values": cache,
                                        "logits": seq, "keys": {2: "total"}, "values": {2: "total"}})
    reader = gguf.GGUFReader(str(gguf_path))
    eos = [int(reader.fields[k].contents()) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in reader.fields]
    context = int(reader.fields[f"{reader.fields['general.architecture'].contents()}.context_length"].contents())
    bos = int(reader.fields["tokenizer.ggml.bos_token_id"].contents()) if "tokenizer.ggml.bos_token_id" in reader.fields else 0
    # Whether a prompt starts with BOS, as llama.cpp decides from the same GGUF (SmolLM2 says no).
    add_bos = bool(reader.fields["tokenizer.ggml.add_bos_token"].contents()) \
        if "tokenizer.ggml.add_bos_token" in reader.fields else True
    meta = {"opset": str(OPSET), "source": gguf_path.name, "source_sha256": sha256_file(gguf_path),
            "vocab_size": str(cfg.vocab_size), "max_context": str(context), "bos": str(bos), "add_bos": str(int(add_bos)),
            "eos": json.dumps(list(dict.fromkeys(eos))), "layers": str(cfg.num_hidden_layers),
            "kv_heads": str(cfg.num_key_value_heads), "head_dim": str(head_dim)}
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(out))
    return meta


def write_tokenizer(gguf_path: Path, out: Path) -> None:
    """The GGUF's own tokenizer as an HF ``tokenizer.json`` (what OnnxDrafter reads), through transformers'
    GGUF reader. The embedded pair ships its tokenizer.json; other GGUFs (the SmolLM2 draft) need this."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ValueError(f"{gguf_path}: transformers cannot rebuild this GGUF's tokenizer ({exc})") from None
    tok.backend_tokenizer.save(str(out))


def main(argv=None) -> None:
    from .. import DATA_DIR, DRAFT_ONNX_FILE, MANIFEST_PATH, draft_path, load_manifest, sha256_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=draft_path())
    ap.add_argument("--out", type=Path, default=DATA_DIR / DRAFT_ONNX_FILE)
    ap.add_argument("--tokenizer", action="store_true",
                    help="also write tokenizer.json next to --out, from the GGUF's own vocabulary")
    args = ap.parse_args(argv)
    meta = export_onnx(args.gguf, args.out)
    if args.tokenizer:
        write_tokenizer(args.gguf, args.out.with_name("tokenizer.json"))
    if args.out.resolve() == (DATA_DIR / DRAFT_ONNX_FILE).resolve():   # the shipped file: record it
        manifest = load_manifest()
        manifest["files"][DRAFT_ONNX_FILE] = {"sha256": sha256_file(args.out), "bytes": args.out.stat().st_size}
        manifest["models"]["draft"]["onnx"] = {k: meta[k] for k in ("opset", "source", "source_sha256")}
        MANIFEST_PATH.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes, {meta}")


if __name__ == "__main__":
    main()
