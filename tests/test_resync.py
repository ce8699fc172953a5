"""Sessions are a cache: a verifier restart or a move to another replica mid-generation changes nothing.

The generation is paused between two committed tokens (the stream is lazy), the verifier is
killed, and the stream resumes: the edge handshakes again, resends its prefix, and the
greedy output stays token-identical to an undisturbed run.
"""

import pytest

from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def primary():
    # The llama.cpp target restarts in about a second, the torch one in about six (importing transformers
    # and converting the GGUF): restarts and replicas run on llama.cpp here, and one restart of each kind of
    # round on torch in test_restart_of_the_torch_verifier below. The protocol is the same on both.
    with LocalVerifier(model="embedded", backend="llamacpp", threads=1) as v:
        yield v


@pytest.fixture(scope="module")
def torch_primary():
    with LocalVerifier(model="embedded", threads=1) as v:
        yield v


MODES = [("vanilla", {"draft_k": 4}), ("pipesd", {}), ("pipesd", {"objective": "cloud_cost"}), ("tree", {})]


# Paused after the first token (the session just opened) and mid-generation (rounds, for pipelined PipeSD
# rounds ahead, in flight); every objective is also restarted under an emulated link in test_engine.py.
@pytest.mark.parametrize("pause_after,mode,settings", [(1, *MODES[0]), (9, *MODES[0]), (1, *MODES[1]),
                                                       (9, *MODES[1]), (9, *MODES[2])])
def test_restart_mid_generation(primary, pause_after, mode, settings):
    with EdgeClient(primary.url, verifier_key=primary.public_key, threads=1, mode=mode, **settings) as client:
        reference = client.generate(PROMPTS[5], max_new_tokens=40, mode="cloud_only").tokens
        gen = client.stream(PROMPTS[5], max_new_tokens=40)
        events = iter(gen)
        head = [next(events).token for _ in range(pause_after)]
        primary.restart()                      # SIGKILL, then a fresh process on the same port and key
        tail = [e.token for e in events if e.token is not None]
    assert head + tail == reference
    assert gen.stats.resyncs >= 1


@pytest.mark.parametrize("mode,settings", MODES[:2])
def test_failover_to_a_second_replica(primary, mode, settings):
    with primary.replica() as second:
        with EdgeClient([primary.url, second.url], verifier_key=primary.public_key, threads=1, mode=mode,
                        **settings) as client:
            reference = client.generate(PROMPTS[8], max_new_tokens=40, mode="cloud_only").tokens
            gen = client.stream(PROMPTS[8], max_new_tokens=40)
            events = iter(gen)
            head = [next(events).token for _ in range(6)]
            primary.kill()                     # the edge moves to the replica, which has never seen it
            tail = [e.token for e in events if e.token is not None]
            assert client.verifier.url == second.url
        primary.start()                        # leave the module fixture as it was
    assert head + tail == reference
    assert gen.stats.resyncs >= 1


@pytest.mark.parametrize("mode,settings", [MODES[1], MODES[3]])
def test_restart_of_the_torch_verifier(torch_primary, mode, settings):
    """The torch target (its KV pool) forgets a session as well: mid-generation, pipelined rounds in flight,
    or token trees (the llama.cpp target verifies chains only, so trees are restarted here)."""
    test_restart_mid_generation(torch_primary, 9, mode, settings)
