"""Generation controls a llama.cpp user expects: stop strings, --ignore-eos, a prompt from a file."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ntransformer_jax as nt
from ntransformer_jax.engine import until_stop
from ntransformer_jax.errors import InputError

CHAT_PROMPT = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"


def _cut(pieces, stop):
    out = list(until_stop(pieces, stop))
    return "".join(t for t, _ in out), any(h for _, h in out)


@pytest.mark.parametrize("pieces,stop,want,hit", [
    (["Hello", " wor", "ld. Bye"], ["."], "Hello world", True),
    (["Hel", "lo\n", "\nnext"], ["\n\n"], "Hello", True),           # stop split across pieces
    (["ab", "c", "d"], ["cd", "bc"], "a", True),                    # the earliest match wins
    (["abc"], ["x"], "abc", False),
    (["a", "b"], ["bz"], "ab", False),                              # a held prefix that never completes
    (["STOP now"], ["STOP"], "", True),
    (["é", "tè", "s"], ["ès"], "ét", True),
])
def test_until_stop(pieces, stop, want, hit):
    assert _cut(pieces, stop) == (want, hit)


def test_until_stop_holds_back_only_a_possible_start():
    """Text that cannot begin a stop string is released at once (streaming stays live)."""
    out = list(until_stop(iter(["Hello wo", "rld"]), ["world!"]))
    assert out[0] == ("Hello ", False)          # "wo" could start "world!": held
    assert "".join(t for t, _ in out) == "Hello world"


def test_generate_stops_at_a_stop_string(smollm_engine):
    plain = "".join(smollm_engine.generate("The capital of France is", max_new_tokens=24, temperature=0))
    stop = plain[6:9]
    assert stop and plain.find(stop) >= 0
    got = "".join(smollm_engine.generate("The capital of France is", max_new_tokens=24, temperature=0,
                                         stop=[stop, "\x00never"]))
    assert got == plain[:plain.find(stop)]
    assert smollm_engine.last_stats.stop_reason == "stop"
    # Nothing found: the same text as without stop strings.
    assert "".join(smollm_engine.generate("The capital of France is", max_new_tokens=24, temperature=0,
                                          stop="\x00never")) == plain


@pytest.mark.parametrize("stop", [[""], [3], "".join])
def test_bad_stop_strings(smollm_engine, stop):
    with pytest.raises(InputError, match="stop"):
        list(smollm_engine.generate("hi", max_new_tokens=2, stop=stop))


def test_ignore_eos_runs_to_the_limit(smollm_engine):
    ids = smollm_engine.tokenize(CHAT_PROMPT)
    greedy = nt.SamplingParams(temperature=0)
    plain = list(smollm_engine.generate_tokens(ids, max_new_tokens=64, params=greedy))
    assert smollm_engine.last_stats.stop_reason == "eog" and len(plain) < 64
    more = list(smollm_engine.generate_tokens(ids, max_new_tokens=len(plain) + 8, params=greedy,
                                              ignore_eos=True))
    assert smollm_engine.last_stats.stop_reason == "max_new_tokens"
    assert len(more) == len(plain) + 8 and more[:len(plain)] == plain
    assert not any(smollm_engine.tokenizer.is_eog(t) for t in more)
    batch = smollm_engine.generate_batch_tokens([ids], max_new_tokens=len(plain) + 8, params=greedy,
                                                ignore_eos=True)
    assert batch == [more]


def test_ignore_eos_with_a_speculative_draft(smollm_path):
    spec = nt.load(smollm_path, ctx_size=128, max_vram_layers=28, max_ram_layers=30, draft_model="self")
    ids = spec.tokenize(CHAT_PROMPT)
    greedy = nt.SamplingParams(temperature=0)
    plain = list(nt.load(smollm_path, ctx_size=128).generate_tokens(ids, max_new_tokens=40, params=greedy,
                                                                     ignore_eos=True))
    assert list(spec.generate_tokens(ids, max_new_tokens=40, params=greedy, ignore_eos=True)) == plain
    assert spec.spec_stats.drafted > 0


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ntransformer_jax", "--temperature", "0", *args],
                          capture_output=True, text=True, timeout=300, input=stdin)


def test_cli_file_stop_and_ignore_eos(tmp_path, smollm_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is", encoding="utf-8")
    plain = _cli("--prompt", "The capital of France is", "--n_predict", "12")
    from_file = _cli("--file", str(prompt), "--n_predict", "12")
    assert plain.returncode == 0 and from_file.stdout == plain.stdout and "Paris" in plain.stdout
    cut = _cli("--file", str(prompt), "--n_predict", "12", "--stop", "ris")
    assert cut.returncode == 0 and cut.stdout == plain.stdout[:plain.stdout.find("ris")] + "\n"
    assert "stop: stop" in cut.stderr
    r = _cli("--prompt", CHAT_PROMPT, "--n_predict", "80", "--ignore_eos")
    assert r.returncode == 0 and "stop: max_new_tokens" in r.stderr and "generated: 80 tokens" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--file", "/nonexistent/prompt.txt"], "No such file"),
    (["--file", __file__, "--prompt", "x"], "not both"),
    (["--stop", ""], "non-empty"),
    (["--chat", "--prompt", "hi", "--ignore_eos"], "not used with --chat"),
])
def test_cli_generation_flag_errors(args, needle, smollm_path):
    r = _cli(*args)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and needle in errors[0], r.stderr
