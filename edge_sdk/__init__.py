"""PipeSD edge SDK: speculative decoding with a draft model on the device and a target in the cloud.

Public surface: ``EdgeClient`` (generate / stream), its results and statistics, and
the errors it raises. Drafters, policies and transports are pluggable protocols.
"""

from .client import EdgeClient, Generation
from .drafter import Drafter, DraftToken, LlamaCppDrafter, OnnxDrafter, load_drafter
from .engine import GenerationResult, TokenEvent
from .emulation import EmulatedLink, LinkProfile
from .errors import (
    ConfigError,
    PipeSDError,
    PromptTooLongError,
    VerifierError,
    VerifierUnavailable,
    VocabMismatchError,
)
from .policies import MODES, Policy, make_policy
from .stats import GenerationStats
from .transport import HttpVerifier, Verifier

__all__ = [
    "EdgeClient", "Generation", "EmulatedLink", "LinkProfile", "GenerationResult", "GenerationStats", "TokenEvent", "Drafter", "DraftToken",
    "LlamaCppDrafter", "OnnxDrafter", "load_drafter", "Policy", "make_policy", "MODES", "Verifier", "HttpVerifier", "PipeSDError", "ConfigError",
    "PromptTooLongError", "VerifierError", "VerifierUnavailable", "VocabMismatchError",
]
