"""On-device privacy: a private request (or a local-only client) never touches a socket."""

import socket

import pytest

from edge_sdk import EdgeClient

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


class SocketUsed(Exception):
    pass


@pytest.fixture()
def no_sockets(monkeypatch):
    """Any connect, send or receive on any socket of this process raises and is recorded."""
    used = []

    def guard(name):
        def fail(*args, **kwargs):
            used.append(name)
            raise SocketUsed(name)
        return fail

    for name in ("connect", "connect_ex", "send", "sendall", "sendto", "recv", "recv_into", "recvfrom"):
        monkeypatch.setattr(socket.socket, name, guard(name))
    monkeypatch.setattr(socket, "create_connection", guard("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", guard("getaddrinfo"))
    return used


def test_guard_catches_a_normal_request(verifier, no_sockets):
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, threads=1) as client:
        with pytest.raises(Exception):
            client.generate(PROMPTS[0], max_new_tokens=4)
    assert no_sockets, "the guard must see the socket use of a cloud request"


def test_private_request_stays_on_device(verifier, no_sockets):
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, threads=1) as client:
        r = client.generate(PROMPTS[0], max_new_tokens=8, private=True)
    assert no_sockets == []
    assert len(r.tokens) == 8 and r.stats.mode == "edge_only" and r.stats.bytes_up == 0
    assert not any(e.verified for e in r.events)


def test_local_only_client_never_connects(verifier, no_sockets):
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, local_only=True, threads=1) as client:
        r = client.generate(PROMPTS[1], max_new_tokens=8, mode="vanilla")
    assert no_sockets == [] and r.stats.mode == "edge_only" and len(r.tokens) == 8
