"""Chat: template rendering, KV-cache reuse across turns, UTF-8 safe streaming, and the --chat CLI."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import termios
import time

import jinja2
import pytest

import ntransformer_jax as nt
from ntransformer_jax.chat import KEY_CHAT_TEMPLATE, ChatSession, ChatTemplate, template_source
from ntransformer_jax.errors import InputError
from ntransformer_jax.sampling import SamplingParams
from ntransformer_jax.tokenizer import decode_stream

# A Llama-3-style template, written for these tests; block tags on their own lines so that
# trim_blocks / lstrip_blocks matter.
LLAMA3_STYLE = """{{- bos_token -}}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And what is the capital of Germany?"},
]


def plain_jinja(source: str, messages, **variables) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(messages=messages, add_generation_prompt=True, **variables)


def text_of(engine, tokens) -> str:
    return b"".join(engine.tokenizer.token_bytes(t) for t in tokens).decode("utf-8")


# -- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("system", [None, "You are a geography teacher."])
def test_chatml_render_matches_jinja2(smollm_engine, system):
    source = smollm_engine.model_file.metadata[KEY_CHAT_TEMPLATE]
    session = ChatSession(smollm_engine, system=system)
    messages = ([{"role": "system", "content": system}] if system else []) + TWO_TURNS
    rendered = session.render(messages)
    assert rendered == plain_jinja(source, messages, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert rendered.endswith("<|im_start|>user\nAnd what is the capital of Germany?<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert ("SmolLM" in rendered) == (system is None)   # the template's default system prompt


def test_llama3_style_render_matches_jinja2():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    rendered = ChatTemplate(LLAMA3_STYLE, bos_token="<s>").render(messages)
    assert rendered == plain_jinja(LLAMA3_STYLE, messages, bos_token="<s>")
    assert rendered == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
                        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(InputError, match="chat template: unknown role tool"):
        ChatTemplate(LLAMA3_STYLE).render([{"role": "tool", "content": "x"}])


def test_template_environment_details():
    messages = [{"role": "user", "content": "<b>&'é\""}]
    as_json = ChatTemplate("{{ messages | tojson }}").render(messages)
    assert as_json == json.dumps(messages, ensure_ascii=False)   # not HTML-escaped
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    two = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ChatTemplate(loop).render(two) == "a"
    assert ChatTemplate("{% generation %}{{ 1 + 1 }}{% endgeneration %}").render([]) == "2"
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]).isdigit()
    with pytest.raises(InputError, match="line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(InputError, match="unsafe|access"):   # the sandbox refuses attribute games
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(messages)
    with pytest.raises(InputError, match=r"messages\[0\]\['content'\]"):
        ChatTemplate("{{ 1 }}").render([{"role": "user"}])


def test_template_source_override_and_missing(tmp_path):
    meta = {KEY_CHAT_TEMPLATE: "from the file"}
    assert template_source(meta) == "from the file"
    assert template_source(meta, "{{ messages }}") == "{{ messages }}"
    path = tmp_path / "t.jinja"
    path.write_text("{{ bos_token }}")
    assert template_source(meta, str(path)) == "{{ bos_token }}"
    with pytest.raises(InputError, match="neither template text nor an existing file"):
        template_source(meta, str(tmp_path / "missing.jinja"))
    with pytest.raises(InputError, match="no chat template"):
        template_source({})


def test_bos_in_template_is_not_doubled(tiny_f32_path):
    engine = nt.load(tiny_f32_path, ctx_size=64)
    assert KEY_CHAT_TEMPLATE not in engine.model_file.metadata
    with pytest.raises(InputError, match="no chat template"):
        ChatSession(engine)
    tok = engine.tokenizer
    assert tok.add_bos
    session = ChatSession(engine, template=LLAMA3_STYLE)
    ids = session.prompt_ids([{"role": "user", "content": "hello"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


# -- prompt tokens and KV-cache reuse -----------------------------------------------------------


def test_rendered_conversation_tokens(smollm_engine):
    session = ChatSession(smollm_engine)
    rendered = session.render(TWO_TURNS)
    ids = session.prompt_ids(TWO_TURNS)
    assert ids == smollm_engine.tokenize(rendered)
    # Special tokens are parsed: one <|im_start|> per message, the default system one and the
    # assistant header; one <|im_end|> per message and the system one.
    im_start, im_end = smollm_engine.tokenize("<|im_start|><|im_end|>", add_special=False)
    assert ids.count(im_start) == len(TWO_TURNS) + 2 and ids.count(im_end) == len(TWO_TURNS) + 1


def test_second_turn_reuses_cache_and_matches_fresh_engine(smollm_engine, smollm_path):
    session = ChatSession(smollm_engine, temperature=0, max_new_tokens=24)
    reply1 = "".join(session.send("What is the capital of France?"))
    assert "Paris" in reply1
    reply2 = "".join(session.send("And what is the capital of Germany?"))
    fed = smollm_engine.last_stats.prompt_tokens
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert [session.messages[1]["content"], session.messages[3]["content"]] == [reply1, reply2]

    full = session.prompt_ids(session.messages[:-1])   # the whole render of turn 2
    assert fed < len(full) // 3, (fed, len(full))
    fresh = nt.load(smollm_path, ctx_size=512)
    tokens = fresh.generate_tokens(full, max_new_tokens=24, params=SamplingParams(temperature=0))
    assert text_of(fresh, tokens) == reply2
    assert fresh.last_stats.prompt_tokens == len(full)


def test_engine_chat_one_shot_backs_off_when_all_cached(smollm_engine):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    first = "".join(smollm_engine.chat(messages, temperature=0, max_new_tokens=16))
    assert first
    again = "".join(smollm_engine.chat(messages, temperature=0, max_new_tokens=16))
    assert again == first
    assert smollm_engine.last_stats.prompt_tokens == 1   # whole render cached: only the last token re-fed


def test_conversation_overflowing_context_is_input_error(smollm_engine):
    session = ChatSession(smollm_engine, temperature=0)
    with pytest.raises(InputError, match="does not fit in ctx_size=512"):
        session.send("hello " * 600)
    assert session.messages == []


# -- UTF-8 safe streaming -----------------------------------------------------------------------

MULTIBYTE = "日本語 🙂 ñ"


def split_tokens(engine) -> list[int]:
    tokens = engine.tokenize(MULTIBYTE, add_special=False)
    partial = [t for t in tokens if _invalid_alone(engine.tokenizer.token_bytes(t))]
    assert partial, "the test text must have characters split across tokens"
    return tokens


def _invalid_alone(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_decode_stream_bytes():
    table = [b"\xe6", b"\x97\xa5", b"!", b"\xf0\x9f", b"\x99\x82", b"\xc3"]
    assert list(decode_stream(range(5), table.__getitem__)) == ["日", "!", "🙂"]
    assert list(decode_stream([2, 5], table.__getitem__)) == ["!", "\ufffd"]   # cut off at the end


def test_decode_stream_split_tokens(smollm_engine):
    tokens = split_tokens(smollm_engine)
    pieces = list(decode_stream(tokens, smollm_engine.tokenizer.token_bytes))
    assert "".join(pieces) == MULTIBYTE and not any("\ufffd" in p for p in pieces)


def test_generate_and_chat_stream_whole_characters(smollm_engine, monkeypatch):
    tokens = split_tokens(smollm_engine)
    monkeypatch.setattr(smollm_engine, "generate_tokens", lambda ids, **kw: iter(tokens))
    pieces = list(smollm_engine.generate("x", max_new_tokens=len(tokens)))
    assert "".join(pieces) == MULTIBYTE and not any("\ufffd" in p for p in pieces)
    session = ChatSession(smollm_engine)
    pieces = list(session.send("x"))
    assert "".join(pieces) == MULTIBYTE and not any("\ufffd" in p for p in pieces)
    assert session.messages[-1] == {"role": "assistant", "content": MULTIBYTE}


# -- command line -------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "ntransformer_jax"]
TIMEOUT = 300


class PtyChat:
    """The CLI with stdin/stdout on a pseudo-terminal (echo off), as a user at a terminal runs it."""

    def __init__(self, *args: str):
        master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        # SIGINT as at a terminal: a shell's background job (a CI run started with `&`) would
        # hand its children SIGINT ignored, and the Ctrl-C test could not reach the CLI.
        self.proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(slave)
        self.master = master

    def read_until(self, suffix: bytes, timeout: float = TIMEOUT) -> str:
        """Output up to and including `suffix` at its end ("\\r\\n" read as "\\n")."""
        buf, deadline = b"", time.monotonic() + timeout
        while not buf.endswith(suffix):
            ready, _, _ = select.select([self.master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no {suffix!r} within {timeout}s; got {buf!r}")
            try:
                data = os.read(self.master, 4096)
            except OSError:   # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"output ended before {suffix!r}: {buf!r}; "
                                     f"stderr: {self.proc.stderr.read().decode()}")
            buf += data
        return buf.decode("utf-8").replace("\r\n", "\n")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def finish(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=60)
            return code, self.proc.stderr.read().decode()
        finally:
            self.proc.kill()
            os.close(self.master)


def test_cli_chat_two_turns_on_a_terminal(smollm_path):
    chat = PtyChat("--chat", "--temperature", "0", "--n_predict", "24")
    try:
        assert chat.read_until(b"> ") == "> "
        chat.type("What is the capital of France?\n")
        answer1 = chat.read_until(b"\n> ")[:-len("\n> ")]
        chat.type("And what is the capital of Germany?\n")
        answer2 = chat.read_until(b"\n> ")[:-len("\n> ")]
        chat.type("/exit\n")
        code, stderr = chat.finish()
    finally:
        chat.proc.kill()
    assert "Paris" in answer1 and "Berlin" in answer2, (answer1, answer2)
    assert code == 0, stderr
    assert "error" not in stderr and "Traceback" not in stderr


def test_cli_chat_bad_utf8_line_is_skipped_not_fatal(tiny_f32_path):
    """A line of undecodable bytes gets one error line and is not sent; the chat goes on."""
    r = subprocess.run([sys.executable, "-m", "ntransformer_jax", "--chat", "--model", tiny_f32_path,
                        "--chat_template", "{{ messages[-1].content }}", "--n_predict", "2",
                        "--temperature", "0"], input=b"hi \xff\xfe\nhello\n", capture_output=True,
                       timeout=300)
    stderr = r.stderr.decode()
    assert r.returncode == 0, stderr
    errors = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "not valid UTF-8" in errors[0], stderr
    assert r.stdout.decode().count("> ") >= 3, r.stdout    # prompts: bad line, hello, end


@pytest.mark.parametrize("end", ["ctrl-d", "ctrl-c"])
def test_cli_chat_ends_cleanly(end, tiny_f32_path):
    chat = PtyChat("--chat", "--model", tiny_f32_path, "--chat_template", "{{ messages[-1].content }}")
    try:
        chat.read_until(b"> ")
        if end == "ctrl-d":
            chat.type("\x04")
        else:
            chat.proc.send_signal(signal.SIGINT)
        code, stderr = chat.finish()
    finally:
        chat.proc.kill()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr


def test_cli_chat_one_shot_matches_plain_generation(smollm_path, smollm_engine):
    system, question = "You are a helpful assistant. Answer in one sentence.", "What is the capital of Italy?"
    r = subprocess.run([*CLI, "--chat", "--prompt", question, "--system", system, "--temperature", "0",
                        "--n_predict", "24"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "Rome" in r.stdout and "tok/s" in r.stderr
    # The same prompt rendered by plain jinja2 and run through the plain generation path.
    source = smollm_engine.model_file.metadata[KEY_CHAT_TEMPLATE]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    prompt = plain_jinja(source, messages)
    assert r.stdout == "".join(smollm_engine.generate(prompt, max_new_tokens=24, temperature=0)) + "\n"


@pytest.mark.parametrize("args,needle", [
    ([], "no chat template"),
    (["--chat_template", "/nonexistent/t.jinja"], "neither template text nor an existing file"),
    (["--chat_template", "{% if %}"], "chat template line 1"),
])
def test_cli_chat_template_errors(args, needle, tiny_f32_path):
    r = subprocess.run([*CLI, "--chat", "--model", tiny_f32_path, "--prompt", "hi", *args],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_cli_chat_flags_need_chat():
    r = subprocess.run([*CLI, "--system", "x", "--prompt", "hi"], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 2 and r.stderr.strip() == "error: --system is only used with --chat"
