"""The pieces of ``pipesd serve`` that need no model or server: request validation, chat templates,
the record of which output tokens were verified (tests/test_serve.py runs the real endpoint)."""

from __future__ import annotations

import pytest

from edge_sdk.engine import TokenEvent
from edge_sdk.errors import OverloadTimeout, PromptTooLongError, VerifierTimeout
from edge_sdk.serve.app import _api_error_of, _Output
from edge_sdk.chat import PLAIN_STOP, PLAIN_TEMPLATE, ChatTemplate, TemplateError
from edge_sdk.serve.requests import APIError, ChatRequest, CompletionRequest, parse
from edge_sdk.stats import GenerationStats

# SmolLM2-135M-Instruct's template, as its GGUF carries it (tokenizer.chat_template).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def error_of(model, body) -> APIError:
    with pytest.raises(APIError) as e:
        parse(model, body)
    return e.value


def test_defaults_are_openais():
    r = parse(CompletionRequest, {"model": "m", "prompt": "x"})
    assert (r.temperature, r.top_p, r.max_tokens, r.n, r.stream, r.stop) == (1.0, 1.0, 16, 1, False, [])
    c = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert c.token_limit is None and c.temperature == 1.0


def test_integers_are_taken_for_floats_but_not_strings_or_bools():
    assert parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 0}).temperature == 0.0
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "temperature": "0"}).param == "temperature"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": True}).param == "max_tokens"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 2.5}).code == "invalid_value"


def test_every_unhonoured_field_is_refused_by_name():
    base = {"model": "m", "prompt": "x"}
    for field, value in [("n", 2), ("logprobs", 1), ("echo", True), ("best_of", 3), ("suffix", "s"),
                         ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"1": 5})]:
        err = error_of(CompletionRequest, {**base, field: value})
        assert (err.status, err.code, err.param) == (400, "unsupported_parameter", field), field
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for field, value in [("tools", [{"type": "function"}]), ("tool_choice", "auto"), ("logprobs", True),
                         ("top_logprobs", 2), ("functions", [{}])]:
        err = error_of(ChatRequest, {**chat, field: value})
        assert (err.code, err.param) == ("unsupported_parameter", field), field
    assert error_of(ChatRequest, {**chat, "response_format": {"type": "json_object"}}).param.startswith(
        "response_format")
    assert parse(ChatRequest, {**chat, "tool_choice": "none", "response_format": {"type": "text"}})


def test_shapes_that_are_not_one_request_are_refused():
    assert error_of(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).code == "unsupported_parameter"
    assert parse(CompletionRequest, {"model": "m", "prompt": ["a"]}).prompt == "a"
    assert parse(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert error_of(CompletionRequest, {"model": "m", "prompt": ""}).code == "invalid_value"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "stop": ["a"] * 5}).param == "stop"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}})
    assert error_of(CompletionRequest, [1]).status == 400
    assert error_of(CompletionRequest, {"model": "m"}).code == "missing_required_parameter"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "extra": 1}).code == "unknown_parameter"
    assert error_of(ChatRequest, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}).status == 400
    two = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4}
    assert error_of(ChatRequest, two).status == 400


def test_plain_template_is_a_transcript_that_stops_at_the_next_user_turn():
    t = ChatTemplate(PLAIN_TEMPLATE, stop=PLAIN_STOP, builtin=True)
    text = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])
    assert text == "Be brief.\n\nUser: hi\nAssistant: hello\nUser: more\nAssistant:"
    assert t.stop == ("\nUser:",)


class GGUFLikeDrafter:          # what ChatTemplate.for_drafter reads: a GGUF's metadata and its vocabulary
    def __init__(self, metadata):
        self.metadata = metadata
        self.vocab_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_a_gguf_template_is_rendered_with_its_special_tokens():
    t = ChatTemplate.for_drafter(GGUFLikeDrafter({"tokenizer.chat_template": CHATML,
                                                  "tokenizer.ggml.bos_token_id": "1",
                                                  "tokenizer.ggml.eos_token_id": "2",
                                                  "tokenizer.ggml.add_bos_token": "false"}))
    assert not t.builtin and t.eos_token == "<|im_end|>" and t.stop == ()
    assert t.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate.for_drafter(GGUFLikeDrafter({})).builtin
    # A tokenizer that adds BOS itself: a BOS the template writes is dropped, not doubled.
    adds = ChatTemplate.for_drafter(GGUFLikeDrafter({"tokenizer.chat_template": "{{ bos_token }}x",
                                                     "tokenizer.ggml.bos_token_id": "0",
                                                     "tokenizer.ggml.add_bos_token": "true"}))
    assert adds.render([]) == "x"


def test_a_template_that_raises_or_breaks_is_a_template_error():
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="alternate"):
        raising.render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{% for %}").render([])
    with pytest.raises(TemplateError):          # the sandbox refuses to reach into Python internals
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])


def test_output_records_which_tokens_were_not_verified():
    out = _Output()
    flags = [True, True, False, False, True, False]
    for i, v in enumerate(flags):
        out.add(TokenEvent(i, f"t{i}", v))
    out.add(TokenEvent(None, "tail", True))
    stats = GenerationStats(mode="pipesd", prompt_tokens=3, output_tokens=6)
    info = out.usage(stats, private=False)
    assert info["completion_tokens"] == 6 and info["total_tokens"] == 9
    assert info["pipesd"]["verified_tokens"] == 3 and info["pipesd"]["unverified_tokens"] == 3
    assert info["pipesd"]["unverified_ranges"] == [[2, 4], [5, 6]]
    assert "".join(out.text) == "t0t1t2t3t4t5tail"


def test_generation_errors_map_to_openai_statuses():
    """An overloaded verifier is a 503 that says how long to wait (a client's retry policy backs off); a
    verifier gone is a 502; a prompt too long is the caller's 400."""
    busy = _api_error_of(OverloadTimeout("stayed overloaded", retry_after_s=2.2))
    assert (busy.status, busy.code, busy.headers) == (503, "verifier_overloaded", {"Retry-After": "3"})
    assert _api_error_of(OverloadTimeout("stayed overloaded")).headers == {"Retry-After": "1"}
    gone = _api_error_of(VerifierTimeout("no answer"))
    assert (gone.status, gone.code) == (502, "verifier_unavailable")
    long = _api_error_of(PromptTooLongError("no room"))
    assert (long.status, long.code, long.param) == (400, "context_length_exceeded", "prompt")
