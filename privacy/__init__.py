"""Everything that crosses the network between edge and cloud: the whole wire contract.

Message schemas, the bounded msgpack codec, zstd, the authenticated handshake and
AEAD frames (``channel``), key parsing, the HTTP paths and media types (``http``) and the
typed error codes live here so that ``edge_sdk`` and ``cloud_verifier`` share one contract
without importing each other. Spec: docs/wire-format.md and docs/protocol.md.
"""

from .channel import (PSK_MIN_BYTES, ChannelLimits, ClientHandshake, FrameType, HandshakeError,
    SecureChannel, StaticKey, generate_psk, key_file_exposure, parse_header, parse_psk, parse_public_key,
    server_handshake, write_key_file)
from .codec import DecodeLimits, decode, encode
from .errors import ErrorCode, WireError
from .http import (AFFINITY_HEADER, FRAMES_PATH, HANDSHAKE_PATH, MEDIA_FRAME, MEDIA_MSGPACK, MEDIA_STREAM,
    READY_PATH, ROUNDS_PATH)
from .sampling import SamplingParams, SparseDist
from .messages import (BatchAck, OpenSession, SessionOpened, VerifyRequest, VerifyResponse, pack_tokens,
    prefix_hash, unpack_tokens, vocab_fingerprint)

__all__ = [
    "PSK_MIN_BYTES", "ChannelLimits", "ClientHandshake", "FrameType", "HandshakeError", "SecureChannel", "StaticKey",
    "generate_psk", "key_file_exposure", "write_key_file",
    "parse_header", "parse_psk", "parse_public_key", "server_handshake", "DecodeLimits", "decode", "encode",
    "ErrorCode", "WireError", "AFFINITY_HEADER", "FRAMES_PATH", "HANDSHAKE_PATH", "MEDIA_FRAME", "MEDIA_MSGPACK",
    "MEDIA_STREAM", "READY_PATH", "ROUNDS_PATH", "BatchAck", "OpenSession", "SessionOpened", "VerifyRequest",
    "VerifyResponse", "pack_tokens", "prefix_hash", "unpack_tokens", "vocab_fingerprint", "SamplingParams",
    "SparseDist",
]
