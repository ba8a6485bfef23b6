"""Chat prompts: the GGUF's own tokenizer.chat_template rendered with jinja2, as
transformers renders it, or a built-in template when the file carries none
(gemma3's does not), as llama.cpp keeps a few of its own.

The template comes from an untrusted file, so it runs in jinja2's sandbox.
"""

from __future__ import annotations

from functools import lru_cache

from refengine.errors import RefengineError

# Used only when the GGUF has no template, chosen by general.architecture.
BUILTIN_TEMPLATES = {
    # as Gemma's tokenizer_config: no system role, so a system message is prepended to the first user turn
    "gemma": (
        "{{ bos_token }}"
        "{% set first_user_prefix = '' %}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
        " + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
ARCH_TEMPLATES = {
    "gemma3": "gemma",
    "gemma2": "gemma",
    "gemma": "gemma",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "llama": "llama3",
}


class ChatTemplateError(RefengineError):
    pass


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


def template_for(gguf) -> str:
    source = gguf.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        return source
    name = ARCH_TEMPLATES.get(gguf.get("general.architecture"))
    if name is None:
        raise ChatTemplateError(
            f"{gguf.path}: no tokenizer.chat_template and no built-in template for this architecture"
        )
    return BUILTIN_TEMPLATES[name]


def render(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]).

    bos_token is passed as text, as transformers does; the caller tokenizes
    with parse_special and without adding another BOS.
    """
    from jinja2 import TemplateError

    def token_text(token_id):
        return tokenizer.token_to_piece(token_id).decode("utf-8", "replace") if token_id is not None else ""

    try:
        return _compile(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=token_text(tokenizer.bos_id),
            eos_token=token_text(tokenizer.eos_id),
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None
