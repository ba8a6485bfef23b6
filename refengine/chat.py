"""Chat prompts: the GGUF's own tokenizer.chat_template rendered with jinja2, as
transformers renders it, or a built-in template when the file carries none
(gemma3's does not), as llama.cpp keeps a few of its own.

The template comes from an untrusted file, so it runs in jinja2's sandbox, and within bounds: a
time limit, a cap on the text it renders and on every string or list it builds with *, +, %, str
methods and filters, a cap on range(), and a ceiling on the memory rendering may add. Whatever a
template does wrong (a syntax error, 1/0, an include with no loader, endless recursion, a loop that
never ends) is one ChatTemplateError naming the template.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
import resource
import signal
import threading
import time
from collections.abc import Iterator
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


# Bounds on rendering. A real template renders in milliseconds, and only ever builds strings about as
# long as the conversation it is given; SIZE_BUDGET grows with the messages for that reason.
RENDER_SECONDS = 2.0
RENDER_MEMORY = 256 << 20  # address space that rendering may add to the process
MAX_TEMPLATE_CHARS = 1 << 20  # the largest templates in use (tool-calling ones) are about 30 KB
MAX_RANGE = 100_000  # jinja2's own sandbox limit
MAX_INT_BITS = 4096  # integers a template computes with * or **
BASE_BUDGET = 1 << 20  # characters or items, plus four times the length of the messages


class ChatTemplateError(RefengineError):
    pass


class ChatTemplate(str):
    """A template's source, which knows where it came from (for error messages)."""

    origin: str

    def __new__(cls, source: str, origin: str) -> ChatTemplate:
        template = super().__new__(cls, source)
        template.origin = origin
        return template


class _OutOfTime(BaseException):
    """Raised into a render that ran past RENDER_SECONDS. A BaseException, so that no `except Exception`
    inside jinja2 can take it for an error of its own."""


_budget: contextvars.ContextVar[int] = contextvars.ContextVar("chat_template_budget", default=BASE_BUDGET)
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("chat_template_deadline", default=math.inf)


def _refuse(what: str) -> ChatTemplateError:
    return ChatTemplateError(f"{what} (over the limit of {_budget.get():,})")


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise _OutOfTime


def _check_size(value) -> None:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > _budget.get():
        raise _refuse(f"a value of {len(value):,} items")


# %-formats and str.format specs can ask for any width: "%999999999d", "{:>999999999}".
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d*)(?:\.(\d*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")


def _check_format(text: str) -> None:
    numbers = [n for spec in _PRINTF_SPEC.findall(text) for n in spec if n]
    numbers += [n for spec in _FORMAT_SPEC.findall(text) for n in _DIGITS.findall(spec)]
    if any(len(n) > 9 or int(n) > _budget.get() for n in numbers):
        raise _refuse("a format width or precision")


def _check_arguments(args, kwargs) -> None:
    """No call in a template gets an integer larger than the budget: 'x'.ljust(n), center(n), range(n)..."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _budget.get():
            raise _refuse(f"an argument of {value}")


def _bounded_callable(function):
    """A filter or global wrapped with the argument and result checks (jinja2 calls filters directly)."""

    @functools.wraps(function)  # keeps jinja2's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _check_time()
        value_at = 1 if getattr(function, "jinja_pass_arg", None) else 0  # after the context, if passed
        _check_arguments(args[value_at + 1 :], kwargs)  # the value filtered may be any number
        if function.__name__ == "do_format" and args:
            _check_format(str(args[0]))
        result = function(*args, **kwargs)
        _check_size(result)
        return result

    return bounded


def _bounded_range(*args):
    _check_arguments(args, {})
    n = len(range(*args))
    if n > MAX_RANGE:
        raise ChatTemplateError(f"range() of {n:,} items (over the limit of {MAX_RANGE:,})")
    return range(*args)


def _binop_size(operator: str, left, right) -> int | None:
    """The size of `left operator right` before it is computed, for the operators that can explode."""
    sequences = (str, list, tuple)
    if operator == "*":
        if isinstance(left, sequences) and isinstance(right, int):
            return len(left) * max(right, 0)
        if isinstance(right, sequences) and isinstance(left, int):
            return len(right) * max(left, 0)
    if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        return len(left) + len(right)
    return None


def _check_int_result(operator: str, left, right) -> None:
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if operator == "*":
        bits = left.bit_length() + right.bit_length()
    elif operator == "**" and abs(left) > 1 and right > 0:
        bits = left.bit_length() * right
    else:
        return
    if bits > MAX_INT_BITS:
        raise ChatTemplateError(f"an integer of about {bits:,} bits (over the limit of {MAX_INT_BITS:,})")


@lru_cache(maxsize=8)
def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """jinja2's sandbox, with the size and time checks at every operator, call and attribute."""

        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def call_binop(self, context, operator, left, right):
            _check_time()
            size = _binop_size(operator, left, right)
            if size is not None and size > _budget.get():
                raise _refuse(f"{operator!r} making {size:,} items")
            _check_int_result(operator, left, right)
            if operator == "%" and isinstance(left, str):
                _check_format(left)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own spelling)
            _check_time()
            _check_arguments(args, kwargs)
            target = getattr(__obj, "__wrapped__", __obj)
            if isinstance(getattr(target, "__self__", None), str) and getattr(target, "__name__", "") in (
                "format",
                "format_map",
            ):
                _check_format(target.__self__)
            result = super().call(__context, __obj, *args, **kwargs)
            _check_size(result)
            return result

        def getattr(self, obj, attribute):
            _check_time()
            return super().getattr(obj, attribute)

    def raise_exception(message):
        raise ChatTemplateError(f"the template raised: {message}")

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters = {name: _bounded_callable(f) for name, f in env.filters.items()}
    del env.globals["lipsum"]  # lipsum(n) makes text of any size, and no chat template uses it
    env.globals["range"] = _bounded_range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(str(fmt))  # as transformers (Llama 3.1 uses it)
    return env


@lru_cache(maxsize=8)
def _compile(source: str):
    return _environment().from_string(source)


def template_for(gguf_file) -> ChatTemplate:
    source = gguf_file.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        return ChatTemplate(source, f"{gguf_file.path}: tokenizer.chat_template")
    name = ARCH_TEMPLATES.get(gguf_file.get("general.architecture"))
    if name is None:
        raise ChatTemplateError(
            f"{gguf_file.path}: no tokenizer.chat_template and no built-in template for this architecture"
        )
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"the built-in {name} chat template")


def render(source: str, messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]).

    bos_token is passed as text, as transformers does; the caller tokenizes
    with parse_special and without adding another BOS.
    """
    origin = getattr(source, "origin", "chat template")

    def token_text(token_id):
        return tokenizer.token_to_piece(token_id).decode("utf-8", "replace") if token_id is not None else ""

    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"{origin}: {len(source):,} characters long, over the limit of {MAX_TEMPLATE_CHARS:,}")
    budget = BASE_BUDGET + 4 * sum(len(str(m.get("content") or "")) for m in messages)
    with _bounds(origin, budget):
        pieces, length = [], 0
        template = _compile(str(source))
        stream = template.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=token_text(tokenizer.bos_id),
            eos_token=token_text(tokenizer.eos_id),
        )
        for piece in stream:
            length += len(piece)
            if length > budget:
                raise ChatTemplateError(f"{origin}: renders more than {budget:,} characters")
            pieces.append(piece)
        text = "".join(pieces)
    try:
        text.encode("utf-8", "surrogateescape")  # the tokenizer's encoding: a lone surrogate has no bytes
    except UnicodeEncodeError as e:
        raise ChatTemplateError(f"{origin}: renders {text[e.start]!r}, a lone surrogate, not text") from None
    return text


@contextlib.contextmanager
def _bounds(origin: str, budget: int) -> Iterator[None]:
    """Run a render within the bounds, and turn whatever goes wrong into one ChatTemplateError."""
    from jinja2 import TemplateError

    budget_token = _budget.set(budget)
    deadline_token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        if threading.current_thread() is threading.main_thread():
            with _alarm(RENDER_SECONDS), _address_space_limit(RENDER_MEMORY):
                yield
        else:  # signals and a process-wide limit are the main thread's: the checks at each operation remain
            yield
    except ChatTemplateError as e:
        message = str(e)
        raise ChatTemplateError(message if message.startswith(origin) else f"{origin}: {message}") from None
    except _OutOfTime:
        raise ChatTemplateError(f"{origin}: rendering took more than {RENDER_SECONDS:g} s") from None
    except MemoryError:
        raise ChatTemplateError(f"{origin}: rendering needed more than {RENDER_MEMORY >> 20} MiB") from None
    except RecursionError:
        raise ChatTemplateError(f"{origin}: recursion too deep") from None
    except TemplateError as e:
        raise ChatTemplateError(f"{origin}: {type(e).__name__}: {e}") from None
    except Exception as e:  # 1/0, 1 + 'a', an include without a loader...: the template's fault, whatever it is
        raise ChatTemplateError(f"{origin}: failed to render: {type(e).__name__}: {e}") from None
    finally:
        _deadline.reset(deadline_token)
        _budget.reset(budget_token)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise _OutOfTime into the (main) thread after `seconds`, even in a loop that calls nothing."""

    def out_of_time(signum, frame):
        raise _OutOfTime

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, out_of_time)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if previous_timer[0]:  # someone else's alarm was pending: give it back what remains of it
            remaining = max(previous_timer[0] - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_timer[1])


@contextlib.contextmanager
def _address_space_limit(extra: int) -> Iterator[None]:
    """Lower RLIMIT_AS to the address space in use plus `extra` for the length of the block, so an
    allocation beyond it is a MemoryError rather than the whole machine's memory. (Process-wide: only
    for a render on the main thread, while no other thread of ours is allocating.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = _address_space()
    if in_use is None:
        yield
        return
    limit = in_use + extra
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# -- conversations -----------------------------------------------------------------------------------


def message_list(user: str, system: str | None = None) -> list[dict]:
    """One user message, after the system message if there is one."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def chat_prompt_ids(gguf_file, tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of `messages` in the model's chat template, ready for the assistant's reply.
    The template writes BOS itself, as text, when the model wants one."""
    text = render(template_for(gguf_file), messages, tokenizer)
    return tokenizer.encode(text, add_bos=False, parse_special=True)


def prompt_token_ids(gguf_file, tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """The ids `generate` starts from: the text tokenized (BOS as the model asks), or with chat, the text
    as one user turn (after `system`, if given) in the model's chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    return chat_prompt_ids(gguf_file, tokenizer, message_list(prompt, system))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ConversationTooLong(RefengineError):
    """The conversation and the reply's tokens do not fit the context."""


class Conversation:
    """A chat whose KV cache is kept across turns.

    Each turn renders the whole conversation with the model's template and evaluates only what the
    cache does not hold yet: the longest prefix the new rendering shares with what was evaluated
    before stays (cache.keep, which gives up, to 0, where a sliding-window ring has moved past it).
    """

    def __init__(self, model, tokenizer, gguf_file, cache, system: str | None = None):
        self.model, self.tokenizer, self.gguf, self.cache = model, tokenizer, gguf_file, cache
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []  # the ids whose keys and values are in the cache

    def reply(self, text: str, max_tokens: int, sampler, on_text=None):
        """The assistant's answer to the user's `text`: a refengine.generate.GenerationResult."""
        from refengine.generate import generate

        messages = [*self.messages, {"role": "user", "content": text}]
        ids = chat_prompt_ids(self.gguf, self.tokenizer, messages)
        if len(ids) + max_tokens > self.cache.n_ctx:
            raise ConversationTooLong(
                f"the conversation ({len(ids)} tokens) plus -n {max_tokens} exceeds --ctx {self.cache.n_ctx}"
            )
        keep = self.cache.keep(common_prefix(self.cached, ids[:-1]))  # at least the last id is evaluated
        result = generate(self.model, self.tokenizer, self.cache, ids[keep:], max_tokens, sampler, on_text=on_text)
        self.cached = (ids + result.tokens)[: self.cache.n_past]  # the last sampled token was never evaluated
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        return result
