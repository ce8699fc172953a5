"""msgpack encoding with a bounded decoder.

Decoding untrusted bytes must not allocate without limit or build exotic objects:
sizes are capped before allocation, ext types are refused and maps need string keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from .errors import ErrorCode, WireError


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds applied while decoding one message body."""

    max_body_bytes: int = 1 << 20     # whole body
    max_bin_bytes: int = 1 << 20      # one binary field (packed token ids)
    max_str_bytes: int = 4096         # one string
    max_array_len: int = 4096         # one array
    max_map_len: int = 64             # one map


DEFAULT_LIMITS = DecodeLimits()


def encode(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _no_ext(code, data):
    raise WireError(ErrorCode.MALFORMED, "msgpack ext types are not accepted")


def decode(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> dict:
    if len(data) > limits.max_body_bytes:
        raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body of {len(data)} bytes exceeds {limits.max_body_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext,
                              max_bin_len=limits.max_bin_bytes, max_str_len=limits.max_str_bytes,
                              max_array_len=limits.max_array_len, max_map_len=limits.max_map_len,
                              max_ext_len=0)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError) as exc:
        raise WireError(ErrorCode.MALFORMED, f"body is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.MALFORMED, "body must be a msgpack map")
    return obj
