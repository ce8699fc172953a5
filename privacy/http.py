"""The protocol's HTTP surface, shared by both ends: paths, media types and the affinity header.

Spec: docs/protocol.md. Everything on ``/v1/frames`` and ``/v1/rounds`` is sealed (``channel.py``);
only the handshake travels as plain msgpack.
"""

from __future__ import annotations

HANDSHAKE_PATH = "/v1/handshake"    # ClientHello -> ServerHello, plain msgpack
FRAMES_PATH = "/v1/frames"          # one sealed frame per request, answered by one sealed frame
ROUNDS_PATH = "/v1/rounds"          # a round's batches streamed in one request body, answered by its NAV result
READY_PATH = "/health/ready"

MEDIA_MSGPACK = "application/msgpack"
MEDIA_FRAME = "application/x-pipesd-frame"
MEDIA_STREAM = "application/x-pipesd-stream"   # length-prefixed (4 bytes, big-endian) sealed frames

# HTTP header an edge puts on every request of a client (handshake included): a random token,
# the same across its re-handshakes, that a load balancer may hash so that a session's requests
# reach the replica holding it. Random, so it says nothing about the user or the content;
# routing on it is an optimisation: a replica without the session answers unauthenticated.
AFFINITY_HEADER = "x-pipesd-affinity"
