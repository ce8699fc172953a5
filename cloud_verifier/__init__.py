"""The cloud side of PipeSD: a stateless-capable FastAPI verifier running the target model.

``create_app`` builds the ASGI app, ``VerifierService`` holds sessions and runs NAV,
``load_target`` picks a backend (transformers or llama.cpp), and ``LocalVerifier``
starts a verifier process on loopback (tests, demos, benchmarks).

Its libraries (FastAPI, uvicorn, torch, ...) are the ``verifier`` extra. The names below are
imported when first used, so that ``pipesd-verifier`` on an edge-only install can say what to
install instead of failing on import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import create_app
    from .local import LocalVerifier
    from .service import VerifierService
    from .settings import VerifierSettings
    from .target import LlamaCppTarget, ModelLoadError, Target, TorchTarget, load_target

_WHERE = {"create_app": ".app", "LocalVerifier": ".local", "VerifierService": ".service",
          "VerifierSettings": ".settings", "Target": ".target", "TorchTarget": ".target",
          "LlamaCppTarget": ".target", "load_target": ".target", "ModelLoadError": ".target"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'cloud_verifier' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
