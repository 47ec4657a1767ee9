"""Bad input ends in one `error:` line and exit code 2 (input) or 1 (runtime), never a traceback.

Each broken model file is built from the tiny synthetic Llama (see `bad_files`); the same file is
checked through the API (`load` raises `NTransformerError` naming the problem) and the CLI (same
message after `error: `).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import gguf
import numpy as np
import jax
import pytest

import bad_files as B
import ntransformer_jax as nt
from ntransformer_jax.errors import InputError, ModelFileError, NTransformerError
from ntransformer_jax.metadata import read_metadata
from ntransformer_jax.model_file import ModelFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QT = gguf.GGMLQuantizationType
BASE_ARGS = ("--prompt", "hi", "--n_predict", "2", "--temperature", "0")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ntransformer_jax", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run; nothing else on stderr, nothing on stdout."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == "", r.stdout
    return lines[0]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> str:
    return B.write_valid(tmp_path_factory.mktemp("valid") / "valid.gguf")


# name -> (builder(valid, folder) -> path, words the message must contain)
BAD_FILES = {
    "missing_path": (lambda v, d: os.path.join(d, "nope.gguf"), ["not found", "nope.gguf"]),
    "directory": (lambda v, d: d, ["directory"]),
    "empty": (lambda v, d: B.truncated(v, os.path.join(d, "empty.gguf"), 0), ["empty"]),
    "bad_magic": (lambda v, d: B.patched(v, os.path.join(d, "magic.gguf"), 0, b"GGML"),
                  ["not a GGUF file", "GGML"]),
    "version": (lambda v, d: B.patched(v, os.path.join(d, "v4.gguf"), B.OFFSET_VERSION,
                                       struct.pack("<I", 4)), ["unsupported GGUF version 4"]),
    "truncated_header": (lambda v, d: B.truncated(v, os.path.join(d, "head.gguf"), 16),
                         ["truncated GGUF header"]),
    "truncated_metadata": (lambda v, d: B.truncated(v, os.path.join(d, "meta.gguf"), 3000),
                           ["truncated"]),
    "data_past_end": (lambda v, d: B.truncated(v, os.path.join(d, "data.gguf"), -1000),
                      ["output.weight", "past the end"]),
    "shape": (lambda v, d: B.rewritten(v, os.path.join(d, "shape.gguf"), set_keys={
        "llama.feed_forward_length": (768, B.VT.UINT32)}),
        ["blk.0.ffn_gate.weight", "768"]),
    "missing_tensor": (lambda v, d: B.rewritten(v, os.path.join(d, "tensor.gguf"),
                                                drop_tensors=("blk.1.ffn_down.weight",)),
                       ["missing tensor", "blk.1.ffn_down.weight"]),
    "missing_key": (lambda v, d: B.rewritten(v, os.path.join(d, "key.gguf"),
                                             drop_keys=("llama.block_count",)),
                    ["missing metadata key", "llama.block_count"]),
    "arch_mamba": (lambda v, d: B.rewritten(v, os.path.join(d, "mamba.gguf"), arch="mamba"),
                   ["unsupported architecture", "mamba"]),
    "arch_gpt2": (lambda v, d: B.rewritten(v, os.path.join(d, "gpt2.gguf"), arch="gpt2"),
                  ["unsupported architecture", "gpt2"]),
    "moe": (lambda v, d: B.rewritten(v, os.path.join(d, "moe.gguf"), set_keys={
        "llama.expert_count": (8, B.VT.UINT32), "llama.expert_used_count": (2, B.VT.UINT32)}),
        ["mixture-of-experts", "llama.expert_count=8"]),
    "iq2_xxs": (lambda v, d: B.rewritten(v, os.path.join(d, "iq2.gguf"),
                                         retype={"blk.0.attn_q.weight": QT.IQ2_XXS}),
                ["unsupported quantization type IQ2_XXS", "blk.0.attn_q.weight"]),
    "tq1_0": (lambda v, d: B.rewritten(v, os.path.join(d, "tq1.gguf"),
                                       retype={"blk.1.ffn_up.weight": QT.TQ1_0}),
              ["unsupported quantization type TQ1_0", "blk.1.ffn_up.weight"]),
    "tokenizer_model": (lambda v, d: B.rewritten(v, os.path.join(d, "tok.gguf"), set_keys={
        "tokenizer.ggml.model": ("bert", B.VT.STRING)}), ["tokenizer.ggml.model", "bert"]),
    "huge_array": (lambda v, d: _huge_array(v, os.path.join(d, "huge.gguf")),
                   ["tokenizer.ggml.scores", "cannot fit"]),
    "rope_freqs_zero": (lambda v, d: _zero_tensor(v, os.path.join(d, "rope.gguf"), "rope_freqs.weight"),
                        ["rope_freqs.weight", "positive"]),
    "byte_token": (lambda v, d: B.rewritten(v, os.path.join(d, "byte.gguf"), set_keys={
        "tokenizer.ggml.tokens": (["<unk>", "<s>", "</s>", "<0xZZ>"] + _tokens(v)[4:], B.VT.ARRAY,
                                  B.VT.STRING)}), []),
}
# Run through the CLI too (each run starts Python and JAX: ~2 s); the rest are API-only.
CLI_FILES = ("missing_path", "directory", "bad_magic", "version", "truncated_header",
             "data_past_end", "shape", "missing_tensor", "missing_key", "arch_mamba", "iq2_xxs",
             "tokenizer_model")


def _huge_array(valid: str, dst: str) -> str:
    """The float array `tokenizer.ggml.scores` claiming 2**40 items."""
    reader = gguf.GGUFReader(valid)
    field = reader.fields["tokenizer.ggml.scores"]
    count_part = field.parts[4]   # key length, key, value type, item type, count
    offset = count_part.ctypes.data - reader.data.ctypes.data
    return B.patched(valid, dst, offset, struct.pack("<Q", 1 << 40))


def _zero_tensor(valid: str, dst: str, name: str) -> str:
    """`name`'s data bytes set to zero."""
    t = next(t for t in gguf.GGUFReader(valid).tensors if t.name == name)
    return B.patched(valid, dst, t.data_offset, bytes(t.n_bytes))


def _tokens(valid: str) -> list[str]:
    return read_metadata(gguf.GGUFReader(valid))["tokenizer.ggml.tokens"]


@pytest.fixture(scope="module")
def bad_file(valid, tmp_path_factory):
    made: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in made:
            folder = str(tmp_path_factory.mktemp(case))
            made[case] = BAD_FILES[case][0](valid, folder)
        return made[case]

    return get


def _load_error(path: str) -> NTransformerError:
    with pytest.raises(NTransformerError) as info:
        nt.load(path)
    return info.value


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_load_bad_file_raises_model_file_error(case, bad_file):
    path = bad_file(case)
    err = _load_error(path)
    assert isinstance(err, ModelFileError), repr(err)
    message = str(err)
    assert "\n" not in message
    for word in BAD_FILES[case][1]:
        assert word in message, message
    assert os.path.basename(path.rstrip("/")) in message or path in message, message


@pytest.mark.parametrize("case", CLI_FILES)
def test_cli_bad_file_is_one_error_line(case, bad_file):
    path = bad_file(case)
    r = run_cli("--model", path, *BASE_ARGS)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert error_line(r) == f"error: {_load_error(path)}"


def test_cli_verbose_shows_traceback(bad_file):
    r = run_cli("--model", bad_file("bad_magic"), *BASE_ARGS, "--verbosity=1")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "ModelFileError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: not a GGUF file")


@pytest.mark.parametrize("args,needle", [
    (["--ctx_size", "-5"], "--ctx_size=-5"),
    (["--top_p", "0"], "--top_p=0"),
    (["--top_p", "1.5"], "--top_p=1.5"),
    (["--temperature", "-1"], "--temperature=-1"),
    (["--min_p", "2"], "--min_p=2"),
    (["--temperature", "warm"], "--temperature"),
    (["--ctx_size", "1.5"], "--ctx_size"),
    (["--n_predict", "-3"], "--n_predict=-3"),
    (["--kernels", "fast"], "--kernels"),
    pytest.param(["--kernels", "on"], "kernels='on' needs a GPU",
                 marks=pytest.mark.skipif(jax.default_backend() == "gpu", reason="has a GPU")),
    (["--matmul", "f8"], "--matmul"),
])
def test_cli_nonsense_flag_values(args, needle, valid):
    r = run_cli("--model", valid, *BASE_ARGS, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in error_line(r)


def test_cli_prompt_longer_than_ctx(valid):
    r = run_cli("--model", valid, *BASE_ARGS, "--ctx_size", "8",
                "--prompt", "one two three four five six seven eight nine ten")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "ctx_size=8" in error_line(r)


def test_cli_n_predict_past_ctx_stops_with_notice(valid):
    r = run_cli("--model", valid, *BASE_ARGS, "--ctx_size", "8", "--n_predict", "50")
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr
    assert "stopped at ctx_size=8" in r.stderr
    assert r.stdout.strip()


def test_api_input_errors(valid):
    engine = nt.load(valid, ctx_size=8)
    with pytest.raises(InputError, match="ctx_size=8"):
        list(engine.generate("one two three four five six seven eight nine ten", max_new_tokens=2))
    with pytest.raises(InputError, match="top_p"):
        list(engine.generate("hi", top_p=1.5))
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.logits([1, 10**6])
    with pytest.raises(InputError, match="ctx_size=-1"):
        nt.load(valid, ctx_size=-1)


@pytest.mark.parametrize("call,needle", [
    (lambda e: e.logits(np.array([1.5, 2.0])), "integers.*float64"),
    (lambda e: e.logits("hello"), "not text"),
    (lambda e: e.logits([[1, 2], [3, 4]]), "flat sequence"),
    (lambda e: e.tokenize(123), "must be a string, not int"),
    (lambda e: list(e.generate(b"hi \xff", max_new_tokens=2)), "not valid UTF-8"),
    (lambda e: list(e.generate("hi \udcff", max_new_tokens=2)), "not valid UTF-8"),
    (lambda e: list(e.generate_tokens([1, 2], max_new_tokens=2, seed=1 << 64)), "seed"),
])
def test_api_bad_arguments_are_input_errors(call, needle, valid):
    with pytest.raises(InputError, match=needle):
        call(nt.load(valid, ctx_size=16))


def test_api_bytes_prompt_is_utf8_text(valid):
    e = nt.load(valid, ctx_size=16)
    assert e.tokenize("héllo".encode()) == e.tokenize("héllo")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(vram_budget_gb="24"), "vram_budget_gb='24'"), (dict(ram_budget_gb=True), "ram_budget_gb"),
    (dict(prefetch_depth=2.5), "prefetch_depth=2.5 must be an integer"),
    (dict(max_vram_layers="3"), "max_vram_layers"),
])
def test_load_option_types(kwargs, needle, valid):
    with pytest.raises(InputError, match=needle):
        nt.load(valid, ctx_size=16, **kwargs)


def test_parser_matches_gguf_reader(valid, smollm_path):
    """The defensive parser reads the same metadata and tensor bytes as `gguf.GGUFReader`."""
    for path in (valid, smollm_path):
        reader = gguf.GGUFReader(path)
        want = read_metadata(reader)
        mf = ModelFile(path)
        assert mf.metadata.keys() == want.keys()
        for key, value in want.items():
            got = mf.metadata[key]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and np.array_equal(got, value), key
            else:
                assert type(got) is type(value) and got == value, key
        assert sorted(mf.tensors) == sorted(t.name for t in reader.tensors)
        for t in reader.tensors:
            info = mf.tensors[t.name]
            assert (info.qtype, info.offset, info.n_bytes) == (t.tensor_type, t.data_offset, t.n_bytes)
            assert info.shape == tuple(reversed([int(x) for x in t.shape]))
            assert np.asarray(t.data).tobytes() == info.data.tobytes()


@pytest.mark.parametrize("args,needle", [
    (["--vram_budget_gb", "-1"], "vram_budget_gb=-1"),
    (["--ram_budget_gb", "-3"], "ram_budget_gb=-3"),
    (["--max_vram_layers", "-1"], "max_vram_layers=-1"),
    (["--vram_budget_gb", "0.0001"], "minimum is"),
    (["--vram_budget_gb", "1", "--max_vram_layers", "0", "--ram_budget_gb", "0.0000001"], "minimum is"),
])
def test_cli_bad_budgets(args, needle, valid):
    r = run_cli("--model", valid, *BASE_ARGS, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in error_line(r)


def test_cli_file_truncated_while_streaming(valid, tmp_path):
    """All layers on disk; the file is cut after the first streamed text: one error line naming
    the file, exit 1, no hang."""
    import shutil
    import time
    path = str(tmp_path / "streamed.gguf")
    shutil.copy(valid, path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ntransformer_jax", "--model", path, "--prompt", "hi", "--n_predict", "3000",
         "--ctx_size", "3100", "--temperature", "0", "--max_vram_layers", "0", "--max_ram_layers", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    proc.stdout.read(1)                     # generation has started
    os.truncate(path, 4096)
    t = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - t < 60
    assert proc.returncode == 1, (proc.returncode, err)
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and "streamed.gguf" in errors[0] and "layer " in errors[0], err
    assert "Traceback" not in err


def test_cli_file_truncated_under_mmap(valid, tmp_path):
    """--streaming=mmap, all layers on disk; the file is cut while the chat waits for a message (no
    layer read in flight): one error line naming the layer and the file, exit 1, no SIGBUS."""
    import shutil
    path = str(tmp_path / "mapped.gguf")
    shutil.copy(valid, path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ntransformer_jax", "--model", path, "--chat", "--chat_template",
         "{{ messages[-1].content }}", "--n_predict", "4", "--temperature", "0", "--max_vram_layers", "0",
         "--streaming", "mmap"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.read(2) == "> "      # loaded; layers are read only once a message comes
    os.truncate(path, 4096)
    out, err = proc.communicate("hi\n", timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "mapped.gguf" in errors[0] and "layer 0" in errors[0], err
    assert "truncated" in errors[0], err
    assert "Traceback" not in err
