"""Everything that crosses the network between edge and cloud.

Message schemas, the bounded msgpack codec, zstd, the authenticated handshake and
AEAD frames (``channel``), and the typed errors live here so that ``edge_sdk`` and
``cloud_verifier`` share one contract without importing each other. Spec:
docs/wire-format.md.
"""

from .channel import (
    AFFINITY_HEADER,
    ChannelLimits,
    ClientHandshake,
    FrameType,
    HandshakeError,
    SecureChannel,
    StaticKey,
    parse_header,
    server_handshake,
)
from .codec import DecodeLimits, decode, encode
from .errors import ErrorCode, WireError
from .sampling import SamplingParams, SparseDist
from .messages import (
    BatchAck,
    OpenSession,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
    pack_tokens,
    prefix_hash,
    unpack_tokens,
    vocab_fingerprint,
)

__all__ = [
    "AFFINITY_HEADER", "ChannelLimits", "ClientHandshake", "FrameType", "HandshakeError", "SecureChannel", "StaticKey",
    "parse_header", "server_handshake", "DecodeLimits", "decode", "encode", "ErrorCode", "WireError",
    "BatchAck", "OpenSession", "SessionOpened", "VerifyRequest", "VerifyResponse", "pack_tokens", "prefix_hash",
    "unpack_tokens", "vocab_fingerprint", "SamplingParams", "SparseDist",
]
