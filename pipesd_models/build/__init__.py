"""Reproducible builder of the embedded model pair.

Fixed steps and fixed seeds: corpus (CPython's own standard library, PSF licence)
-> byte-level BPE tokenizer -> target (Llama, ~12M params) -> draft (~2M params,
distilled from the target) -> GGUF f16 export -> evaluation -> manifest.
Run ``python -m pipesd_models.build --help``.
"""
