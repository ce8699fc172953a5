"""The public client API against the real verifier: budgets, stops, errors, stats, resync."""

import pytest

from edge_sdk import ConfigError, EdgeClient, PromptTooLongError, VerifierError
from privacy import ErrorCode, StaticKey

from .conftest import PROMPTS

pytestmark = pytest.mark.integration


def test_edge_only_needs_no_verifier():
    with EdgeClient(mode="edge_only", threads=1) as c:
        r = c.generate(PROMPTS[0], max_new_tokens=12)
    assert len(r.tokens) == 12 and r.stats.nav_rounds == 0 and r.stats.bytes_up == 0
    assert r.text and not any(e.verified for e in r.events)


@pytest.mark.parametrize("mode", ["cloud_only", "vanilla"])
def test_cloud_modes_need_a_verifier(mode):
    with EdgeClient(mode="edge_only", threads=1) as c, pytest.raises(ConfigError, match="needs a verifier"):
        c.generate("x", mode=mode)


@pytest.mark.parametrize("kwargs", [{"mode": "fastest"}, {"mode": "vanilla", "draft_k": 0}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        EdgeClient(**kwargs)


def test_bad_request_arguments(client):
    with pytest.raises(ConfigError):
        client.generate("x", max_new_tokens=0)
    with pytest.raises(ConfigError):
        client.generate([0, 10**6])
    with pytest.raises(PromptTooLongError):
        client.generate([0] * 5000)


@pytest.mark.parametrize("mode", ["cloud_only", "vanilla", "edge_only"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_is_exact(client, mode, n):
    r = client.generate(PROMPTS[4], max_new_tokens=n, mode=mode, **({"draft_k": 4} if mode == "vanilla" else {}))
    assert len(r.tokens) == n and r.stats.output_tokens == n and r.stats.finish_reason == "length"


def test_prompt_as_token_ids(client):
    ids = client.tokenize(PROMPTS[1])
    assert ids[0] == 0  # BOS
    assert client.generate(ids, max_new_tokens=16).tokens == client.generate(PROMPTS[1], max_new_tokens=16).tokens


@pytest.mark.parametrize("mode", ["cloud_only", "vanilla"])
def test_stop_sequence(client, mode):
    full = client.generate(PROMPTS[6], max_new_tokens=48, mode="cloud_only")
    # A stop sequence taken from the middle of the reference text, wherever it falls in a NAV round.
    cut = len(client.generate(PROMPTS[6], max_new_tokens=10, mode="cloud_only").text)
    stop = full.text[cut: cut + 3]
    assert len(stop) == 3
    r = client.generate(PROMPTS[6], max_new_tokens=48, mode=mode, stop=[stop])
    assert r.stats.finish_reason == "stop"
    assert r.text == full.text[: full.text.index(stop)]
    assert r.tokens == full.tokens[: len(r.tokens)] and len(r.tokens) < len(full.tokens)


def test_stats_are_consistent(client):
    r = client.generate(PROMPTS[2], max_new_tokens=40, mode="vanilla", draft_k=4)
    s = r.stats
    assert s.output_tokens == len(r.tokens) == 40
    assert s.prompt_tokens == len(r.prompt_tokens)
    assert 0 < s.nav_rounds <= 40 and s.draft_n <= 4 * s.nav_rounds
    assert 0 <= s.draft_n_accepted <= s.draft_n
    assert s.mean_acceptance_length == pytest.approx(1 + s.draft_n_accepted / s.nav_rounds)
    assert s.output_tokens == s.draft_n_accepted + s.nav_rounds  # each round commits accepted + 1
    assert 0 <= s.rollback_rate <= 1 and 0 <= s.acceptance_rate <= 1
    assert 0 < s.ttft_s <= s.total_s and s.tpt_ms > 0
    assert s.bytes_up > 0 and s.bytes_down > 0 and s.verify_s > 0 and s.draft_s > 0
    assert s.to_dict()["tpt_ms"] == s.tpt_ms and "acceptance=" in s.summary()


def test_unreachable_verifier_means_offline_generation():
    """Nothing listens there: the generation runs on the device at once, every token marked unverified."""
    with EdgeClient("http://127.0.0.1:9", verifier_key=StaticKey.generate().public_b64, threads=1,
                    connect_timeout=1.0) as c:
        alone = c.generate("x = ", max_new_tokens=8, mode="edge_only")
        for mode in ("pipesd", "vanilla", "cloud_only"):
            r = c.generate("x = ", max_new_tokens=8, mode=mode)
            assert r.tokens == alone.tokens, mode
            assert not any(e.verified for e in r.events) and r.stats.unverified_tokens == 8
        assert c.is_offline and c.engine.cloud.breaker.trips == 1


def test_cloud_client_needs_a_pinned_key_or_psk(verifier):
    with pytest.raises(ConfigError, match="pin the verifier"):
        EdgeClient(verifier.url, threads=1)


def test_wrong_pinned_key_fails_the_handshake(verifier):
    with EdgeClient(verifier.url, verifier_key=StaticKey.generate().public_b64, threads=1) as c:
        with pytest.raises(VerifierError) as err:
            c.generate("x", max_new_tokens=2)
    assert err.value.code is ErrorCode.HANDSHAKE_FAILED and "pinned key" in err.value.message
