"""Everything that crosses the network between edge and cloud.

Message schemas, the bounded msgpack codec and the typed errors live here so that
``edge_sdk`` and ``cloud_verifier`` share one contract without importing each other.
"""

from .codec import DecodeLimits, decode, encode
from .errors import ErrorCode, WireError
from .messages import (
    OpenSession,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
    pack_tokens,
    unpack_tokens,
    vocab_fingerprint,
)

__all__ = [
    "DecodeLimits", "decode", "encode", "ErrorCode", "WireError", "OpenSession", "SessionOpened",
    "VerifyRequest", "VerifyResponse", "pack_tokens", "unpack_tokens", "vocab_fingerprint",
]
