"""Chat: a model's own chat template, rendered with jinja2, and a multi-turn session on an Engine.

    session = ChatSession(engine, system="You are terse.", temperature=0)
    for piece in session.send("What is the capital of France?"):
        print(piece, end="", flush=True)

Each turn re-renders the whole conversation with the template and feeds only the tokens after the
longest prefix already in the engine's KV cache, so history is not read again.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from ntransformer_jax.errors import InputError, NTransformerError
from ntransformer_jax.sampling import SamplingParams
from ntransformer_jax.tokenizer import check_utf8, decode_stream

if TYPE_CHECKING:
    from ntransformer_jax.engine import Engine

KEY_CHAT_TEMPLATE = "tokenizer.chat_template"   # GGUF metadata key (a jinja2 template string)

Message = Mapping[str, str]

# ---------------------------------------------------------------------------------------------
# Template
# ---------------------------------------------------------------------------------------------


class _TemplateRaise(NTransformerError):
    """`raise_exception(...)` called by a template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaise(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own `tojson` HTML-escapes <, >, & and ', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in HF
    templates): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # trim_blocks / lstrip_blocks: the whitespace rules chat templates are written for.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def template_source(metadata: Mapping[str, Any], override: str | None = None) -> str:
    """The chat template to use: `override` (template text or a file path), else the model's.

    Args:
      metadata: GGUF metadata of the model.
      override: template text (anything containing "{") or the path of a file holding it.
    Returns:
      The template text.
    Raises:
      InputError: the override is empty or unreadable, or there is no override and the model
        file has no `tokenizer.chat_template`.
    """
    if override is not None:
        if not override.strip():
            raise InputError("the chat template given is empty")
        if "{" in override:
            return override
        try:
            with open(os.path.expanduser(override), encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise InputError(f"chat template {override!r} is neither template text nor an existing "
                             "file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"chat template file {override!r} cannot be read: {e}") from None
        if not text.strip():
            raise InputError(f"chat template file {override!r} is empty")
        return text
    source = metadata.get(KEY_CHAT_TEMPLATE)
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"the model file has no chat template ({KEY_CHAT_TEMPLATE}); "
                         "give one with --chat_template (a file or template text)")
    return source


def _check_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"messages[{i}] is a {type(m).__name__}, not a dict")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InputError(f"messages[{i}][{key!r}] must be a string, got {m.get(key)!r}")
            check_utf8(m[key], f"messages[{i}][{key!r}]")
        out.append(dict(m))
    return out


class ChatTemplate:
    """A chat template compiled in a sandboxed jinja2 environment (HF's conventions).

    Templates see `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the globals
    `raise_exception(msg)` and `strftime_now(fmt)`, and a `tojson` filter that does not
    HTML-escape.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise InputError(f"chat template line {e.lineno}: {e.message}") from None

    @classmethod
    def for_engine(cls, engine: Engine, override: str | None = None) -> ChatTemplate:
        """The template of `engine`'s model file (or `override`), with its BOS/EOS texts."""
        tok = engine.tokenizer
        text = lambda i: tok.token_bytes(i).decode("utf-8", errors="replace") if i is not None else ""
        return cls(template_source(engine.model_file.metadata, override),
                   bos_token=text(tok.bos_id), eos_token=text(tok.eos_id))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The conversation as prompt text.

        Args:
          messages: dicts with "role" ("system", "user", "assistant", ...) and "content".
          add_generation_prompt: end with the header that starts the assistant's reply.
          **extra: further template variables.
        Raises:
          InputError: bad messages, or the template failed (`raise_exception` or an error).
        """
        variables = dict(extra, messages=_check_messages(messages),
                         add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return self._template.render(**variables)
        except _TemplateRaise as e:
            raise InputError(f"chat template: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise InputError(f"chat template failed: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Streaming text
# ---------------------------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---------------------------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------------------------


class ChatSession:
    """A conversation with one Engine: the message list plus the KV cache it fills.

    Other use of the engine between turns is harmless: each turn reuses only the part of
    `engine.cached_tokens` that matches the rendered conversation.
    """

    def __init__(self, engine: Engine, *, system: str | None = None, template: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None):
        """
        Args:
          engine: the loaded model.
          system: system prompt (None: whatever the template does without one).
          template: chat template text or file path overriding the model's own.
          max_new_tokens: most tokens per reply.
          temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n: sampling (see
            `SamplingParams`).
          seed: PRNG seed of the first turn, turn i uses seed + i (None or negative: random).
        Raises:
          InputError: no usable template, or a bad setting.
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if system is not None and not isinstance(system, str):
            raise InputError(f"system must be a string, got {type(system).__name__}")
        self.engine = engine
        self.template = ChatTemplate.for_engine(engine, template)
        self.params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]

    def render(self, messages: Sequence[Message] | None = None, *,
               add_generation_prompt: bool = True) -> str:
        """Prompt text of `messages` (default: the conversation), by default ending in the header
        that starts the assistant's reply.

        A leading BOS text is dropped when the tokenizer adds BOS itself (as llama.cpp does), so
        `engine.tokenize(render())` has exactly one.
        """
        text = self.template.render(self.messages if messages is None else messages,
                                    add_generation_prompt=add_generation_prompt)
        tok, bos = self.engine.tokenizer, self.template.bos_token
        if tok.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text

    def prompt_ids(self, messages: Sequence[Message] | None = None) -> list[int]:
        """Token ids of `render(messages)`."""
        return self.engine.tokenize(self.render(messages), add_special=True, parse_special=True)

    def send(self, user_text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply, which then joins the history.

        The prompt is rendered and checked at once (errors are raised by this call); the reply is
        generated as the returned iterator is consumed. If it is abandoned midway, the text
        streamed so far is kept as the reply.

        Raises:
          InputError: the conversation no longer fits in the engine's ctx_size (the message is
            not added), or the template failed.
        """
        if not isinstance(user_text, str):
            raise InputError(f"the user message must be a string, got {type(user_text).__name__}")
        return self.respond(self.messages + [{"role": "user", "content": user_text}])

    def respond(self, messages: Sequence[Message]) -> Iterator[str]:
        """Stream the assistant's reply to `messages`, which (with the reply) become the history."""
        messages = _check_messages(messages)
        ids = self.prompt_ids(messages)
        ctx = self.engine.ctx_size
        if len(ids) >= ctx:
            raise InputError(f"the conversation is {len(ids)} tokens and does not fit in ctx_size={ctx} "
                             f"(it needs at least {len(ids) + 1}); start a new one or raise ctx_size")
        start = common_prefix(self.engine.cached_tokens, ids)
        if start == len(ids):
            start -= 1    # the last token must be fed again to get the next token's logits
        return self._stream(messages, ids, start)

    def _stream(self, messages: list[dict[str, str]], ids: list[int], start: int) -> Iterator[str]:
        seed = None if self.seed is None or self.seed < 0 else self.seed + self.turns
        tokens = self.engine.generate_tokens(ids[start:], max_new_tokens=self.max_new_tokens,
                                             params=self.params, seed=seed, start_pos=start)
        reply: list[str] = []
        finished = False
        try:
            for piece in decode_stream(tokens, self.engine.tokenizer.token_bytes):
                reply.append(piece)
                yield piece
            finished = True
        finally:
            if finished or reply:
                self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
                self.turns += 1


def complete(engine: Engine, messages: Sequence[Message], *, template: str | None = None,
             **sampling: Any) -> Iterator[str]:
    """One-shot: stream the assistant's reply to `messages` (see `Engine.chat`)."""
    return ChatSession(engine, template=template, **sampling).respond(messages)
