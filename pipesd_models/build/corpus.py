"""Training text: the Python sources of CPython's standard library (PSF licence).

The selection is deterministic for a given CPython version: sorted paths, test
suites and vendored third-party code excluded, a fixed hash-based held-out split.
The corpus digest goes into the manifest so a rebuild can tell whether it saw the
same text.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folders left out: test suites (huge, repetitive), IDLE, vendored or generated code.
EXCLUDED_PARTS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                  "__pycache__", "lib2to3", "ensurepip", "turtledemo", "config-3.11-x86_64-linux-gnu"}
HELDOUT_PERCENT = 5
MAX_FILE_BYTES = 400_000


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[str]
    train_files: list[str]
    heldout_files: list[str]
    digest: str
    python_version: str

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.train)

    @property
    def heldout_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.heldout)


def _is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def collect(stdlib: Path | None = None, max_files: int | None = None) -> Corpus:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py")
                   if not EXCLUDED_PARTS.intersection(p.relative_to(root).parts))
    if max_files is not None:
        paths = paths[:max_files]
    digest = hashlib.sha256()
    train, heldout, train_files, heldout_files = [], [], [], []
    for path in paths:
        raw = path.read_bytes()
        if len(raw) > MAX_FILE_BYTES:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        if _is_heldout(rel):
            heldout.append(text)
            heldout_files.append(rel)
        else:
            train.append(text)
            train_files.append(rel)
    if not train or not heldout:
        raise RuntimeError(f"corpus under {root} is too small: {len(train)} train / {len(heldout)} held-out files")
    return Corpus(train, heldout, train_files, heldout_files, digest.hexdigest(),
                  ".".join(map(str, sys.version_info[:3])))
