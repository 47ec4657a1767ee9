"""Fuzzing the model-file boundary: every mutant of a valid GGUF opens or raises NTransformerError.

Mutants of two small valid files (SentencePiece and byte-level BPE vocabularies). Half are byte
mutants: bit flips, random bytes, absurd values in length/count/type/offset fields, truncation,
duplicated or removed key/value pairs and tensor infos, mostly in the header, metadata and tensor
table. Half are structured: the file is decoded, a key gets an odd value or type (NaN, huge
numbers, odd token texts, short arrays) or a tensor info an odd type/shape/offset, and the file is
encoded again, so the mutation gets past the parser to the config and tokenizer checks. Each
case runs `ModelFile(path)` and `Tokenizer.from_metadata` (plus a short encode/decode) in a worker
process under a memory limit and a per-case timeout, so a hang or a crash fails the test instead
of stalling it; a sample of the mutants that pass validation also goes through the full `load()`.

Environment: NTJ_FUZZ_CASES (default 10000, ~20 s on 2 cores), NTJ_FUZZ_SEED (default 0),
NTJ_FUZZ_FULL_LOADS (default 50). A failure prints the case index and its mutation; rerun one
case with `python tests/test_fuzz.py --show SEED INDEX` (writes the mutant to ./fuzz-SEED-INDEX.gguf).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import gguf
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
if __name__ == "__main__":   # a worker: test this checkout, not an installed copy
    sys.path.insert(0, REPO)
import bad_files as B  # noqa: E402

N_CASES = int(os.environ.get("NTJ_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("NTJ_FUZZ_SEED", "0"))
N_FULL_LOADS = int(os.environ.get("NTJ_FUZZ_FULL_LOADS", "50"))
CASE_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 60.0        # a full load may compile; still bounded
START_TIMEOUT_S = 120.0      # worker start: imports JAX and the tokenizer library
N_WORKERS = max(1, min(2, os.cpu_count() or 1))
MEMORY_LIMIT = 4 << 30       # address space of a worker: a runaway allocation is a MemoryError
BASES = ("llama", "gpt2")
VT = gguf.GGUFValueType


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things are in a GGUF file, from `gguf.GGUFReader` of the valid base."""

    size: int
    kv_end: int                          # end of the key/value pairs
    info_end: int                        # end of the tensor infos
    fields: tuple[tuple[int, int], ...]  # (offset, width) of every 4- or 8-byte number
    records: tuple[tuple[int, int], ...]  # (start, end) of each key/value pair and tensor info


def layout(path: str) -> Layout:
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    fields = [(B.OFFSET_VERSION, 4), (B.OFFSET_N_TENSORS, 8), (B.OFFSET_N_KV, 8)]
    records = []
    kv_end = info_end = B.HEADER_BYTES
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        spans = [(p.ctypes.data - base, p.nbytes) for p in field.parts]
        fields += [(o, n) for (o, n), p in zip(spans, field.parts) if p.size == 1 and n in (4, 8)]
        records.append((field.offset, max(o + n for o, n in spans)))
        kv_end = max(kv_end, records[-1][1])
    for t in reader.tensors:
        spans = [(p.ctypes.data - base, p.nbytes) for p in t.field.parts]
        fields += [(o, n) for (o, n), p in zip(spans, t.field.parts) if n in (4, 8) and p.size == 1]
        fields += [(o + 8 * i, 8) for (o, n), p in zip(spans, t.field.parts)
                   if p.dtype == np.uint64 and p.size > 1 for i in range(p.size)]   # dims
        records.append((t.field.offset, max(o + n for o, n in spans)))
        info_end = max(info_end, records[-1][1])
    return Layout(int(reader.data.size), kv_end, info_end, tuple(fields), tuple(records))


def _interesting(old: int, width: int, size: int, rng: np.random.Generator) -> int:
    choices = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 63, 64, 255, 256, 65535, 1 << 31,
               (1 << 31) - 1, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1, size, size - 1, size + 1, old + 1, old - 1, old * 2, old * 1000,
               old ^ (1 << int(rng.integers(0, 8 * width)))]
    return int(choices[int(rng.integers(len(choices)))]) % (1 << (8 * width))


def mutate(base: bytes, lay: Layout, rng: np.random.Generator) -> tuple[bytes, str]:
    """One mutant of `base` and a description of what was done."""
    data = bytearray(base)
    done = []
    regions = [(0, B.HEADER_BYTES), (B.HEADER_BYTES, lay.kv_end), (lay.kv_end, lay.info_end),
               (0, lay.size)]

    def offset() -> int:
        lo, hi = regions[int(rng.choice(4, p=[0.1, 0.45, 0.35, 0.1]))]
        return int(rng.integers(lo, max(hi, lo + 1)))

    for _ in range(int(rng.integers(1, 4))):
        op = rng.choice(["flip", "bytes", "field", "field"])
        if op == "flip":
            pos = min(offset(), len(data) - 1)
            bits = int(rng.integers(1, 9))
            for _ in range(bits):
                data[pos + int(rng.integers(0, min(8, len(data) - pos)))] ^= 1 << int(rng.integers(8))
            done.append(f"flip {bits} bits near {pos}")
        elif op == "bytes":
            pos, n = offset(), int(rng.integers(1, 33))
            data[pos:pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            done.append(f"{n} random bytes at {pos}")
        else:
            pos, width = lay.fields[int(rng.integers(len(lay.fields)))]
            old = int.from_bytes(data[pos:pos + width], "little")
            new = _interesting(old, width, lay.size, rng)
            data[pos:pos + width] = new.to_bytes(width, "little")
            done.append(f"u{8 * width} at {pos}: {old} -> {new}")
    op = rng.choice(["none", "truncate", "duplicate", "remove"], p=[0.55, 0.15, 0.15, 0.15])
    if op == "truncate":
        end = lay.info_end + 64 if rng.random() < 0.8 else lay.size
        cut = int(rng.integers(0, end))
        del data[cut:]
        done.append(f"truncate at {cut}")
    elif op in ("duplicate", "remove"):
        if rng.random() < 0.7:
            start, end = lay.records[int(rng.integers(len(lay.records)))]
        else:
            start = offset()
            end = start + int(rng.integers(1, 64))
        if op == "duplicate":
            at = end if rng.random() < 0.5 else offset()
            data[at:at] = data[start:end]
            done.append(f"copy of bytes {start}:{end} inserted at {at}")
        else:
            del data[start:end]
            done.append(f"bytes {start}:{end} removed")
    return bytes(data), "; ".join(done)


# Structured mutants: the file is decoded, one or two key/value pairs or tensor infos are changed to
# well-formed but unusual values, and the file is encoded again.

_NUMERIC = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
            VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
            VT.FLOAT64: "<d"}
_ODD_TEXTS = ["", " ", "\x00", "<0xZZ>", "<0x41>", "<0x>", "<|endoftext|>", "</s>", "<s>", "<unk>",
              "\u2581", "\u2581\u2581", "gpt2", "llama", "bert", "default", "llama-bpe", "smollm",
              "qwen2", "a b", "a", " a", "\udcff", "\uffff<missing>", "x" * 3000, "\u00e9\u4e2d",
              "[EMPTY_0]", "<|im_end|>", "<|eot_id|>", "phi-3", "unused"]


@dataclasses.dataclass
class _Decoded:
    kvs: list[list]       # [key, value type, item type or None, value]
    tensors: list[list]   # [name, dims (ne0 first), type id, offset]
    data: bytes           # the data section, from the first tensor byte on


def decode(path: str) -> _Decoded:
    reader = gguf.GGUFReader(path)
    kvs = []
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            item = field.types[-1] if field.types[0] == VT.ARRAY else None
            kvs.append([name, field.types[0], item, field.contents()])
    tensors = [[t.name, [int(x) for x in t.shape], int(t.tensor_type),
                int(t.data_offset - reader.data_offset)] for t in reader.tensors]
    return _Decoded(kvs, tensors, bytes(reader.data[reader.data_offset:]))


def _encode_value(vtype: int, value, item=None) -> bytes:
    if vtype == VT.STRING:
        raw = str(value).encode("utf-8", errors="surrogatepass")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == VT.ARRAY:
        return (struct.pack("<IQ", item, len(value))
                + b"".join(_encode_value(item, v) for v in value))
    fmt = _NUMERIC[vtype]
    if fmt in "<f<d":
        return struct.pack(fmt, float(value))
    bits = 8 * struct.calcsize(fmt)
    value = int(value) if not isinstance(value, float) or np.isfinite(value) else 0
    if fmt.islower():  # signed: wrap into range
        value = (value + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
    elif fmt != "<?":
        value %= 1 << bits
    return struct.pack(fmt, bool(value) if fmt == "<?" else value)


def encode(d: _Decoded) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", 3, len(d.tensors), len(d.kvs))]
    alignment = 32
    for key, vtype, item, value in d.kvs:
        out.append(_encode_value(VT.STRING, key) + struct.pack("<I", vtype)
                   + _encode_value(vtype, value, item))
        if key == "general.alignment" and vtype == VT.UINT32 and value > 0 and not value & (value - 1):
            alignment = min(int(value), 1 << 20)
    for name, dims, type_id, offset in d.tensors:
        out.append(_encode_value(VT.STRING, name) + struct.pack("<I", len(dims))
                   + struct.pack(f"<{len(dims)}Q", *(x % (1 << 64) for x in dims))
                   + struct.pack("<IQ", type_id % (1 << 32), offset % (1 << 64)))
    head = b"".join(out)
    return head + bytes(-len(head) % alignment) + d.data


def _odd_number(old, rng: np.random.Generator):
    ints = [0, 1, -1, 2, 3, 7, 8, 31, 32, 255, 256, 299, 300, 301, 512, 1 << 16, (1 << 31) - 1,
            1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, -(1 << 63)]
    floats = [0.0, -0.0, -1.0, 1e-45, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), -float("inf")]
    pool = ints + floats + ([old + 1, old - 1, old * 2] if isinstance(old, (int, float)) else [])
    return pool[int(rng.integers(len(pool)))]


def _mutate_value(vtype: int, item, value, rng: np.random.Generator) -> tuple[int, object, object]:
    """Another (type, item type, value) for one key; mostly the same type with an odd value."""
    if rng.random() < 0.25:                                   # change the type
        vtype = int(rng.choice([t for t in _NUMERIC] + [VT.STRING, VT.ARRAY]))
        if vtype == VT.ARRAY:
            item = int(rng.choice([t for t in _NUMERIC] + [VT.STRING]))
            value = value if isinstance(value, list) else [value]
            value = [str(v) if item == VT.STRING else _as_number(v) for v in value]
        elif vtype == VT.STRING:
            value = str(value)[:200]
        else:
            value = _as_number(value[0] if isinstance(value, list) and value else value)
            if rng.random() < 0.5:
                value = _odd_number(value, rng)
        return vtype, item, value
    if vtype == VT.STRING:
        return vtype, item, _ODD_TEXTS[int(rng.integers(len(_ODD_TEXTS)))]
    if vtype != VT.ARRAY:
        return vtype, item, (not value) if vtype == VT.BOOL else _odd_number(value, rng)
    value = list(value)
    op = rng.choice(["elements", "elements", "shorten", "lengthen", "empty"])
    if op == "shorten":
        value = value[:int(rng.integers(0, max(len(value), 1)))]
    elif op == "lengthen":
        value = value + value[:int(rng.integers(1, 64))] * int(rng.integers(1, 4))
    elif op == "empty":
        value = []
    else:
        for _ in range(int(rng.integers(1, 6))):
            if value:
                i = int(rng.integers(len(value)))
                value[i] = (_ODD_TEXTS[int(rng.integers(len(_ODD_TEXTS)))] if item == VT.STRING
                            else _odd_number(value[i], rng))
    return vtype, item, value


def _as_number(v):
    if isinstance(v, (bool, int, float)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return len(str(v))


def mutate_structured(d: _Decoded, rng: np.random.Generator) -> tuple[bytes, str]:
    d = _Decoded([list(kv) for kv in d.kvs], [list(t) for t in d.tensors], d.data)
    done = []
    for _ in range(int(rng.integers(1, 3))):
        if rng.random() < 0.7:
            i = int(rng.integers(len(d.kvs)))
            key, vtype, item, value = d.kvs[i]
            op = rng.choice(["value"] * 8 + ["drop", "duplicate", "rename"])
            if op == "value":
                d.kvs[i][1:] = _mutate_value(vtype, item, value, rng)
                shown = repr(d.kvs[i][3])[:80]
                done.append(f"{key} = ({d.kvs[i][1]}, {d.kvs[i][2]}) {shown}")
            elif op == "drop":
                del d.kvs[i]
                done.append(f"drop {key}")
            elif op == "duplicate":
                d.kvs.insert(int(rng.integers(len(d.kvs) + 1)), list(d.kvs[i]))
                done.append(f"duplicate {key}")
            else:
                d.kvs[i][0] = key.replace("llama.", "llamb.") if rng.random() < 0.5 else key + "x"
                done.append(f"rename {key} -> {d.kvs[i][0]}")
        else:
            i = int(rng.integers(len(d.tensors)))
            name, dims, type_id, offset = d.tensors[i]
            op = rng.choice(["type", "dims", "offset", "drop", "rename"])
            if op == "type":
                d.tensors[i][2] = int(rng.choice([t.value for t in gguf.GGMLQuantizationType] + [4, 99]))
            elif op == "dims":
                shapes = [dims[::-1], dims[:1], dims + [1], dims + [2], [dims[0] * 2] + dims[1:],
                          [1] + dims, [0] + dims[1:], dims * 3]
                d.tensors[i][1] = shapes[int(rng.integers(len(shapes)))]
            elif op == "offset":
                offsets = [0, offset + 32, offset - 32, offset + 1, len(d.data), 1 << 62]
                d.tensors[i][3] = offsets[int(rng.integers(len(offsets)))]
            elif op == "drop":
                del d.tensors[i]
            else:
                d.tensors[i][0] = name.replace("weight", "bias")
            done.append(f"tensor {name}: {op}")
    return encode(d), "structured: " + "; ".join(done)


class Mutants:
    """Mutant number i of a run (base file and mutation both chosen by (seed, i))."""

    def __init__(self, base_paths: dict[str, str], seed: int):
        self.seed = seed
        self.bases = {}
        for kind in BASES:
            with open(base_paths[kind], "rb") as f:
                self.bases[kind] = (f.read(), layout(base_paths[kind]), decode(base_paths[kind]))

    def __call__(self, index: int) -> tuple[bytes, str]:
        rng = np.random.default_rng([self.seed, index])
        kind = BASES[index % len(BASES)]
        base, lay, decoded = self.bases[kind]
        if index // len(BASES) % 2:
            data, what = mutate_structured(decoded, rng)
        else:
            data, what = mutate(base, lay, rng)
        return data, f"{kind}: {what}"


# ---------------------------------------------------------------------------------------------
# The worker: runs cases in a separate process and answers one JSON line per case
# ---------------------------------------------------------------------------------------------

def _check(path: str, full_load: bool) -> dict:
    """Open `path` as the engine does; classify the outcome."""
    from ntransformer_jax.errors import NTransformerError
    from ntransformer_jax.model_file import ModelFile
    from ntransformer_jax.tokenizer import Tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if full_load:
                import ntransformer_jax as nt
                engine = nt.load(path, ctx_size=16)
                tokenizer = engine.tokenizer
            else:
                tokenizer = Tokenizer.from_metadata(ModelFile(path).metadata)
            ids = tokenizer.encode("Hello world, the fox! 123 <|endoftext|> </s>")
            tokenizer.decode(ids)
            result = {"result": "ok"}
        except NTransformerError as e:
            result = {"result": "error", "type": type(e).__name__, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - any other exception is the finding
            result = {"result": "bug", "type": type(e).__name__,
                      "message": str(e)[:300], "traceback": traceback.format_exc()[-3000:]}
    if caught and result["result"] != "bug":
        w = caught[0]
        result = {"result": "bug", "type": w.category.__name__,
                  "message": f"warning: {w.message} ({os.path.basename(w.filename)}:{w.lineno})"}
    return result


def _worker(seed: int, folder: str, *base_paths: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    mutants = Mutants(dict(zip(BASES, base_paths)), seed)
    _check(base_paths[0], full_load=False)   # warm up imports before the first timed case
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        index = request["index"]
        data, _ = mutants(index)
        path = os.path.join(folder, f"case-{index}.gguf")
        with open(path, "wb") as f:
            f.write(data)
        result = _check(path, full_load=request["full"])
        os.remove(path)
        print(json.dumps({"index": index, **result}), flush=True)


class _Worker:
    """One worker process, restarted after a hang or a crash."""

    def __init__(self, args: list[str], log_path: str):
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True, cwd=REPO)
        log.close()
        lines = self.lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        first = self._read(START_TIMEOUT_S)
        if not first or "ready" not in first:
            raise RuntimeError(f"fuzz worker did not start: {first}; log:\n{self.log_tail()}")

    def _read(self, timeout: float) -> dict | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return {"timeout": True}
        return json.loads(line) if line else None

    def log_tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")

    def run(self, index: int, full: bool) -> dict:
        if self.proc is None:
            self.start()
        self.proc.stdin.write(json.dumps({"index": index, "full": full}) + "\n")
        self.proc.stdin.flush()
        timeout = LOAD_TIMEOUT_S if full else CASE_TIMEOUT_S
        answer = self._read(timeout)
        if answer is None:
            code = self.stop()
            return {"result": "bug", "type": "crash",
                    "message": f"worker died (exit {code}): {self.log_tail()}"}
        if "timeout" in answer:
            self.stop()
            return {"result": "bug", "type": "hang", "message": f"no answer within {timeout} s"}
        return answer

    def stop(self) -> int | None:
        """End the process; returns its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        return proc.returncode


def _run_all(workers: list[_Worker], jobs: list[tuple[int, bool]]) -> dict[tuple[int, bool], dict]:
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    results: dict[tuple[int, bool], dict] = {}

    def drive(worker: _Worker) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            results[job] = worker.run(*job)

    threads = [threading.Thread(target=drive, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("fuzz-bases")
    return {kind: B.write_small(folder / f"small-{kind}.gguf", kind) for kind in BASES}


def test_fuzz_model_file(bases, tmp_path):
    t0 = time.perf_counter()
    args = [sys.executable, os.path.abspath(__file__), "--worker", str(SEED), str(tmp_path),
            *(bases[k] for k in BASES)]
    workers = [_Worker(args, str(tmp_path / f"worker-{i}.log")) for i in range(N_WORKERS)]
    try:
        results = _run_all(workers, [(i, False) for i in range(N_CASES)])
        passed = sorted(i for (i, _), r in results.items() if r["result"] == "ok")
        sample = passed[::max(1, len(passed) // N_FULL_LOADS)][:N_FULL_LOADS]
        results.update(_run_all(workers, [(i, True) for i in sample]))
    finally:
        for w in workers:
            w.stop()
    mutants = Mutants(bases, SEED)
    bugs = [(i, full, r) for (i, full), r in sorted(results.items()) if r["result"] == "bug"]
    kinds: dict[str, list] = {}   # one example of each kind of failure: type and raising line
    for i, full, r in bugs:
        where = [l for l in r.get("traceback", "").splitlines() if l.lstrip().startswith("File ")]
        kind = f"{r['type']} {where[-1].strip() if where else r['message'][:60]}"
        kinds.setdefault(kind, []).append((i, full, r))
    report = "\n".join(
        f"{len(cases)} x {kind}\n  e.g. case {i}{' (full load)' if full else ''} [{mutants(i)[1]}]: "
        f"{r['message']}" + (f"\n{r['traceback']}" if "traceback" in r and n < 3 else "")
        for n, (kind, cases) in enumerate(kinds.items()) for i, full, r in cases[:1])
    counts = {k: sum(r["result"] == k for r in results.values()) for k in ("ok", "error", "bug")}
    print(f"\nfuzz: {N_CASES} cases + {len(sample)} full loads in {time.perf_counter() - t0:.1f} s: "
          f"{counts}")
    assert not bugs, f"{len(bugs)} of {len(results)} cases failed (seed {SEED}):\n{report}"
    # The mutations must reach past the first checks, or the fuzzer tests little.
    errors = {r["message"].split(":")[0] for r in results.values() if r["result"] == "error"}
    assert counts["ok"] >= N_CASES // 50 and len(errors) >= 5, (counts, errors)


def _show(seed: int, index: int) -> None:
    """Write mutant `index` of `seed` to ./fuzz-SEED-INDEX.gguf and print what happens to it."""
    folder = tempfile.mkdtemp()
    bases = {kind: B.write_small(os.path.join(folder, f"base-{kind}.gguf"), kind) for kind in BASES}
    data, what = Mutants(bases, seed)(index)
    shutil.rmtree(folder)
    path = os.path.abspath(f"fuzz-{seed}-{index}.gguf")
    with open(path, "wb") as f:
        f.write(data)
    print(what)
    print(json.dumps(_check(path, full_load=False), indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
    elif sys.argv[1] == "--show":
        _show(int(sys.argv[2]), int(sys.argv[3]))
