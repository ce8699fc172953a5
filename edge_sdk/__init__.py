"""PipeSD edge SDK: speculative decoding with a draft model on the device and a target in the cloud.

Public surface: ``EdgeClient`` (generate / stream), its results and statistics, and the errors
it raises. Drafters (``Drafter``), transports (``Verifier``) and decoding policies (``Policy``)
are small protocols an app or a test can implement. This package imports neither the verifier
nor the energy harness nor the lab (only the ``pipesd`` CLI hands ``bench``/``energy``/``link`` to the
lab, importing it then): a device needs only ``pip install pipesd``.
"""

from .client import EdgeClient, Generation
from .drafter import Drafter, DraftToken, LlamaCppDrafter, OnnxDrafter, load_drafter
from .engine import GenerationResult, TokenEvent
from .errors import (
    ConfigError,
    HandshakeFailed,
    ModelLoadError,
    Overloaded,
    OverloadTimeout,
    PipeSDError,
    PromptTooLongError,
    SessionLost,
    VerifierError,
    VerifierTimeout,
    VerifierUnavailable,
    VocabMismatchError,
)
from .policies import MODES, PipeSD, Policy, RoundVerdict, Speculative, make_policy
from .stats import GenerationStats, RoundRecord
from .transport import HttpVerifier, RoundChannel, Verifier

__all__ = [
    "EdgeClient", "Generation", "GenerationResult", "GenerationStats", "RoundRecord", "TokenEvent", "Drafter", "DraftToken",
    "LlamaCppDrafter", "OnnxDrafter", "load_drafter", "Policy", "Speculative", "PipeSD", "RoundVerdict",
    "make_policy", "MODES", "Verifier", "RoundChannel", "HttpVerifier", "PipeSDError", "ConfigError",
    "PromptTooLongError", "VerifierError", "SessionLost", "VerifierUnavailable", "VerifierTimeout",
    "VocabMismatchError", "HandshakeFailed", "ModelLoadError", "Overloaded", "OverloadTimeout",
]
