"""Chat messages -> one prompt string, with the model's own chat template (``EdgeClient.chat``, the
OpenAI endpoint's /v1/chat/completions and ``pipesd generate --chat`` all render with it).

A GGUF that was chat-tuned carries its template as Jinja in ``tokenizer.chat_template``; it is
rendered in Jinja's sandbox with the variables Hugging Face and llama-cpp-python give it
(``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``). The
embedded pair was trained on code and has no template; it gets ``PLAIN_TEMPLATE``, a documented
``User:`` / ``Assistant:`` transcript (docs/serve.md), which also stops at the next ``User:`` turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError

# The embedded pair's template: an optional system text, then one line per turn, ending with the
# turn the model is to write.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] in ('system', 'developer') %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = ("\nUser:",)


class TemplateError(ConfigError):
    """The messages cannot be rendered by the model's template (the template raised, or is broken)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()     # stop sequences the template implies (the plain one's next turn)
    builtin: bool = False          # PLAIN_TEMPLATE, not the model's own
    adds_bos: bool = False         # the tokenizer puts BOS in front by itself (tokenizer.ggml.add_bos_token)

    @classmethod
    def for_drafter(cls, drafter) -> "ChatTemplate":
        meta = getattr(drafter, "metadata", {}) or {}
        source = meta.get("tokenizer.chat_template")
        if not source:
            return cls(PLAIN_TEMPLATE, stop=PLAIN_STOP, builtin=True)

        def token_text(key: str) -> str:
            try:
                return drafter.vocab_tokens[int(meta[key])]
            except (KeyError, ValueError, IndexError):
                return ""

        return cls(source, token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id"),
                   adds_bos=str(meta.get("tokenizer.ggml.add_bos_token", "")).lower() == "true")

    def render(self, messages: list[dict]) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)   # as transformers renders

        def raise_exception(message: str):
            raise TemplateError(message)

        try:
            text = env.from_string(self.source).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token, raise_exception=raise_exception)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from None
        # Where the tokenizer adds BOS itself, a template that writes it too would give two. (SmolLM2's
        # BOS is <|im_start|>, which its template writes and its tokenizer does not add: kept.)
        if self.adds_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text
