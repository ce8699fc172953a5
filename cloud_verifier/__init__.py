"""The cloud side of PipeSD: a stateless-capable FastAPI verifier running the target model.

``create_app`` builds the ASGI app, ``VerifierService`` holds sessions and runs NAV,
``load_target`` picks a backend (transformers or llama.cpp), and ``LocalVerifier``
starts a verifier process on loopback (tests, demos, benchmarks).
"""

from .app import create_app
from .local import LocalVerifier
from .service import VerifierService
from .settings import VerifierSettings
from .target import LlamaCppTarget, Target, TorchTarget, load_target

__all__ = ["create_app", "LocalVerifier", "VerifierService", "VerifierSettings", "Target", "TorchTarget",
           "LlamaCppTarget", "load_target"]
