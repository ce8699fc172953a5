"""GGUF (f16) export of a transformers Llama, readable by llama.cpp and by transformers.

Tensor names and the q/k row permutation follow llama.cpp's own HF converter
(llama.cpp applies rotary embeddings to interleaved pairs, HF to split halves).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)),
            (f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)),
            (f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]),
            (f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]),
            (f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]),
            (f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]),
            (f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]),
        ]
    out += [("output_norm.weight", sd["model.norm.weight"]), ("output.weight", sd["lm_head.weight"])]
    return out


def add_llama_shape(w, cfg, context: int, rope_base: float, file_type=gguf.LlamaFileType.MOSTLY_F16) -> None:
    """The hyperparameters llama.cpp reads for a Llama, and the file type (both builders write them alike)."""
    w.add_context_length(context)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)


def export_gguf(model, tokenizer_vocab: tuple[list[str], list[int], list[str]], path: Path, name: str) -> None:
    cfg = model.config
    tokens, types, merges = tokenizer_vocab
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(name)
    w.add_description("PipeSD embedded model, trained on CPython's standard library sources (PSF licence)")
    w.add_license("PSF-2.0 (training text); model weights built by pipesd_models.build")
    add_llama_shape(w, cfg, cfg.max_position_embeddings, 10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for tname, arr in _tensors(model):
        # llama.cpp's converter keeps 1-D tensors (norms) in f32 and stores matrices in f16.
        w.add_tensor(tname, arr.astype(np.float32 if arr.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_gguf_torch(path: Path):
    """The exported file loaded back by transformers (dequantised to f32): what the cloud runs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()
