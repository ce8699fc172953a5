"""The sealed channel: an authenticated X25519 handshake, then AEAD frames with replay protection.

Spec and test vectors: docs/wire-format.md. In short:

* Handshake (one round trip, Noise-NK-like). The edge sends an ephemeral X25519 key;
  the verifier answers with its own ephemeral key, a session id and a confirmation
  MAC. Keys = HKDF-SHA256 over DH(e_edge, s_verifier) || DH(e_edge, e_verifier)
  (or PSK || DH(e_edge, e_verifier) with a pre-shared key), salted with the hash of
  the transcript. Only the holder of the pinned static key can produce the MAC, so an
  edge pinning the wrong key fails at once; the ephemeral-ephemeral DH gives forward
  secrecy. In PSK mode the hello's ``psk_id`` is an HMAC over its own ephemeral key under a
  key derived from the PSK: new each time, and no use with other ephemerals. The verifier
  checks every hello field's type and length (and refuses small-order keys) before use, and
  holds the channel apart from its sessions until a frame sealed under it arrives.
* Frames. A 37-byte header (magic, version, type, flags, session id, sequence number,
  acknowledged sequence number) is the AEAD's associated data; the body is msgpack,
  zstd-compressed when that pays (flag bit 0), sealed with ChaCha20-Poly1305 under the
  sender's direction key. The nonce is the direction (4 bytes) and the sequence number
  (8 bytes): never random, never reused. Keys are ratcheted every ``rekey_interval``
  frames; a sliding window rejects repeated and stale sequence numbers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import struct
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.exceptions import InvalidTag

from .codec import DecodeLimits, decode, encode
from .compression import decompress, maybe_compress
from .errors import ErrorCode, WireError

MAGIC = b"PS"
VERSION = 1
HEADER = struct.Struct(">2sBBB16sQQ")   # magic, version, type, flags, session id, seq, ack
HEADER_BYTES = HEADER.size              # 37
TAG_BYTES = 16
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD
PROTOCOL_LABEL = b"PipeSD/1"
C2S, S2C = b"c2s\x00", b"s2c\x00"      # direction prefixes of the nonce


class FrameType(IntEnum):
    OPEN = 1       # edge -> verifier: OpenSession
    OPENED = 2     # verifier -> edge: SessionOpened
    VERIFY = 3     # edge -> verifier: VerifyRequest (a NAV round)
    RESULT = 4     # verifier -> edge: VerifyResponse
    ERROR = 5      # verifier -> edge: {"error": {...}} for failures after authentication
    CLOSE = 6      # edge -> verifier: end the session
    CLOSED = 7     # verifier -> edge
    ACK = 8        # verifier -> edge: BatchAck for a non-final VERIFY batch


@dataclass(frozen=True)
class ChannelLimits:
    max_frame_bytes: int = 1 << 20     # whole frame on the wire (413 beyond)
    max_body_bytes: int = 1 << 20      # body after decompression
    replay_window: int = 1024          # sequence numbers remembered behind the highest seen
    rekey_interval: int = 1 << 16      # frames per key epoch


@dataclass(frozen=True)
class Header:
    type: int
    flags: int
    session_id: bytes
    seq: int
    ack: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.type, self.flags, self.session_id, self.seq, self.ack)


def parse_header(frame: bytes, limits: ChannelLimits = ChannelLimits()) -> Header:
    """Check the frame's layout (before any key is involved) and return its header."""
    if len(frame) > limits.max_frame_bytes:
        raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, "frame exceeds the size limit")
    if len(frame) < HEADER_BYTES + TAG_BYTES:
        raise WireError(ErrorCode.BAD_FRAME, "frame too short")
    magic, version, ftype, flags, sid, seq, ack = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise WireError(ErrorCode.BAD_FRAME, "not a PipeSD frame")
    if version != VERSION:
        raise WireError(ErrorCode.BAD_FRAME, f"unsupported frame version {version}")
    if ftype not in FrameType._value2member_map_ or flags & ~KNOWN_FLAGS:
        raise WireError(ErrorCode.BAD_FRAME, "unknown frame type or flags")
    return Header(ftype, flags, sid, seq, ack)


class ReplayWindow:
    """Accepts each sequence number once, within `size` of the highest accepted (as in IPsec/WireGuard)."""

    def __init__(self, size: int):
        self.size = size
        self.highest = 0
        self.bits = 0   # bit i set = highest - i accepted

    def check(self, seq: int) -> bool:
        if seq == 0:
            return False
        if seq > self.highest:
            return True
        offset = self.highest - seq
        return offset < self.size and not (self.bits >> offset) & 1

    def accept(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1)
            self.highest = seq
        else:
            self.bits |= 1 << (self.highest - seq)


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


class _KeyChain:
    """Direction key for each epoch: key[e+1] = HKDF(key[e], info="rekey").

    A receiver derives at most one epoch ahead of the newest it has authenticated, and only
    keeps a derived key once a frame under it authenticates: a forged sequence number can
    neither make it hash for ever nor move its keys forward.
    """

    def __init__(self, key: bytes, interval: int):
        self.interval = interval
        self._keys = {0: key}

    def key_for(self, seq: int) -> bytes | None:
        epoch = seq // self.interval
        if epoch in self._keys:
            return self._keys[epoch]
        newest = max(self._keys)
        if epoch == newest + 1:
            return _hkdf(self._keys[newest], b"", PROTOCOL_LABEL + b" rekey", 32)
        return None   # older than the previous epoch, or more than one epoch ahead

    def commit(self, seq: int, key: bytes) -> None:
        """Remember the key that `seq` used; keep only its epoch and the one before."""
        epoch = seq // self.interval
        self._keys[epoch] = key
        for old in [e for e in self._keys if e < epoch - 1]:
            del self._keys[old]


class SecureChannel:
    """One side of an established session: seals outgoing frames and opens incoming ones."""

    def __init__(self, session_id: bytes, send_key: bytes, recv_key: bytes, is_client: bool,
                 limits: ChannelLimits = ChannelLimits()):
        self.session_id = session_id
        self.limits = limits
        self._send = _KeyChain(send_key, limits.rekey_interval)
        self._recv = _KeyChain(recv_key, limits.rekey_interval)
        self._send_dir, self._recv_dir = (C2S, S2C) if is_client else (S2C, C2S)
        self._seq = 0
        self._window = ReplayWindow(limits.replay_window)
        self._lock = threading.Lock()
        self._body_limits = DecodeLimits(max_body_bytes=limits.max_body_bytes, max_bin_bytes=limits.max_body_bytes)

    def seal(self, ftype: FrameType, message: dict, ack: int = 0, compress: bool = True) -> bytes:
        zstd, body = maybe_compress(encode(message)) if compress else (False, encode(message))
        return self.seal_bytes(ftype, body, FLAG_ZSTD if zstd else 0, ack)

    def seal_bytes(self, ftype: int, body: bytes, flags: int = 0, ack: int = 0) -> bytes:
        """Seal an already-encoded body under the next sequence number."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            key = self._send.key_for(seq)
            self._send.commit(seq, key)
        header = Header(int(ftype), flags, self.session_id, seq, ack).pack()
        return header + ChaCha20Poly1305(key).encrypt(self._send_dir + struct.pack(">Q", seq), body, header)

    def open(self, frame: bytes) -> tuple[Header, dict]:
        """Authenticate, replay-check, decompress and decode one frame."""
        header = parse_header(frame, self.limits)
        if not hmac.compare_digest(header.session_id, self.session_id):
            raise WireError(ErrorCode.UNAUTHENTICATED, "frame does not belong to this session")
        with self._lock:
            if not self._window.check(header.seq):
                raise WireError(ErrorCode.REPLAY, "repeated or stale frame")
            key = self._recv.key_for(header.seq)
            if key is None:
                raise WireError(ErrorCode.UNAUTHENTICATED, "frame failed authentication")
            try:
                body = ChaCha20Poly1305(key).decrypt(self._recv_dir + struct.pack(">Q", header.seq),
                                                     frame[HEADER_BYTES:], frame[:HEADER_BYTES])
            except InvalidTag:
                raise WireError(ErrorCode.UNAUTHENTICATED, "frame failed authentication") from None
            # Only authenticated frames move the window and the key epoch.
            self._window.accept(header.seq)
            self._recv.commit(header.seq, key)
        if header.flags & FLAG_ZSTD:
            body = decompress(body, self.limits.max_body_bytes)
        return header, decode(body, self._body_limits)


# -- keys -------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def parse_public_key(value: str | bytes, what: str = "verifier_key") -> bytes:
    """A pinned X25519 public key: 32 raw bytes, or their base64 as ``pipesd-verifier`` prints it.
    ValueError (saying what is wrong) otherwise."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise ValueError(f"{what} must be 32 bytes, got {len(value)}")
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be base64 text or 32 raw bytes, not {type(value).__name__}")
    return unb64(value, 32, what)


PSK_MIN_DISTINCT = 16   # distinct byte values 32 random bytes show (~30 expected; < 16: not random)


def parse_psk(value: str | bytes) -> bytes:
    """A pre-shared key as both sides use it; ValueError (saying why) otherwise.

    ``value`` is the contents of a PSK file as ``pipesd-verifier --generate-psk`` writes it (base64 of
    >= ``PSK_MIN_BYTES`` random bytes; surrounding whitespace ignored; ``openssl rand -base64 32`` makes
    one too), or the raw random bytes themselves. The key material (what the base64 decodes to) must be
    at least 32 bytes, must not be text (printable characters) and must not be a run of a few repeated
    bytes: a key a person can type (a passphrase) can be guessed offline, so it is refused, not taken.
    """
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"a pre-shared key must be text or bytes, not {type(value).__name__}")
    raw = bytes(value).strip()
    try:
        material = base64.b64decode(raw, validate=True) if raw else b""
    except ValueError:           # not base64: raw bytes
        material = raw
    hint = "make one with `pipesd-verifier --generate-psk FILE` and give the same file to both sides"
    if len(material) < PSK_MIN_BYTES:
        raise ValueError(f"a pre-shared key needs at least {PSK_MIN_BYTES} random bytes, got {len(material)}: {hint}")
    if _is_text(material) or len(set(material)) < PSK_MIN_DISTINCT:
        raise ValueError(f"refusing a passphrase-like pre-shared key: PSK mode needs at least {PSK_MIN_BYTES} "
                         f"random bytes (base64 in the key file), not text or repeated bytes: {hint}")
    return material


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in text)


def generate_psk() -> str:
    """A new pre-shared key as a PSK file holds it: base64 of 32 random bytes."""
    return b64(os.urandom(PSK_MIN_BYTES))


def write_key_file(path: str | Path, text: str, *, force: bool = False) -> None:
    """Write a secret to a new file readable by its owner only (mode 0600, O_EXCL: an existing file or a
    link at `path` raises FileExistsError). `force` replaces an existing file atomically: the secret
    goes to a new 0600 file beside it, renamed over it, so the old file's mode is not inherited."""
    path = Path(path)
    target = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp") if force else path
    fd = os.open(str(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text.rstrip("\n") + "\n")
        if force:
            os.replace(target, path)
    except BaseException:
        if force:
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise


def key_file_exposure(path: str | Path) -> str | None:
    """A one-line warning if group or others may read or write the key file at `path` (None if not,
    and on systems without POSIX modes)."""
    if os.name != "posix":
        return None
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        return (f"key file {path} is accessible to group/others (mode {mode:04o}); "
                f"anyone who reads it can impersonate the verifier: chmod 600 {path}")
    return None


class StaticKey:
    """The verifier's long-term X25519 key. Edges pin its public half."""

    def __init__(self, private: X25519PrivateKey):
        self.private = private
        self.public_bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> "StaticKey":
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "StaticKey":
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load(cls, path: str | Path) -> "StaticKey":
        return cls.from_private_bytes(unb64(Path(path).read_text(), 32, f"key file {path}"))

    def save(self, path: str | Path, *, force: bool = False) -> None:
        """Write the private key (base64) to a new 0600 file; FileExistsError if `path` exists, unless `force`."""
        write_key_file(path, b64(self.private.private_bytes_raw()), force=force)

    @property
    def public_b64(self) -> str:
        return b64(self.public_bytes)


# -- handshake ----------------------------------------------------------------------------
# ClientHello {v: 1, e (bin 32), r (bin 16)} + psk_id (bin 32) in PSK mode, and no other key
# ServerHello {e (bin 32), sid (bin 16), confirm (bin 32)}
PSK_MIN_BYTES = 32
HELLO_KEYS = frozenset({"v", "e", "r", "psk_id"})


def _derive(transcript: bytes, ikm: bytes) -> tuple[bytes, bytes, bytes]:
    okm = _hkdf(ikm, hashlib.sha256(transcript).digest(), PROTOCOL_LABEL + b" keys", 96)
    return okm[:32], okm[32:64], okm[64:]


def _transcript(server_id: bytes, client_e: bytes, client_r: bytes, server_e: bytes, sid: bytes) -> bytes:
    return PROTOCOL_LABEL + b" handshake" + server_id + client_e + client_r + server_e + sid


def _psk_id(psk: bytes, client_e: bytes, client_r: bytes) -> bytes:
    """PSK mode's identity, new in every handshake: an HMAC under a key derived from the PSK over this
    hello's ephemeral key and random. It proves possession of the PSK for this very ephemeral (a sniffed
    id replayed with other ephemerals is refused at once) and, unlike a fixed hash of the key, links
    nothing between a device's sessions."""
    k_id = _hkdf(psk, b"", PROTOCOL_LABEL + b" psk id key", 32)
    return hmac.new(k_id, PROTOCOL_LABEL + b" psk id" + client_e + client_r, hashlib.sha256).digest()


def _exact_bytes(message: dict, key: str, size: int) -> bytes:
    """``message[key]`` if it is a byte string of exactly `size` bytes; ValueError otherwise (an integer
    is refused, not turned into that many zero bytes)."""
    value = message.get(key)
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(key)
    return bytes(value)


class ClientHandshake:
    """Edge side. Pin the verifier's public key (32 raw bytes), or share a PSK (>= 32 bytes)."""

    def __init__(self, *, server_public: bytes | None = None, psk: bytes | None = None,
                 ephemeral: X25519PrivateKey | None = None, random: bytes | None = None):
        if (server_public is None) == (psk is None):
            raise ValueError("give exactly one of server_public (pinned verifier key) or psk")
        if psk is not None and len(psk) < PSK_MIN_BYTES:
            raise ValueError(f"a pre-shared key needs at least {PSK_MIN_BYTES} bytes")
        self.server_public, self.psk = server_public, psk
        self._e = ephemeral or X25519PrivateKey.generate()
        self._r = random or os.urandom(16)
        self.e_public = self._e.public_key().public_bytes_raw()

    def hello(self) -> dict:
        msg = {"v": VERSION, "e": self.e_public, "r": self._r}
        if self.psk is not None:
            msg["psk_id"] = _psk_id(self.psk, self.e_public, self._r)
        return msg

    def finish(self, reply: dict, limits: ChannelLimits = ChannelLimits()) -> SecureChannel:
        try:
            if not isinstance(reply, dict):
                raise ValueError("reply")
            server_e, sid = _exact_bytes(reply, "e", 32), _exact_bytes(reply, "sid", 16)
            confirm = _exact_bytes(reply, "confirm", 32)
            peer_e = X25519PublicKey.from_public_bytes(server_e)
            if self.psk is not None:
                server_id = _psk_id(self.psk, self.e_public, self._r)
                ikm = self.psk + self._e.exchange(peer_e)
            else:
                pinned = self.server_public or b""          # set: the constructor takes one of the two
                static = X25519PublicKey.from_public_bytes(pinned)
                server_id, ikm = pinned, self._e.exchange(static) + self._e.exchange(peer_e)
        except (TypeError, ValueError):   # ValueError also: a low-order point (all-zero shared secret)
            raise HandshakeError("the verifier's handshake reply is malformed") from None
        transcript = _transcript(server_id, self.e_public, self._r, server_e, sid)
        c2s, s2c, k_confirm = _derive(transcript, ikm)
        expected = hmac.new(k_confirm, transcript, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, confirm):
            raise HandshakeError("the verifier could not prove it holds the pinned key (or the pre-shared key): "
                                 "check the verifier public key / PSK configured on the edge")
        return SecureChannel(sid, c2s, s2c, is_client=True, limits=limits)


class HandshakeError(Exception):
    """The key exchange failed: wrong pinned key or PSK, or a malformed reply."""


def server_handshake(hello: dict, *, static: StaticKey | None, psk: bytes | None,
                     limits: ChannelLimits = ChannelLimits(), ephemeral: X25519PrivateKey | None = None,
                     session_id: bytes | None = None) -> tuple[dict, SecureChannel]:
    """Verifier side: answer a ClientHello; returns (ServerHello, channel).

    Nothing of the hello is used before it is checked: a map with no key beyond ``HELLO_KEYS``, ``v``
    the integer 1, ``e`` / ``r`` / ``psk_id`` byte strings of exactly 32 / 16 / 32 bytes (an integer is
    refused, never allocated), a client key that is not a low-order point (its shared secret would be
    all zero: ``cryptography`` raises, and that is caught), and in PSK mode an id that proves the PSK
    for this very ephemeral key. Every failure is ``WireError(handshake_failed)`` with no detail.

    The returned channel is not yet a session: the verifier holds it apart (``VerifierService``'s
    pre-authentication table) until a frame sealed under its keys proves the client holds them.
    """
    try:
        if not isinstance(hello, dict) or not set(hello) <= HELLO_KEYS:
            raise ValueError("keys")
        version = hello.get("v")
        if type(version) is not int or version != VERSION:
            raise ValueError("v")
        client_e, client_r = _exact_bytes(hello, "e", 32), _exact_bytes(hello, "r", 16)
        psk_id = _exact_bytes(hello, "psk_id", 32) if "psk_id" in hello else None
        peer_e = X25519PublicKey.from_public_bytes(client_e)
    except (TypeError, ValueError):
        raise WireError(ErrorCode.HANDSHAKE_FAILED, "malformed client hello") from None
    if psk_id is not None:
        if psk is None or not hmac.compare_digest(psk_id, _psk_id(psk, client_e, client_r)):
            raise WireError(ErrorCode.HANDSHAKE_FAILED, "handshake refused")
        server_id = psk_id
    elif static is None:
        raise WireError(ErrorCode.HANDSHAKE_FAILED, "handshake refused")
    else:
        server_id = static.public_bytes
    e = ephemeral or X25519PrivateKey.generate()
    try:
        dh = e.exchange(peer_e)
        if psk_id is not None and psk is not None:
            ikm = psk + dh
        elif static is not None:
            ikm = static.private.exchange(peer_e) + dh
        else:                    # not reached: refused above
            raise WireError(ErrorCode.HANDSHAKE_FAILED, "handshake refused")
    except ValueError:           # a low-order point: the shared secret would be all zero
        raise WireError(ErrorCode.HANDSHAKE_FAILED, "malformed client hello") from None
    server_e = e.public_key().public_bytes_raw()
    sid = session_id or os.urandom(16)
    transcript = _transcript(server_id, client_e, client_r, server_e, sid)
    c2s, s2c, k_confirm = _derive(transcript, ikm)
    reply = {"e": server_e, "sid": sid, "confirm": hmac.new(k_confirm, transcript, hashlib.sha256).digest()}
    return reply, SecureChannel(sid, s2c, c2s, is_client=False, limits=limits)
