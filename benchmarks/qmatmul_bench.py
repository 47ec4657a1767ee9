"""Fused dequantize + matmul prefill kernel against the XLA path, on Llama-3 8B and 70B shapes.

    python benchmarks/qmatmul_bench.py [--shapes 8b,70b] [--types Q4_0,Q8_0,Q4_K,Q6_K] [--m 512]
                                       [--budget_s 240] [--quick] [--out F]
    python benchmarks/qmatmul_bench.py --smoke        # CPU: Pallas interpret mode, tiny shapes

For every type of `--types` (any of `qmatmul.SUPPORTED_TYPES`), every matrix N x K as the engine
runs prefill (q/k/v fused by rows, gate/up fused by rows; 8B: qkv 6144x4096, o 4096x4096,
gate_up 28672x4096, down 4096x14336; 70B: qkv 10240x8192, o 8192x8192, gate_up 57344x8192,
down 8192x28672) and every M of `--m`: random valid weight blocks (kernels_bench.random_weight),
repacked once on the device (`qmatvec.repack`); `qmatmul.qmatmul_packed` at dtype bfloat16 timed
for a bounded sweep of BlockSizes, beside the XLA paths `model.linear` takes for more than 8 rows
without the prefill kernel: `qmatvec.dequantize_packed`, then a bf16 einsum accumulated in f32
(`--matmul bf16`) or an f32 einsum at HIGHEST precision. With `--xla_form engine` (the default)
the baseline is shaped as the engine runs it: a fused matrix multiplied part by part (q, k, v;
gate, up: model's `_linear_split`), each part dequantized in model.linear's row chunks;
`--xla_form plain` times one dequantize + einsum of the whole matrix.

Steps, in this order:
1. every case at `BlockSizes.get_default`, at bfloat16 (and float32 with `--f32`), plus both
   XLA baselines;
2. for each (type, model, M), within an equal share of what is left of `--budget_s` (the
   sweep's own time, split across types): on gate_up, coordinate descent from the default over block_m {32, 64, 128, 256},
   block_n {64, 128, 256}, block_k {64, 128, 256, 512}, num_warps {4, 8}, num_stages {2, 3, 4}
   (one axis at a time, keeping the best); then the three best gate_up configs on the model's
   other matrices;
3. with `--f32`, every case at float32 with its best bf16 tiling (IEEE products: slow).
Configs that `qmatmul.plan` rejects are skipped (block_k below the type's packed block);
compile errors print one line and the sweep goes on; `--quick` skips step 2. A run lasts about
step 1 (compiles, mostly) + budget + step 3.

Timing (`ceilings.pipelined_time`): one jitted program runs the bf16 kernel on `--unroll`
different x (nothing is shared between the calls), dispatched back to back and blocked once per
sample; the median over `--repeats` samples, divided by the calls per sample. An XLA baseline
runs one call per program (its dequantization would otherwise be shared across the unrolled
calls), and so does the float32 kernel (milliseconds a call: dispatch does not show). Each
figure: time, TFLOP/s (2 M N K), % of the bf16 matmul rate measured in the same run
(`ceilings.bf16_matmul_tflops`), weight GB/s (packed bytes) and speedup over XLA bf16.
Correctness: every timed kernel config's output for x[0] is compared with `qmatmul_reference`
at the same dtype on the same device. Both round x and W to that dtype identically and
accumulate in f32, so only the summation order differs: max |y - ref| / (|x| @ |W|^T) <= 1e-5,
as kernels_bench. A failing config is never best; failures print a loud line at once and make
the exit status 1, as does a default tiling (bf16 or float32) that does not compile or run.

Output: progress lines; JSON to `--out` (default $OUT/qmatmul.json when $OUT is set); a Python
literal of the best BlockSizes per (type, model, matrix) for each M, to paste as tuned defaults;
the failures, if any; then, last, two tables: per matrix (best, default, XLA bf16 and f32,
float32 kernel) and per layer (the sum over the four matrices with the best configs against XLA
bf16: the per-layer prefill matmul time, the figure that decides whether the engine should use
qmatmul).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ceilings import bf16_matmul_tflops, pipelined_time
from kernels_bench import ConfigRecords, _bs_dict, _bs_short, _descend, _one_line, random_weight
from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatmul as qmm
from ntransformer_jax.kernels import qmatvec as qm

T = gguf.GGMLQuantizationType
HIGHEST = jax.lax.Precision.HIGHEST
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
MATMUL_DTYPES = {"bf16": BF16, "f32": F32}  # model.linear's `matmul` names
RTOL = 1e-5
TINY = np.finfo(np.float32).tiny

# Prefill matrices N x K (rows x columns of W) as the engine runs them: q/k/v and gate/up fused
# by rows. 8B: D 4096, F 14336, 8 KV heads x 128; 70B: D 8192, F 28672, 8 KV heads x 128.
MODELS = {
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
           "down": (4096, 14336)},
    "70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192),
            "down": (8192, 28672)},
}
SWEEP_MATRIX = "gate_up"
DEFAULT_TYPES = "Q4_0,Q8_0,Q4_K,Q6_K"
AXES = {"block_m": (32, 64, 128, 256), "block_n": (64, 128, 256), "block_k": (64, 128, 256, 512),
        "num_warps": (4, 8), "num_stages": (2, 3, 4)}
TOP = 3               # best gate_up configs carried to the other matrices
DESCENT_SHARE = 0.6   # of a (type, model, M) share: the descent; the rest carries configs over
# The parts (row counts) of the row-fused matrices, which the engine's XLA path multiplies one
# by one: q, k, v and gate, up (and, to run that path, three parts of --smoke's "big").
PARTS = {
    "8b": {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)},
    "70b": {"qkv": (8192, 1024, 1024), "gate_up": (28672, 28672)},
    "smoke": {"big": (32, 16, 16)},
}
# model.LINEAR_CHUNK_ELEMS: model.linear dequantizes matrices with more elements in row chunks.
ENGINE_CHUNK_ELEMS = 1 << 26
XLA_FORMS = ("engine", "plain")

# --smoke: CPU interpreter, tiny shapes, a two-axis sweep.
SMOKE_MODELS = {"smoke": {"big": (64, 512), "small": (32, 256)}}
SMOKE_SWEEP_MATRIX = "big"
SMOKE_AXES = {"block_m": (16, 32), "block_n": (16, 32)}
SMOKE_M = "16"


# ---------------------------------------------------------------------------------------------
# The jitted programs: the XLA baseline, the references and the error check.
# ---------------------------------------------------------------------------------------------

def xla_chunks(n_rows: int, n_cols: int) -> int:
    """Row chunks model.linear (`_n_chunks`) splits an [n_rows, n_cols] matrix into."""
    n = 1
    while n_rows * n_cols // n > ENGINE_CHUNK_ELEMS and n_rows % (2 * n) == 0:
        n *= 2
    return n


def xla_parts(n_rows: int, n_cols: int, parts: tuple[int, ...] | None,
              form: str) -> tuple[tuple[int, int], ...]:
    """(rows, chunks) of each separate product of the XLA baseline on an [n_rows, n_cols] W.

    "engine": the matrix's parts (None: one part) in model.linear's row chunks; "plain": the
    whole matrix at once.
    """
    if form == "plain":
        return ((n_rows, 1),)
    parts = parts or (n_rows,)
    assert sum(parts) == n_rows, (parts, n_rows)
    return tuple((rows, xla_chunks(rows, n_cols)) for rows in parts)


@functools.partial(jax.jit, static_argnames=("qtype", "n_cols", "matmul", "parts"))
def xla_linear(x: jax.Array, packed: tuple[jax.Array, ...], qtype: T, n_cols: int,
               matmul: str, parts: tuple[tuple[int, int], ...]) -> tuple[jax.Array, ...]:
    """model.linear's path for more than 8 rows: x [M, K] @ W^T, one [M, rows] f32 per part.

    Each part (`xla_parts`: rows of W, taken in order) is multiplied on its own; each of its row
    chunks is dequantized (`qmatvec.dequantize_packed`), then multiplied: "bf16" rounds both
    operands to bfloat16 and accumulates in f32; "f32" is an f32 einsum at HIGHEST.
    """
    def mm(p):
        w = qm.dequantize_packed(p, qtype, n_cols)  # [rows / chunks, K] f32
        if matmul == "bf16":
            return jnp.einsum("mk,nk->mn", x.astype(BF16), w.astype(BF16),
                              preferred_element_type=F32)
        return jnp.einsum("mk,nk->mn", x, w, precision=HIGHEST)

    outs, start = [], 0
    for rows, chunks in parts:
        part = tuple(a[start:start + rows] for a in packed)
        start += rows
        if chunks == 1:
            outs.append(mm(part))
            continue
        part = tuple(a.reshape(chunks, rows // chunks, *a.shape[1:]) for a in part)
        out = jax.lax.map(mm, part)                                  # [chunks, M, rows / chunks]
        outs.append(jnp.moveaxis(out, 0, 1).reshape(x.shape[0], rows))  # [M, rows]
    return tuple(outs)


@functools.partial(jax.jit, static_argnames=("qtype", "n_cols"))
def _check_arrays(x: jax.Array, packed: tuple[jax.Array, ...], qtype: T,
                  n_cols: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """`qmatmul_reference` of x [M, K] at each kernel dtype, and the error scale |x| @ |W|^T."""
    w = qm.dequantize_packed(packed, qtype, n_cols)  # [N, K]
    scale = jnp.einsum("mk,nk->mn", jnp.abs(x), jnp.abs(w), precision=HIGHEST)
    refs = {d.name: qmm.qmatmul_reference(x, packed, qtype, n_cols, dtype=d) for d in qmm.DTYPES}
    return refs, scale


@jax.jit
def _max_rel_err(y: jax.Array | tuple[jax.Array, ...], ref: jax.Array,
                 scale: jax.Array) -> jax.Array:
    """max |y - ref| / scale; y [M, N], or its column blocks (`xla_linear`'s parts)."""
    if isinstance(y, (tuple, list)):
        y = jnp.concatenate(y, axis=-1)
    return jnp.max(jnp.abs(y - ref) / jnp.maximum(scale, TINY))


_repack = jax.jit(qm.repack, static_argnums=(1, 2))


# ---------------------------------------------------------------------------------------------
# Cases and their runs.
# ---------------------------------------------------------------------------------------------

class Case(ConfigRecords):
    """One (type, model, matrix, M): its weight, x rows, references and every timed config."""

    def __init__(self, qtype: T, model: str, matrix: str, n_rows: int, n_cols: int, m_rows: int,
                 packed: tuple[jax.Array, ...], xs: list[jax.Array],
                 xla_parts: tuple[tuple[int, int], ...]):
        self.qtype, self.model, self.matrix = qtype, model, matrix
        self.n_rows, self.n_cols, self.m_rows = n_rows, n_cols, m_rows
        self.xla_parts = xla_parts  # (rows, chunks) of the XLA baseline's products
        self.packed, self.xs = packed, xs  # xs: `--unroll` x [M, K] f32
        self.weight_bytes = sum(int(a.size) * a.dtype.itemsize for a in packed)
        self.flops = 2 * m_rows * n_rows * n_cols
        self.default = qmm.BlockSizes.get_default(qtype, m_rows, n_rows, n_cols)
        self.configs: list[dict] = []    # every bf16 config tried, in order
        self.f32: dict[str, dict] = {}   # "default", "best": the kernel at float32
        self.xla: dict[str, dict] = {}   # "bf16", "f32": the baselines
        self.refs: dict[str, jax.Array] | None = None
        self.scale: jax.Array | None = None

    @property
    def label(self) -> str:
        return (f"{self.qtype.name} {self.model} {self.matrix} {self.n_rows}x{self.n_cols}"
                f" M={self.m_rows}")

    def default_record(self) -> dict | None:
        return next((c for c in self.configs if c["block_sizes"] == _bs_dict(self.default)), None)


class Bench:
    """Runs and records the configs; owns the options that every timing shares."""

    def __init__(self, args: argparse.Namespace, ceiling_tflops: float):
        self.args, self.ceiling = args, ceiling_tflops
        self.interpret = args.smoke
        self.failures: list[str] = []
        self.n_timed = 0

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(msg, flush=True)

    def figures(self, case: Case, seconds: float) -> dict:
        tflops = case.flops / seconds / 1e12
        rec = dict(time_s=seconds, tflops=tflops, pct_bf16=100.0 * tflops / self.ceiling,
                   gbps=case.weight_bytes / seconds / 1e9)
        if "time_s" in case.xla.get("bf16", {}):
            rec["x_xla_bf16"] = case.xla["bf16"]["time_s"] / seconds
        return rec

    def baselines(self, case: Case) -> None:
        """The references and error scale for x[0], then both XLA baselines timed."""
        qtype, k, x, packed = case.qtype, case.n_cols, case.xs[0], case.packed
        try:
            case.refs, case.scale = jax.block_until_ready(_check_arrays(x, packed, qtype, k))
        except Exception as err:  # noqa: BLE001 - the kernel runs are then reported unchecked
            print(f"  {case.label} references: {_one_line(err)}", flush=True)
        parts = case.xla_parts
        for matmul in MATMUL_DTYPES:
            fn = lambda matmul=matmul: xla_linear(x, packed, qtype, k, matmul, parts)
            try:
                y = jax.block_until_ready(fn())
                t = pipelined_time(fn, self.args.repeats)
            except Exception as err:  # noqa: BLE001 - report and go on with the other cases
                case.xla[matmul] = dict(error=_one_line(err), parts=parts)
                print(f"  {case.label} XLA {matmul}: {case.xla[matmul]['error']}", flush=True)
                continue
            rec = dict(parts=parts, **self.figures(case, t))
            if case.refs is not None:  # a sanity figure; the baselines are not the kernel
                ref = case.refs[MATMUL_DTYPES[matmul].name]
                rec["max_rel_err"] = float(_max_rel_err(y, ref, case.scale))
            case.xla[matmul] = rec
            print(f"  {case.label} XLA {matmul}: {t * 1e6:.1f} us {rec['tflops']:.1f} TFLOP/s",
                  flush=True)

    def run(self, case: Case, bs: qmm.BlockSizes, dtype: jnp.dtype = BF16) -> dict | None:
        """Time `bs` at `dtype` on `case` and check its output.

        bf16 records go into `case.configs`; the caller keeps float32 ones. None when plan()
        rejects `bs` or a bf16 run of it is already recorded.
        """
        if dtype == BF16 and case.tried(bs):
            return None
        try:
            qmm.plan(case.qtype, case.m_rows, case.n_rows, case.n_cols, bs)
        except InputError:
            return None
        rec: dict[str, Any] = dict(block_sizes=_bs_dict(bs), dtype=dtype.name)
        if dtype == BF16:
            case.configs.append(rec)
        qtype, k, interpret = case.qtype, case.n_cols, self.interpret
        xs = case.xs if dtype == BF16 else case.xs[:1]  # float32 calls are long: no unroll
        where = f"{case.label} {dtype.name} {_bs_short(bs)}"

        @jax.jit
        def calls(xs, packed):
            return [qmm.qmatmul_packed(x, packed, qtype, k, block_sizes=bs, dtype=dtype,
                                       interpret=interpret) for x in xs]

        try:
            t0 = time.perf_counter()
            y0 = jax.block_until_ready(calls(xs, case.packed))[0]
            rec["compile_s"] = time.perf_counter() - t0   # compile and first run
            t = pipelined_time(lambda: calls(xs, case.packed), self.args.repeats)
        except Exception as err:  # noqa: BLE001 - a config that does not compile or run
            rec["error"] = _one_line(err)
            print(f"  {where}: {rec['error']}", flush=True)
            return rec
        self.n_timed += 1
        rec.update(self.figures(case, t / len(xs)))
        if case.refs is None:
            rec["ok"], rec["max_rel_err"] = False, None
            self.fail(f"!!! UNCHECKED {where}: the reference failed")
            return rec
        rec["max_rel_err"] = float(_max_rel_err(y0, case.refs[dtype.name], case.scale))
        rec["ok"] = bool(rec["max_rel_err"] <= RTOL)   # NaN fails too
        if not rec["ok"]:
            self.fail(f"!!! WRONG RESULT {where}: max relative error {rec['max_rel_err']:.3g}"
                      f" > {RTOL}")
        speed = f" {rec['x_xla_bf16']:.2f}x XLA bf16" if "x_xla_bf16" in rec else ""
        print(f"  {where}: {rec['time_s'] * 1e6:.1f} us {rec['tflops']:.1f} TFLOP/s{speed}",
              flush=True)
        return rec


def _carry_over(bench: Bench, case: Case, source: Case, deadline: float) -> None:
    """Run the TOP best configs of `source` on `case`."""
    for c in source.ok_configs()[:TOP]:
        if time.perf_counter() > deadline:
            return
        bench.run(case, qmm.BlockSizes(**c["block_sizes"]))


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------

def _case_record(case: Case) -> dict:
    return dict(type=case.qtype.name, model=case.model, matrix=case.matrix, n=case.n_rows,
                k=case.n_cols, m=case.m_rows, flops=case.flops, weight_bytes=case.weight_bytes,
                xla_parts=case.xla_parts, best=case.best(), default=case.default_record(),
                xla=case.xla, f32=case.f32, configs=case.configs)


def _layers(results: list[dict]) -> list[dict]:
    """Per (type, model, M): the sums over the layer's matrices (complete only if all ran)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["type"], r["model"], r["m"]), []).append(r)
    out = []
    for (qtype, model, m), rs in groups.items():
        def total(get):
            times = [get(r) for r in rs]
            return sum(times) if all(t is not None for t in times) else None
        t = lambda c: c.get("time_s") if c else None
        rec = dict(type=qtype, model=model, m=m, matrices=[r["matrix"] for r in rs],
                   flops=sum(r["flops"] for r in rs),
                   kernel_s=total(lambda r: t(r["best"])),
                   default_s=total(lambda r: t(r["default"])),
                   xla_bf16_s=total(lambda r: t(r["xla"].get("bf16"))),
                   xla_f32_s=total(lambda r: t(r["xla"].get("f32"))),
                   kernel_f32_s=total(lambda r: t(r["f32"].get("best"))))
        if rec["kernel_s"] and rec["xla_bf16_s"]:
            rec["x_xla_bf16"] = rec["xla_bf16_s"] / rec["kernel_s"]
        out.append(rec)
    return out


def _suggestion(res: dict) -> str:
    """Python literal of the best BlockSizes per (type, model, matrix), one dict per M."""
    lines = [f"# qmatmul_bench.py best BlockSizes ({res['card']}, jax {res['jax']},"
             f" {res['date']}); key (type, model, matrix)"]
    for m in res["m"]:
        lines.append(f"QMATMUL_TUNED_M{m} = {{")
        for r in res["results"]:
            if r["m"] != m or r["best"] is None:
                continue
            fields = ", ".join(f"{k}={v}" for k, v in r["best"]["block_sizes"].items())
            speed = (f", {r['best']['x_xla_bf16']:.2f}x XLA bf16"
                     if "x_xla_bf16" in r["best"] else "")
            lines.append(f"    (T.{r['type']}, {r['model']!r}, {r['matrix']!r}):"
                         f" BlockSizes({fields}),  # {r['n']}x{r['k']}{speed}")
        lines.append("}")
    return "\n".join(lines)


def _us(c: dict | None) -> str:
    return f"{c['time_s'] * 1e6:.1f}" if c and c.get("time_s") else "-"


def _table(res: dict) -> str:
    legend = "/".join(f.name for f in dataclasses.fields(qmm.BlockSizes))
    lines = [f"BlockSizes: {legend}; %bf16: of the bf16 matmul rate ({res['bf16_tflops']:.3g}"
             " TFLOP/s); x XLA: XLA bf16 time / best time; f32: the kernel at float32, best"
             " tiling; check: best config correct, and how many others were wrong or failed",
             f"{'type':<5} {'model':<5} {'matrix':<7} {'N x K':<11} {'M':>4} {'best us':>8}"
             f" {'TFLOP/s':>7} {'%bf16':>5} {'GB/s':>5} {'dflt us':>8} {'XLA bf16':>8}"
             f" {'XLA f32':>8} {'x XLA':>5} {'f32 us':>8}  {'best BlockSizes':<16} check"]
    for r in res["results"]:
        best = r["best"]
        wrong = sum(1 for c in r["configs"] if c.get("ok") is False)
        broken = sum(1 for c in r["configs"] if "error" in c)
        check = ("ok" if best else "FAIL") + (f", {wrong} wrong" if wrong else "") + (
            f", {broken} errors" if broken else "")
        shape = f"{r['n']}x{r['k']}"
        lines.append(
            f"{r['type']:<5} {r['model']:<5} {r['matrix']:<7} {shape:<11} {r['m']:>4}"
            f" {_us(best):>8} {best['tflops'] if best else 0:>7.1f}"
            f" {best['pct_bf16'] if best else 0:>5.1f} {best['gbps'] if best else 0:>5.0f}"
            f" {_us(r['default']):>8} {_us(r['xla'].get('bf16')):>8} {_us(r['xla'].get('f32')):>8}"
            f" {best.get('x_xla_bf16', 0) if best else 0:>5.2f} {_us(r['f32'].get('best')):>8}"
            f"  {_bs_short(best['block_sizes']) if best else '-':<16} {check}")
    lines += ["", "Per layer (sum over the matrices above; kernel: best configs)",
              f"{'type':<5} {'model':<5} {'M':>4} {'kernel us':>10} {'default us':>10}"
              f" {'XLA bf16 us':>11} {'XLA f32 us':>10} {'f32 krn us':>10} {'x XLA bf16':>10}"]
    us = lambda s: f"{s * 1e6:.1f}" if s else "-"
    for r in res["layers"]:
        speed = f"{r['x_xla_bf16']:.2f}" if "x_xla_bf16" in r else "-"
        lines.append(f"{r['type']:<5} {r['model']:<5} {r['m']:>4} {us(r['kernel_s']):>10}"
                     f" {us(r['default_s']):>10} {us(r['xla_bf16_s']):>11}"
                     f" {us(r['xla_f32_s']):>10} {us(r['kernel_f32_s']):>10} {speed:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8b,70b",
                   help=f"models, comma-separated, of {', '.join(MODELS)} (default 8b,70b;"
                        " ignored by --smoke)")
    p.add_argument("--types", default=DEFAULT_TYPES,
                   help=f"comma-separated GGML type names (default {DEFAULT_TYPES})")
    p.add_argument("--m", default=None, help="x rows, comma-separated (default 512; smoke 16)")
    p.add_argument("--quick", action="store_true", help="default BlockSizes only, no sweep")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of this script: interpret mode, tiny shapes, tiny sweep")
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 5; smoke 2)")
    p.add_argument("--unroll", type=int, default=None,
                   help="kernel calls per jitted program, each on its own x (default 4; smoke 2)")
    p.add_argument("--budget_s", type=float, default=240.0,
                   help="wall time of the sweep (step 2), after the default tilings (default 240)")
    p.add_argument("--f32", action="store_true",
                   help="also time the kernel at float32 (IEEE dots, ~0.3 s a call on 70B"
                        " gate_up: 50-100x XLA's f32); always on with --smoke")
    p.add_argument("--xla_form", choices=XLA_FORMS, default="engine",
                   help="XLA baselines as the engine runs them (fused matrices part by part, in"
                        " row chunks) or plain (one dequantize + einsum per matrix); default"
                        " engine")
    p.add_argument("--seed", type=int, default=0)
    default_out = os.path.join(os.environ["OUT"], "qmatmul.json") if os.environ.get("OUT") else None
    p.add_argument("--out", default=default_out,
                   help="JSON file, or a folder for qmatmul.json (default $OUT/qmatmul.json)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.f32 = args.f32 or args.smoke
    args.unroll = args.unroll or (2 if args.smoke else 4)
    try:
        args.m = [int(v) for v in (args.m or (SMOKE_M if args.smoke else "512")).split(",")]
    except ValueError:
        p.error(f"--m {args.m!r} must be comma-separated integers")
    if min(args.m) < 1:
        p.error(f"--m {args.m} must all be at least 1")
    try:
        args.types = [T[name.strip()] for name in args.types.split(",")]
    except KeyError as err:
        p.error(f"--types: {err} is not a GGML type name")
    missing = [t.name for t in args.types if t not in qmm.SUPPORTED_TYPES]
    if missing:
        supported = ", ".join(sorted(t.name for t in qmm.SUPPORTED_TYPES))
        p.error(f"--types: qmatmul has no kernel for {', '.join(missing)} (supported: {supported})")
    if args.smoke:
        args.models = SMOKE_MODELS
    else:
        names = [s.strip() for s in args.shapes.split(",")]
        if not set(names) <= set(MODELS):
            p.error(f"--shapes {args.shapes!r}: each must be one of {', '.join(MODELS)}")
        args.models = {name: MODELS[name] for name in names}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    axes = SMOKE_AXES if args.smoke else AXES
    sweep_matrix = SMOKE_SWEEP_MATRIX if args.smoke else SWEEP_MATRIX
    dev = jax.devices()[0]
    ceiling = bf16_matmul_tflops(256 if args.smoke else 8192)
    res: dict[str, Any] = dict(
        date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__, card=dev.device_kind,
        backend=jax.default_backend(), interpret=args.smoke, bf16_tflops=ceiling, rtol=RTOL,
        budget_s=args.budget_s, unroll=args.unroll, repeats=args.repeats,
        xla_form=args.xla_form, types=[t.name for t in args.types], m=args.m,
        models={name: {k: list(v) for k, v in mats.items()} for name, mats in args.models.items()})
    print(f"{dev.device_kind} jax {jax.__version__}: bf16 matmul {ceiling:.1f} TFLOP/s", flush=True)
    bench = Bench(args, ceiling)
    rng = np.random.default_rng(args.seed)
    xs_cache: dict[tuple[int, int], list[jax.Array]] = {}

    def xs_for(k: int, m: int) -> list[jax.Array]:
        if (k, m) not in xs_cache:
            xs_cache[k, m] = [jnp.asarray(rng.standard_normal((m, k), np.float32))
                              for _ in range(args.unroll)]
        return xs_cache[k, m]

    # 1. Weights, XLA baselines and the default tiling (bf16 and f32) of every case.
    cases: dict[tuple[T, str, str, int], Case] = {}
    for qtype in args.types:
        for model, matrices in args.models.items():
            for matrix, (n, k) in matrices.items():
                try:
                    w_data = jax.device_put(random_weight(rng, qtype, n, k))
                    packed = jax.block_until_ready(_repack(w_data, qtype, k))
                    del w_data
                except Exception as err:  # noqa: BLE001 - one type must not end the run
                    bench.fail(f"!!! {qtype.name} {model} {matrix} {n}x{k}: cannot build the"
                               f" weight: {_one_line(err)}")
                    continue
                parts = xla_parts(n, k, PARTS.get(model, {}).get(matrix), args.xla_form)
                for m in args.m:
                    case = Case(qtype, model, matrix, n, k, m, packed, xs_for(k, m), parts)
                    bench.baselines(case)
                    bench.run(case, case.default)
                    if args.f32:
                        rec = bench.run(case, case.default, F32)
                        if rec is not None:
                            case.f32["default"] = rec
                    cases[qtype, model, matrix, m] = case
                print(f"{qtype.name} {model} {matrix}: defaults done"
                      f" ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # 2. The sweep: each (type, model, M) gets an equal share of what is left of the budget.
    t_sweep = time.perf_counter()
    groups = [(qtype, model, m) for qtype in args.types for model in args.models for m in args.m]
    for i, (qtype, model, m) in enumerate(groups if not args.quick else []):
        share = max(0.0, args.budget_s - (time.perf_counter() - t_sweep)) / (len(groups) - i)
        now = time.perf_counter()
        big = cases.get((qtype, model, sweep_matrix, m))
        if big is None:
            continue
        _descend(bench, big, axes, now + DESCENT_SHARE * share, qmm.BlockSizes)
        for matrix in args.models[model]:
            case = cases.get((qtype, model, matrix, m))
            if matrix != sweep_matrix and case is not None:
                _carry_over(bench, case, big, now + share)
        print(f"{qtype.name} {model} M={m}: sweep done ({time.perf_counter() - t_start:.0f} s,"
              f" {bench.n_timed} configs timed)", flush=True)

    # 3. float32 at the best bf16 tiling.
    for case in cases.values() if args.f32 else ():
        best = case.best()
        if best is None:
            continue
        bs = qmm.BlockSizes(**best["block_sizes"])
        if bs == case.default and "default" in case.f32:
            case.f32["best"] = case.f32["default"]
        else:
            rec = bench.run(case, bs, F32)
            if rec is not None:
                case.f32["best"] = rec

    res["results"] = [_case_record(c) for c in cases.values()]
    for r in res["results"]:
        where = f"{r['type']} {r['model']} {r['matrix']} M={r['m']}"
        if r["default"] is None or "error" in r["default"]:
            bench.failures.append(f"!!! {where}: the default BlockSizes did not run (bf16)")
        if "error" in r["f32"].get("default", {}):
            bench.failures.append(f"!!! {where}: the default BlockSizes did not run (float32)")
        if r["best"] is None:
            bench.failures.append(f"!!! {where}: no config ran correctly")
    res["layers"] = _layers(res["results"])
    res["suggestion"] = _suggestion(res)
    res["failures"] = bench.failures
    res["configs_timed"] = bench.n_timed
    res["elapsed_s"] = time.perf_counter() - t_start
    if args.out:
        if os.path.isdir(args.out):      # a folder, like the other benches' --out
            args.out = os.path.join(args.out, "qmatmul.json")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\n" + res["suggestion"])
    if bench.failures:
        print(f"\n!!! {len(bench.failures)} FAILURES:\n" + "\n".join(bench.failures))
    print(f"\n{res['card']} jax {res['jax']}, bf16 matmul {ceiling:.1f} TFLOP/s,"
          f" {bench.n_timed} configs timed in {res['elapsed_s']:.0f} s"
          + (" (interpret mode: timings mean nothing)" if args.smoke else ""))
    print(_table(res), flush=True)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
