"""Reproducible builder of the embedded model pair.

Fixed steps and fixed seeds: corpus (CPython's own standard library, PSF licence)
-> byte-level BPE tokenizer -> target (Llama, ~12M params) -> draft (~2M params,
distilled from the target) -> GGUF f16 export -> evaluation -> manifest.
Run ``python -m pipesd_models.build --help``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_build_args(prog: str, doc: str, presets, argv=None, more=None) -> argparse.Namespace:
    """The options both builders take: --preset, --out (the shipped data folder), --work, --threads;
    `more(parser)` adds a builder's own."""
    from .. import DATA_DIR

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(presets), default="full")
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--work", type=Path, default=Path("build/models-work"))
    ap.add_argument("--threads", type=int, default=2)
    if more is not None:
        more(ap)
    return ap.parse_args(argv)
