"""``pipesd serve`` through the official ``openai`` client: real serve processes, real verifiers, loopback.

The text it serves must be the target's own greedy text (what ``cloud_only`` produces), streamed or
not; it must keep answering, marked unverified, when the verifier dies mid-stream; a client that goes
away must stop its generation; bad input must get OpenAI's error object with a 4xx, never a 500.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from cloud_verifier import LocalVerifier
from edge_sdk.chat import PLAIN_STOP, PLAIN_TEMPLATE, ChatTemplate
from edge_sdk.serve.local import LocalServe

from .conftest import PROMPTS

pytestmark = pytest.mark.integration
API_KEY = "serve-test-key-0123456789"
# A verifier whose every target pass takes 40 ms longer: long enough to act mid-stream.
SLOW = ["--emulate-pass-ms", "40,0"]


def verifier_args(v: LocalVerifier, *more: str) -> list[str]:
    return ["--verifier", v.url, "--verifier-key", v.public_key, "--threads", "1", *more]


@pytest.fixture(scope="module")
def serve(verifier):
    with LocalServe(verifier_args(verifier)) as s:        # mode pipesd, the default
        yield s


@pytest.fixture(scope="module")
def api(serve):
    return openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def slow_verifier():
    with LocalVerifier(model="embedded", threads=1, extra_args=SLOW) as v:
        yield v


@pytest.fixture(scope="module")
def slow_serve(slow_verifier):
    with LocalServe(verifier_args(slow_verifier, "--max-queue", "1")) as s:
        yield s


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def reference(client, prompt, n: int, stop=()) -> str:
    """The target's own greedy continuation: cloud_only."""
    return client.generate(prompt, mode="cloud_only", max_new_tokens=n, stop=list(stop)).text


# -- the text is the target's --------------------------------------------------------------------

def test_models_lists_the_served_model(api):
    assert [m.id for m in api.models.list().data] == ["embedded"]
    assert api.models.retrieve("embedded").id == "embedded"


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_completion_is_the_targets_greedy_text_streamed_or_not(api, client, prompt):
    want = reference(client, prompt, 40)
    whole = api.completions.create(model="embedded", prompt=prompt, max_tokens=40, temperature=0)
    assert whole.choices[0].text == want
    assert whole.usage.completion_tokens == 40 and whole.choices[0].finish_reason == "length"
    info = whole.usage.model_extra["pipesd"]
    assert info["mode"] == "pipesd" and info["nav_rounds"] >= 1 and info["unverified_tokens"] == 0
    assert info["verified_tokens"] == 40 and info["unverified_ranges"] == []

    chunks = list(api.completions.create(model="embedded", prompt=prompt, max_tokens=40, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_renders_the_plain_template_and_streams_the_targets_text(api, client):
    messages = [{"role": "system", "content": "Python only."}, {"role": "user", "content": "def add(a, b):"}]
    ids = client.tokenize(ChatTemplate(PLAIN_TEMPLATE, stop=PLAIN_STOP, builtin=True).render(messages),
                          parse_special=True)
    want = reference(client, ids, 30, PLAIN_STOP)
    whole = api.chat.completions.create(model="embedded", messages=messages, max_tokens=30, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(ids)

    stream = api.chat.completions.create(model="embedded", messages=messages, max_completion_tokens=30,
                                         temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("length", "stop")
    assert final.model_extra["pipesd"]["unverified_tokens"] == 0


def test_seeded_sampling_is_reproducible(api):
    kw = dict(model="embedded", prompt=PROMPTS[4], max_tokens=24, temperature=0.8, top_p=0.95, seed=11)
    assert api.completions.create(**kw).choices[0].text == api.completions.create(**kw).choices[0].text


def test_private_request_never_reaches_the_verifier(api, serve, verifier):
    before = metric(verifier.url, "pipesd_nav_rounds_total")
    r = api.completions.create(model="embedded", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                               extra_body={"private": True})
    info = r.usage.model_extra["pipesd"]
    assert info["private"] and info["nav_rounds"] == 0 and info["bytes_up"] == 0
    assert info["unverified_tokens"] == 12 and info["unverified_ranges"] == [[0, 12]]
    assert metric(verifier.url, "pipesd_nav_rounds_total") == before


# -- bad input: the error object, 4xx ---------------------------------------------------------------

BAD = [
    ("completions", b'{"model": "embedded", "prompt": "x",', 400, "invalid_json"),
    ("completions", b'[1, 2]', 400, None),
    ("completions", {"model": "gpt-4o", "prompt": "x"}, 404, "model_not_found"),
    ("completions", {"model": "embedded", "prompt": "x", "max_tokens": -3}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": "x", "n": 5}, 400, "unsupported_parameter"),
    ("completions", {"model": "embedded", "prompt": "x", "max_tokens": "10"}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": 5}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": [1, 10 ** 9]}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": ["a", "b"]}, 400, "unsupported_parameter"),
    ("completions", {"model": "embedded", "prompt": "x", "temperature": "hot"}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": "x", "logprobs": 2}, 400, "unsupported_parameter"),
    ("completions", {"model": "embedded", "prompt": "x", "echo": True}, 400, "unsupported_parameter"),
    ("completions", {"model": "embedded", "prompt": "x", "frobnicate": 1}, 400, "unknown_parameter"),
    ("completions", {"model": "embedded", "prompt": "x " * 2000}, 400, "context_length_exceeded"),
    ("completions", {"model": "embedded", "prompt": "x", "max_tokens": 100000}, 400, "context_length_exceeded"),
    ("completions", {"prompt": "x"}, 400, "missing_required_parameter"),
    ("completions", {"model": "embedded", "prompt": "x", "seed": 2 ** 70}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": "x", "top_k": 2 ** 70}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": "x", "stop": [""]}, 400, "invalid_value"),
    ("completions", {"model": "embedded", "prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("completions", b'{"model": "embedded", "prompt": "' + b"a" * (2 << 20) + b'"}', 413, "body_too_large"),
    ("completions", b"[" * 100000, 400, "invalid_json"),
    ("completions", b'{"model": "embedded", "prompt": "\\ud800x"}', 400, "invalid_json"),       # a lone surrogate
    ("completions", b'{"model": "embedded", "prompt": "\xff\xfe"}', 400, "invalid_json"),         # not UTF-8
    ("completions", b'{"model": "embedded", "prompt": "x", "temperature": 1' + b"0" * 400 + b"}", 400,
     "invalid_value"),
    ("completions", b'{"model": "embedded", "prompt": "x", "top_p": NaN}', 400, "invalid_value"),
    ("chat/completions", {"model": "embedded", "messages": "hi"}, 400, "invalid_value"),
    ("chat/completions", {"model": "embedded", "messages": []}, 400, "invalid_value"),
    ("chat/completions", {"model": "embedded", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("chat/completions", {"model": "embedded", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
     400, "unsupported_parameter"),
    ("chat/completions", {"model": "embedded", "messages": [{"role": "user", "content": "\ud800"}]}, 400,
     "invalid_json"),
    ("chat/completions", {"model": "embedded", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
     400, "unsupported_parameter"),
    ("chat/completions", {"model": "embedded", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
     400, "unsupported_parameter"),
    ("chat/completions", {"model": "embedded", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_object"}}, 400, None),
]


@pytest.mark.parametrize("route,body,status,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_the_error_object(serve, route, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{serve.url}/v1/{route}", content=content, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err


def test_the_openai_client_raises_its_typed_errors(api):
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="embedded", prompt="x", n=5)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        api.with_options(base_url=api.base_url.join("../nothing/")).models.list()


def test_method_not_allowed_says_what_is(serve):
    r = httpx.get(f"{serve.url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"


def test_a_client_gone_before_its_body_is_complete_is_not_an_error(serve):
    import socket

    host, port = serve.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": \"embedded\", \"prompt\"")
    time.sleep(0.3)
    assert metric(serve.url, "pipesd:requests_failed_total") == 0
    assert not any("Traceback" in line or "ERROR" in line for line in serve.output)


def test_after_bad_input_the_server_still_serves_and_counted_no_500(serve, api):
    assert api.completions.create(model="embedded", prompt="x", max_tokens=2, temperature=0).choices[0].text
    assert metric(serve.url, "pipesd:requests_failed_total") == 0
    rejected = httpx.get(f"{serve.url}/metrics").text
    assert 'status="500"' not in rejected and 'status="413"' in rejected


# -- the queue, disconnects ------------------------------------------------------------------------

def test_past_the_queue_429_with_retry_after(slow_serve):
    api = openai.OpenAI(base_url=slow_serve.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kw = dict(model="embedded", prompt=PROMPTS[0], max_tokens=150, temperature=0, stream=True)
    running, waiting = api.completions.create(**kw), api.completions.create(**kw)
    # One generates, one waits (max-queue 1): both got their headers, the third is refused at once.
    with pytest.raises(openai.RateLimitError) as e:
        api.completions.create(**kw)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "queue_full"
    for stream in (running, waiting):
        assert "".join(c.choices[0].text for c in stream if c.choices)
    assert 'pipesd:requests_rejected_total{status="429"} 1.0' in httpx.get(f"{slow_serve.url}/metrics").text


def test_a_queued_request_whose_client_left_gives_its_place_back(slow_serve):
    url = slow_serve.url
    body = {"model": "embedded", "prompt": PROMPTS[5], "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data:")                          # generating
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as queued:
            assert queued.status_code == 200                             # waiting (max-queue 1), then gone
        time.sleep(0.3)
        # Its place is free again: this one is queued, not refused.
        short = {**body, "max_tokens": 4, "stream": False}
        with httpx.Client(timeout=60) as http:
            later = http.post(f"{url}/v1/completions", json=short)
        assert "data: [DONE]" in list(lines)
    assert later.status_code == 200, later.text


def test_a_client_that_goes_away_cancels_its_generation(slow_serve, client):
    url = slow_serve.url
    tokens0, cancelled0 = metric(url, "pipesd:generation_tokens_total"), metric(url, "pipesd:requests_cancelled_total")
    body = {"model": "embedded", "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
    assert got                                     # it was streaming; now the connection is closed
    deadline = time.monotonic() + 10
    while metric(url, "pipesd:requests_cancelled_total") == cancelled0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "pipesd:requests_cancelled_total") == cancelled0 + 1
    assert metric(url, "pipesd:num_requests_running") == 0
    assert metric(url, "pipesd:generation_tokens_total") - tokens0 < 200      # it stopped early
    # The drafter is free and the next request's text is still the target's.
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert api.completions.create(model="embedded", prompt=PROMPTS[3], max_tokens=20,
                                  temperature=0).choices[0].text == reference(client, PROMPTS[3], 20)


def test_verifier_killed_mid_stream_the_stream_ends_offline_and_says_so(client):
    with LocalVerifier(model="embedded", threads=1, extra_args=SLOW) as v, LocalServe(verifier_args(v)) as s:
        api = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = api.completions.create(model="embedded", prompt=PROMPTS[0], max_tokens=120, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 8:
                v.kill()
        assert chunks[-1].choices == []
        info = chunks[-1].usage.model_extra["pipesd"]
        assert chunks[-1].usage.completion_tokens == 120
        assert info["unverified_tokens"] > 0 and info["verified_tokens"] >= 8 and info["breaker_trips"] >= 1
        assert info["verified_tokens"] + info["unverified_tokens"] == 120
        start, end = info["unverified_ranges"][0]
        assert start == info["verified_tokens"] and end == 120            # verified first, then the draft alone
        verified = "".join(c.choices[0].text for c in chunks
                           if c.choices and c.model_extra.get("pipesd", {}).get("verified"))
        assert reference(client, PROMPTS[0], 120).startswith(verified)
        assert httpx.get(f"{s.url}/health").json()["verifier"] == "offline"
        assert metric(s.url, "pipesd:unverified_tokens_total") == info["unverified_tokens"]


# -- start-up and the API key ------------------------------------------------------------------------

def test_api_key_is_required_when_set_and_off_loopback():
    off = subprocess.run([sys.executable, "-m", "edge_sdk", "serve", "--mode", "edge_only", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert off.returncode == 2 and "--api-key" in off.stderr
    late = subprocess.run([sys.executable, "-m", "edge_sdk", "serve", "--offline", "verify_late"],
                          capture_output=True, text=True, timeout=60)
    assert late.returncode == 2 and "verify_late" in late.stderr
    with LocalServe(["--mode", "edge_only", "--api-key", API_KEY, "--threads", "1"]) as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong-key", max_retries=0).models.list()
        api = openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0)
        r = api.completions.create(model="embedded", prompt="def f():", max_tokens=5)
        assert r.usage.model_extra["pipesd"]["mode"] == "edge_only" and r.usage.completion_tokens == 5
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/health").json()["verifier"] == "none"
