"""The emulated link as a real TCP proxy between a real edge and the real verifier (loopback)."""

import time

import pytest

from edge_sdk import EdgeClient
from pipesd_lab.emulation import LinkProfile
from pipesd_lab.linkproxy import LinkProxy

from .conftest import PROMPTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def proxy(verifier):
    host, port = verifier.url.removeprefix("http://").rsplit(":", 1)
    with LinkProxy((host, int(port)), LinkProfile(up_mbps=5, down_mbps=50, rtt_ms=40, jitter_ms=5, seed=1)) as p:
        yield p


def test_generation_through_the_proxy_is_lossless_and_shaped(verifier, client, proxy):
    reference = client.generate(PROMPTS[2], max_new_tokens=24, mode="cloud_only").tokens
    with EdgeClient(proxy.url, verifier_key=verifier.public_key, threads=1) as edge:
        t = time.perf_counter()
        cloud = edge.generate(PROMPTS[2], max_new_tokens=8, mode="cloud_only")
        elapsed = time.perf_counter() - t
        assert cloud.tokens == reference[:8]
        # Every cloud-only token is a round trip across a 40 ms (+-5 ms one way) link.
        assert elapsed >= 8 * 0.030
        for mode in ("vanilla", "pipesd", "pipesd_per_token"):
            assert edge.generate(PROMPTS[2], max_new_tokens=24, mode=mode).tokens == reference, mode
    assert proxy.bytes_up > 0 and proxy.bytes_down > 0


def test_link_cut_goes_offline_and_recovers(verifier, client, proxy):
    reference = client.generate(PROMPTS[5], max_new_tokens=16, mode="cloud_only").tokens
    with EdgeClient(proxy.url, verifier_key=verifier.public_key, threads=1, connect_timeout=2,
                    read_timeout=5) as edge:
        alone = edge.generate(PROMPTS[5], max_new_tokens=16, mode="edge_only").tokens
        assert edge.generate(PROMPTS[5], max_new_tokens=16, mode="vanilla").tokens == reference
        proxy.set_down()
        cut = edge.generate(PROMPTS[5], max_new_tokens=16, mode="vanilla")
        assert cut.tokens == alone and cut.stats.unverified_tokens == 16 and cut.stats.breaker_trips == 1
        proxy.set_down(False)
        deadline = time.monotonic() + 10
        while edge.is_offline and time.monotonic() < deadline:
            edge.generate(PROMPTS[5], max_new_tokens=16, mode="vanilla")   # offline until the prober sees it
            time.sleep(0.05)
        assert not edge.is_offline
        assert edge.generate(PROMPTS[5], max_new_tokens=16, mode="vanilla").tokens == reference
