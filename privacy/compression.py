"""zstd for frame bodies: only where it pays, and never an unbounded decompression."""

from __future__ import annotations

import io
import threading

import zstandard

from .errors import ErrorCode, WireError

MIN_COMPRESS_BYTES = 256   # below this, zstd's frame overhead rarely pays
MIN_SAVING = 0.9           # keep the compressed form only if it is at most 90% of the original
LEVEL = 3

# A ZstdCompressor is not thread-safe (python-zstandard says so; shared, concurrent compress() calls
# corrupted frames and crashed the process here): one per thread, as frames are sealed on several.
_local = threading.local()


def maybe_compress(body: bytes) -> tuple[bool, bytes]:
    """(compressed?, bytes): zstd when the body is large enough and shrinks by at least 10%."""
    if len(body) < MIN_COMPRESS_BYTES:
        return False, body
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=LEVEL)
    packed = compressor.compress(body)
    return (True, packed) if len(packed) <= MIN_SAVING * len(body) else (False, body)


def decompress(data: bytes, limit: int) -> bytes:
    """Decompress at most `limit` bytes.

    python-zstandard's ``max_output_size`` only applies when the frame does not declare
    its size, so a declared size is checked against the limit first; an undeclared one
    is read through a stream with a running cap.
    """
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, "decompressed body exceeds the limit")
        if declared >= 0:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
            if len(out) != declared:
                raise WireError(ErrorCode.BAD_FRAME, "decompressed size differs from the declared size")
            return out
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            out = reader.read(limit + 1)
        if len(out) > limit:
            raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, "decompressed body exceeds the limit")
        return out
    except zstandard.ZstdError:
        raise WireError(ErrorCode.BAD_FRAME, "body is not a valid zstd frame") from None
