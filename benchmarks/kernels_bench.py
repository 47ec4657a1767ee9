"""Fused dequantize + matvec kernels against the XLA path, on Llama-3-70B (or 8B) matrix shapes.

    python benchmarks/kernels_bench.py [--quick] [--types Q4_0,Q8_0] [--budget_s 200] [--out F]
    python benchmarks/kernels_bench.py --smoke        # CPU: Pallas interpret mode, tiny shapes

For every type in `qmatvec.SUPPORTED_TYPES`, every shape N x K (q/o 8192x8192, k/v 1024x8192,
gate/up 28672x8192, down 8192x28672, glu: gate and up in one `qmatvec_glu_packed` launch, qkv
10240x8192) and M = 1, 8 rows of x (`--m`): random valid weight blocks (random
bytes with finite half scale fields, as tests/test_kernels.py's `random_weight` builds K-quants;
the kernel reads bytes, so quantizing real floats would not change a timing), repacked once;
`qmatvec_packed` timed for a bounded sweep of BlockSizes, and the XLA baseline
(`qmatvec_reference`: dequantize, then an f32 einsum) beside it.

Sweep, in this order, each step within a share of `--budget_s` (defaults always run):
1. every (type, shape, M) at `BlockSizes.get_default`, plus the XLA baseline;
2. gate/up, M = 1: coordinate descent from the default over int_dot, block_n {8..128}, block_k
   {256..2048}, split_k {1, 2, 4, 8}, num_warps {2..16}, num_stages {1..5} (one axis at a
   time, keeping the best); gate/up, M = 8: the three best M = 1 configs, then (`--descend_m8`)
   the same descent from the best of them;
3. the other shapes: the three best gate/up configs of the same M, and split_k variants of the
   best; then the shapes named by `--descend` get their own M = 1 descent from their best. Configs that `qmatvec.plan` rejects are skipped; `--quick` runs step 1 only.

Timing (`ceilings.pipelined_time`, after `--warmup_s` untimed, as the card drops its SM clock
while a config compiles): one jitted program runs the kernel on `--unroll` different x
(the kernel alone: with a K-split its partial sums stay unadded, as the engine's consumers take them)
and, for matrices smaller than `ROTATION_BYTES`, on copies of the weight in turn, so that no call
finds its weight in the L2 cache (50 MB on an H100) where the last left it: in the engine every
launch reads a weight that nothing has read since the token before. Dispatched back to back and
blocked once per sample; the median over `--repeats` samples, divided by the calls per sample.
Beside each (type, shape), an XLA int32 max over buffers of the same byte count, rotated the same
way (`ceilings.same_size_read_gbps`): what one plain read of that size reaches, for comparison.
The XLA baseline runs one call per program (its dequantization would otherwise be shared across the unrolled calls).
Correctness: every timed config's output for x[0] is compared with the XLA reference on the same
device: max |y - ref| / (|x| @ |W|^T) <= 1e-5, on the integer path after taking off the bound of
x's rounding (max|x_block| / 65278 per element, times |W|), as tests/test_kernels.py's
check_close does. A failing
config is never "best"; failures print a loud line at once and make the exit status 1.

Output: one line per failed config or compile error while running, JSON to `--out` (default
$OUT/kernels.json when $OUT is set), and a table last: best time, its BlockSizes, weight bytes
(packed arrays), GB/s and % of the HBM read ceiling measured in the same run, default and XLA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ceilings import hbm_read_gbps, pipelined_time, same_size_read_gbps
from ntransformer_jax import quants
from ntransformer_jax.errors import InputError
from ntransformer_jax.kernels import qmatvec as qm

T = gguf.GGMLQuantizationType
HIGHEST = jax.lax.Precision.HIGHEST
RTOL = 1e-5

# Llama-3-70B matrices, N x K (rows x columns of W): D = 8192, F = 28672, 8 KV heads x 128;
# "qkv": q, k and v stacked by rows, as the engine launches them (k/v alone never run there).
# "glu": gate and up stacked by rows [G; U] through `qmatvec_glu_packed` (the model's feed-forward
# launch: silu(x G^T) * (x U^T) in one kernel, split_k 1).
SHAPES_70B = {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192),
              "down": (8192, 28672), "glu": (57344, 8192), "qkv": (10240, 8192)}
# Llama-3-8B (--model 8b): D = 4096, F = 14336.
SHAPES_8B = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096),
             "down": (4096, 14336), "qkv": (6144, 4096), "glu": (28672, 4096)}
SWEEP_SHAPE = "gate/up"
GLU_SHAPE = "glu"
M_ROWS = (1, 8)
AXES = {"int_dot": (True, False), "fuse_x": (True, False), "block_n": (8, 16, 32, 64, 128), "block_k": (256, 512, 1024, 2048),
        "split_k": (1, 2, 4, 8), "num_warps": (2, 4, 8, 16), "num_stages": (1, 2, 3, 4, 5),
        "prefetch": (False, True)}
TOP = 3  # best gate/up configs carried to the other shapes and to M = 8
ROTATION_BYTES = 256 << 20  # weight copies read in turn add up to at least this (5x the L2)

# --smoke: CPU interpreter, tiny shapes, a two-axis sweep.
SMOKE_SHAPES = {"big": (64, 512), "small": (32, 256), "glu": (64, 256)}
SMOKE_AXES = {"block_n": (8, 16), "split_k": (1, 2)}

# Byte offsets of the little-endian half fields (scales, mins) inside one block, per type
# (ggml-common.h). Every other byte of a block may hold any value.
HALF_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q8_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}
FLOAT_DTYPES = {T.F32: np.float32, T.F16: np.float16}


def random_weight(rng: np.random.Generator, qtype: T, n_rows: int, n_cols: int,
                  scale: float = 0.01) -> np.ndarray:
    """uint8 [n_rows, row_bytes] of valid GGUF rows: random bytes, half fields N(0, scale).

    Float types get their values' bytes (N(0, scale) as float32 or float16).

    Raises:
        InputError: a type without a recipe (no entry in HALF_FIELDS) or a ragged row.
    """
    qtype = T(qtype)
    if qtype in FLOAT_DTYPES:
        w = rng.standard_normal((n_rows, n_cols), np.float32) * np.float32(scale)
        return w.astype(FLOAT_DTYPES[qtype]).view(np.uint8)
    if qtype not in HALF_FIELDS:
        raise InputError(f"no random-block recipe for {qtype.name} (add its half fields to "
                         "HALF_FIELDS)")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_cols % block_size:
        raise InputError(f"{n_cols=} must be a multiple of {block_size} for {qtype.name}")
    n_blocks = n_rows * (n_cols // block_size)
    blocks = np.frombuffer(bytearray(rng.bytes(n_blocks * type_size)), np.uint8)
    blocks = blocks.reshape(n_blocks, type_size)
    for offset in HALF_FIELDS[qtype]:
        half = (rng.standard_normal(n_blocks, np.float32) * np.float32(scale)).astype(np.float16)
        blocks[:, offset:offset + 2] = half.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(n_rows, -1)


def _bs_dict(bs: qm.BlockSizes) -> dict:
    return dataclasses.asdict(bs)


def _bs_short(bs: qm.BlockSizes | dict) -> str:
    """`32/256/1/4/2`: the field values in declaration order."""
    values = bs.values() if isinstance(bs, dict) else dataclasses.asdict(bs).values()
    return "/".join(str(v) for v in values)


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


class ConfigRecords:
    """The configs a case tried (`self.configs`: dicts with "block_sizes", "ok", "time_s")."""

    configs: list[dict]

    def tried(self, bs) -> bool:
        return any(c["block_sizes"] == _bs_dict(bs) for c in self.configs)

    def ok_configs(self) -> list[dict]:
        return sorted((c for c in self.configs if c.get("ok")), key=lambda c: c["time_s"])

    def best(self) -> dict | None:
        ok = self.ok_configs()
        return ok[0] if ok else None


class Case(ConfigRecords):
    """One (type, shape, M): its weight, x rows, reference outputs and every timed config."""

    def __init__(self, qtype: T, shape_name: str, n_rows: int, n_cols: int, m_rows: int,
                 w_data: jax.Array, packs: list[tuple[jax.Array, ...]], rng: np.random.Generator,
                 unroll: int):
        self.qtype, self.shape_name, self.m_rows = qtype, shape_name, m_rows
        self.glu = shape_name == GLU_SHAPE
        self.n_rows, self.n_cols = n_rows, n_cols
        self.w_data, self.packs = w_data, packs   # packs: copies of the packed weight
        self.xs = [jnp.asarray(rng.standard_normal((m_rows, n_cols), np.float32))
                   for _ in range(unroll)]
        self.weight_bytes = sum(int(a.size) * a.dtype.itemsize for a in packs[0])
        self.configs: list[dict] = []   # every config tried, in order
        self.xla: dict = {}
        self.ref = self.scale = self.x_bound = None
        self.read_gbps = None   # same_size_read_gbps of the weight's bytes

    @property
    def label(self) -> str:
        return f"{self.qtype.name} {self.n_rows}x{self.n_cols} M={self.m_rows}"


class Bench:
    """Runs and records the configs; owns the options that every timing shares."""

    def __init__(self, args: argparse.Namespace, ceiling_gbps: float):
        self.args, self.ceiling = args, ceiling_gbps
        self.interpret = args.smoke
        self.failures: list[str] = []
        self.n_timed = 0

    def gbps(self, n_bytes: int, seconds: float) -> tuple[float, float]:
        g = n_bytes / seconds / 1e9
        return g, 100.0 * g / self.ceiling

    def reference(self, case: Case) -> None:
        """Time the XLA baseline and keep its output for x[0] and the error scale |x| @ |W|^T."""
        qtype, k = case.qtype, case.n_cols
        ref_fn = jax.jit(lambda x, w: qm.qmatvec_reference(x, w, qtype, k))
        def x_round(x):   # what the integer path's rounding of x may move each element by
            m = x.shape[0]
            s = jnp.max(jnp.abs(x).reshape(m, -1, 32), axis=-1, keepdims=True) / qm.X_QMAX
            return jnp.broadcast_to(0.51 * s, (m, k // 32, 32)).reshape(m, k)

        scale_fn = jax.jit(lambda x, w: [jnp.einsum(
            "mk,nk->mn", v, jnp.abs(quants.dequantize(w, qtype, k)), precision=HIGHEST)
            for v in (jnp.abs(x), x_round(x))])
        try:
            case.ref = jax.block_until_ready(ref_fn(case.xs[0], case.w_data))
            case.scale, case.x_bound = jax.block_until_ready(scale_fn(case.xs[0], case.w_data))
            if case.glu:   # y = silu(g) u: first-order bound |silu'(g)| S_g |u| + |silu(g)| S_u
                g, u = jnp.split(case.ref, 2, axis=1)
                case.ref = jax.nn.silu(g) * u
                case.scale, case.x_bound = (
                    1.1 * s_g * jnp.abs(u) + jnp.abs(jax.nn.silu(g)) * s_u
                    for s_g, s_u in (jnp.split(a, 2, axis=1) for a in (case.scale, case.x_bound)))
            t = pipelined_time(lambda: ref_fn(case.xs[0], case.w_data), self.args.repeats,
                               warmup_s=self.args.warmup_s)
        except Exception as err:  # noqa: BLE001 - report and go on with the other cases
            case.xla = dict(error=_one_line(err))
            print(f"  {case.label} XLA reference: {case.xla['error']}", flush=True)
            return
        g, pct = self.gbps(int(case.w_data.nbytes), t)
        case.xla = dict(time_s=t, bytes=int(case.w_data.nbytes), gbps=g, pct_hbm=pct)

    def run(self, case: Case, bs: qm.BlockSizes) -> dict | None:
        """Time `bs` on `case` and check its output; None if plan() rejects it or already tried."""
        fmt = qm._format(case.qtype)
        if case.tried(bs) or (not bs.int_dot and fmt.int_x is None) or (
                not bs.fuse_x and not qm._takes_fused(fmt, dataclasses.replace(bs, fuse_x=True))):
            return None   # tried, or a flag that changes nothing for this type (the same kernel)
        if case.glu and bs.split_k != 1:
            return None   # the glu kernel needs whole sums
        try:
            qm.plan(case.qtype, case.m_rows, case.n_rows // 2 if case.glu else case.n_rows,
                    case.n_cols, bs)
        except InputError:
            return None
        rec: dict[str, Any] = dict(block_sizes=_bs_dict(bs))
        case.configs.append(rec)
        qtype, k, interpret = case.qtype, case.n_cols, self.interpret

        matvec = qm.qmatvec_glu_packed if case.glu else qm.qmatvec_packed

        # The kernel alone: a K-split's partial sums are left unadded (the engine's consumers,
        # the norm and RoPE kernels, add them as they load them); the check adds them.
        opts = {} if case.glu else dict(sum_splits=False)

        @jax.jit
        def calls(xs, packs):
            return [matvec(x, packs[i % len(packs)], qtype, k, block_sizes=bs,
                           interpret=interpret, **opts) for i, x in enumerate(xs)]

        try:
            t0 = time.perf_counter()
            y0 = jax.block_until_ready(calls(case.xs, case.packs))[0]
            y0 = y0 if case.glu else y0.sum(axis=0)
            rec["compile_s"] = time.perf_counter() - t0   # compile and first run
            t = pipelined_time(lambda: calls(case.xs, case.packs), self.args.repeats,
                               warmup_s=self.args.warmup_s)
        except Exception as err:  # noqa: BLE001 - a config that does not compile or run
            rec["error"] = _one_line(err)
            print(f"  {case.label} {_bs_short(bs)}: {rec['error']}", flush=True)
            return rec
        self.n_timed += 1
        rec["time_s"] = t / len(case.xs)
        rec["gbps"], rec["pct_hbm"] = self.gbps(case.weight_bytes, rec["time_s"])
        if case.ref is None:
            rec["ok"], rec["max_rel_err"] = False, None
            msg = f"!!! UNCHECKED {case.label} {_bs_short(bs)}: the XLA reference failed"
        else:
            excess = jnp.abs(y0 - case.ref)
            if qm._takes_int(qm._format(case.qtype), bs):   # less x's rounding, as the tests
                excess = excess - case.x_bound
            err = jnp.max(excess / jnp.maximum(case.scale, np.finfo(np.float32).tiny))
            rec["max_rel_err"] = float(err)
            rec["ok"] = bool(rec["max_rel_err"] <= RTOL)   # NaN fails too
            msg = (f"!!! WRONG RESULT {case.label} {_bs_short(bs)}: max relative error "
                   f"{rec['max_rel_err']:.3g} > {RTOL}")
        if not rec["ok"]:
            self.failures.append(msg)
            print(msg, flush=True)
        return rec


def _descend(bench, case, axes: dict, deadline: float, block_sizes=qm.BlockSizes) -> None:
    """Coordinate descent from the best config so far, one axis at a time (`block_sizes`: the
    kernel's tiling class; `case.best()` and `bench.run(case, tiling)` as here)."""
    for name, values in axes.items():
        for value in values:
            if time.perf_counter() > deadline:
                return
            best = case.best()
            if best is None:
                return
            start = block_sizes(**best["block_sizes"])
            if not hasattr(start, name):
                continue
            bench.run(case, dataclasses.replace(start, **{name: value}))


def _carry_over(bench: Bench, case: Case, source: Case | None, deadline: float,
                split_variants: bool) -> None:
    """Run the best configs of `source` on `case` (and split_k variants of the best)."""
    if source is None:
        return
    tops = [qm.BlockSizes(**c["block_sizes"]) for c in source.ok_configs()[:TOP]]
    if split_variants and tops:
        tops += [dataclasses.replace(tops[0], split_k=s) for s in AXES["split_k"]]
    for bs in tops:
        if time.perf_counter() > deadline:
            return
        bench.run(case, bs)


def _default(qtype: T, shape_name: str, n: int, k: int, m: int,
             tuned: qm.BlockSizes | None = None) -> qm.BlockSizes:
    """The engine's tiling of this case, from the type's tuned tile or from `tuned`."""
    if shape_name == GLU_SHAPE:
        return qm.glu_block_sizes(qtype, n, k, m, tuned)
    return qm.BlockSizes.get_default(qtype, n, k, m, tuned)


def _case_record(case: Case) -> dict:
    best = case.best()
    default = next((c for c in case.configs
                    if c["block_sizes"] == _bs_dict(_default(case.qtype, case.shape_name,
                                                             case.n_rows, case.n_cols,
                                                             case.m_rows))), None)
    return dict(type=case.qtype.name, shape=case.shape_name, n=case.n_rows, k=case.n_cols,
                m=case.m_rows, weight_bytes=case.weight_bytes, gguf_bytes=int(case.w_data.nbytes),
                copies=len(case.packs), same_size_read_gbps=case.read_gbps,
                best=best, default=default, xla=case.xla, configs=case.configs)


def _table(res: dict) -> str:
    legend = "/".join(f.name for f in dataclasses.fields(qm.BlockSizes))
    head = (f"{'type':<5} {'shape':<7} {'N x K':<12} {'M':>1} {'best us':>8} {'GB/s':>6} {'%HBM':>5} "
            f"{'%read':>5} {'default us':>10} {'XLA us':>8} {'x XLA':>6}  {'best BlockSizes':<22}"
            " check")
    lines = [f"BlockSizes: {legend}; %read: best GB/s against an XLA read of the same bytes;"
             " x XLA: XLA time / best time; check: best config correct, and how many others"
             " were wrong or failed to run", head]
    for r in res["results"]:
        best, default, xla = r["best"], r["default"], r["xla"]
        us = lambda c: f"{c['time_s'] * 1e6:.1f}" if c and "time_s" in c else "-"
        speed = (f"{xla['time_s'] / best['time_s']:.2f}" if best and "time_s" in xla else "-")
        wrong = sum(1 for c in r["configs"] if c.get("ok") is False)
        broken = sum(1 for c in r["configs"] if "error" in c)
        check = ("ok" if best else "FAIL") + (f", {wrong} wrong" if wrong else "") + (
            f", {broken} errors" if broken else "")
        lines.append(
            f"{r['type']:<5} {r['shape']:<7} {r['n']}x{r['k']:<7} {r['m']:>1} {us(best):>8} "
            f"{best['gbps'] if best else 0:>6.0f} {best['pct_hbm'] if best else 0:>5.1f} "
            f"{100 * best['gbps'] / r['same_size_read_gbps'] if best else 0:>5.1f} "
            f"{us(default):>10} {us(xla):>8} {speed:>6}  "
            f"{_bs_short(best['block_sizes']) if best else '-':<22} {check}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", help="comma-separated GGML type names (default: SUPPORTED_TYPES)")
    p.add_argument("--quick", action="store_true", help="default BlockSizes only, no sweep")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of this script: interpret mode, tiny shapes, tiny sweep")
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 7; smoke 2)")
    p.add_argument("--unroll", type=int, default=None,
                   help="kernel calls per jitted program, each on its own x (default 8; smoke 2)")
    p.add_argument("--budget_s", type=float, default=200.0,
                   help="wall-time budget; once spent, only defaults run (default 200)")
    p.add_argument("--shapes", help="comma-separated shape names of " + ", ".join(SHAPES_70B)
                   + " (default: all; the sweep shape gate/up is always kept)")
    p.add_argument("--model", choices=("70b", "8b"), default="70b",
                   help="matrix shapes of Llama-3 70B (default) or 8B")
    p.add_argument("--descend", default=SWEEP_SHAPE,
                   help="comma-separated shapes that get their own M = 1 coordinate descent, after"
                   " the carry-over (default: gate/up only)")
    p.add_argument("--descend_m8", action="store_true",
                   help="also run the coordinate descent at M = 8 (default: carry-over only)")
    p.add_argument("--no_fuse_x", action="store_true",
                   help="defaults with x quantized by XLA before each launch (qmatvec.FUSE_X off)")
    p.add_argument("--fuse_x_rows", type=int, default=None,
                   help="set qmatvec.FUSE_X_MAX_ROWS: the most x rows the kernel quantizes itself")
    p.add_argument("--warmup_s", type=float, default=None,
                   help="seconds each config runs untimed first, so the SM clock is up after the"
                   " compile (default 0.15; smoke 0)")
    p.add_argument("--copies", type=int, default=0,
                   help="copies of each weight the unrolled launches read in turn (default 0:"
                   " enough to add up to ROTATION_BYTES; 1: every launch reads one weight)")
    p.add_argument("--shape_tiles", choices=("on", "off"), default="on",
                   help="qmatvec.SHAPE_TILES: the defaults take the per-shape tiles (default on)")
    p.add_argument("--prefetch", action="store_true",
                   help="set qmatvec.PREFETCH: the default tiles load one chunk ahead")
    p.add_argument("--m", default=",".join(map(str, M_ROWS)),
                   help="comma-separated x row counts (default 1,8; the first gets the descent)")
    p.add_argument("--candidates", default="",
                   help="comma-separated tiles block_n/block_k/num_warps/num_stages, each run on"
                   " every case after its default as the engine would fit it to the shape"
                   " (qmatvec.BlockSizes.get_default(..., tuned=tile): its K-split, the glu"
                   " kernel's halved row tile)")
    p.add_argument("--seed", type=int, default=0)
    default_out = os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else None
    p.add_argument("--out", default=default_out, help="JSON file (default $OUT/kernels.json)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 7)
    args.unroll = args.unroll or (2 if args.smoke else 8)
    args.warmup_s = (0.0 if args.smoke else 0.15) if args.warmup_s is None else args.warmup_s
    try:
        args.m = tuple(int(v) for v in args.m.split(","))
        args.candidates = [qm.BlockSizes(**dict(zip(
            ("block_n", "block_k", "num_warps", "num_stages"), map(int, c.split("/")),
            strict=True))) for c in args.candidates.split(",") if c.strip()]
    except (TypeError, ValueError) as err:
        p.error(f"--m or --candidates: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m_rows = args.m
    if args.no_fuse_x:
        qm.FUSE_X = False
    if args.fuse_x_rows is not None:
        qm.FUSE_X_MAX_ROWS = args.fuse_x_rows
    if args.prefetch:
        qm.PREFETCH = True
    qm.SHAPE_TILES = args.shape_tiles == "on"
    t_start = time.perf_counter()
    types = sorted(qm.SUPPORTED_TYPES, key=lambda t: t.name)
    if args.types:
        try:
            types = [T[name.strip()] for name in args.types.split(",")]
        except KeyError as err:
            raise SystemExit(f"--types: {err} is not a GGML type name") from None
    model_shapes = SHAPES_8B if args.model == "8b" else SHAPES_70B
    shapes, axes = (SMOKE_SHAPES, SMOKE_AXES) if args.smoke else (model_shapes, AXES)
    if args.shapes and not args.smoke:
        names = [n.strip() for n in args.shapes.split(",")]
        unknown = [n for n in names if n not in model_shapes]
        if unknown:
            raise SystemExit(f"--shapes: {unknown[0]!r} is not one of {', '.join(model_shapes)}")
        shapes = {n: v for n, v in model_shapes.items() if n in names or n == SWEEP_SHAPE}
    sweep_shape = next(iter(shapes)) if args.smoke else SWEEP_SHAPE
    descend = [n.strip() for n in args.descend.split(",")]
    unknown = [n for n in descend if n not in model_shapes and not args.smoke]
    if unknown:
        raise SystemExit(f"--descend: {unknown[0]!r} is not one of {', '.join(model_shapes)}")
    dev = jax.devices()[0]
    ceiling = hbm_read_gbps(64 << 20 if args.smoke else 4 << 30)
    res: dict[str, Any] = dict(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__,
                               model=args.model,
                               card=dev.device_kind, backend=jax.default_backend(),
                               interpret=args.smoke, hbm_read_gbps=ceiling, rtol=RTOL,
                               budget_s=args.budget_s, unroll=args.unroll, repeats=args.repeats,
                               fuse_x=qm.FUSE_X, fuse_x_max_rows=qm.FUSE_X_MAX_ROWS,
                               prefetch=qm.PREFETCH, shape_tiles=qm.SHAPE_TILES,
                               warmup_s=args.warmup_s,
                               types=[t.name for t in types])
    print(f"{dev.device_kind} jax {jax.__version__}: HBM read ceiling {ceiling:.0f} GB/s", flush=True)
    bench = Bench(args, ceiling)
    rng = np.random.default_rng(args.seed)

    # 1. Weights, XLA baseline and the default tiling of every case.
    cases: dict[tuple[T, str, int], Case] = {}
    for qtype in types:
        for shape_name, (n, k) in shapes.items():
            try:
                w_host = random_weight(rng, qtype, n, k)
                w_data = jax.device_put(w_host)
                packed = jax.block_until_ready(qm.repack(w_data, qtype, k))
                nbytes = sum(int(a.nbytes) for a in packed)
                n_copies = args.copies or min(args.unroll, -(-ROTATION_BYTES // nbytes))
                packs = [packed] + [jax.block_until_ready(tuple(jnp.array(a, copy=True)
                                                                for a in packed))
                                    for _ in range(n_copies - 1)]
                read = same_size_read_gbps(nbytes, n_copies, args.unroll, args.repeats)
                defaults = {m: _default(qtype, shape_name, n, k, m) for m in m_rows}
            except Exception as err:  # noqa: BLE001 - one type must not end the run
                msg = f"!!! {qtype.name} {n}x{k}: cannot build the weight: {_one_line(err)}"
                bench.failures.append(msg)
                print(msg, flush=True)
                continue
            del w_host
            for m in m_rows:
                case = Case(qtype, shape_name, n, k, m, w_data, packs, rng, args.unroll)
                case.read_gbps = read
                bench.reference(case)
                bench.run(case, defaults[m])
                cases[qtype, shape_name, m] = case
            print(f"{qtype.name} {n}x{k}: defaults done ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)

    # 1b. Candidate tiles on every case (the glu kernel's with split_k 1).
    for case in cases.values():
        for bs in args.candidates:
            if time.perf_counter() - t_start > args.budget_s:
                break
            try:
                tile = _default(case.qtype, case.shape_name, case.n_rows, case.n_cols,
                                case.m_rows, bs)
            except InputError:
                continue
            bench.run(case, tile)
    if args.candidates:
        print(f"candidates done ({time.perf_counter() - t_start:.0f} s, {bench.n_timed} configs"
              " timed)", flush=True)

    # 2-3. The sweep, each type getting an equal share of what is left of the budget.
    if not args.quick:
        for i, qtype in enumerate(types):
            left = args.budget_s - (time.perf_counter() - t_start)
            share = max(0.0, left) / (len(types) - i)
            deadline = time.perf_counter() + share
            big = {m: cases.get((qtype, sweep_shape, m)) for m in m_rows}
            if big[m_rows[0]] is not None:   # with --descend_m8, M = 1 gets 45% of the share
                _descend(bench, big[m_rows[0]], axes,
                         time.perf_counter() + share * 0.45 if args.descend_m8 else deadline)
            for m in m_rows[1:]:
                if big[m] is not None:
                    _carry_over(bench, big[m], big[m_rows[0]], deadline, split_variants=False)
                    if args.descend_m8:
                        _descend(bench, big[m], axes, deadline - share * 0.2)
            for shape_name in shapes:
                for m in m_rows:
                    case = cases.get((qtype, shape_name, m))
                    if shape_name != sweep_shape and case is not None:
                        _carry_over(bench, case, big[m], deadline, split_variants=True)
            own = [n for n in descend if n in shapes and n != sweep_shape]
            for j, shape_name in enumerate(own):   # equal shares of what is left
                case = cases.get((qtype, shape_name, m_rows[0]))
                if case is not None:
                    now = time.perf_counter()
                    _descend(bench, case, axes, now + max(0.0, deadline - now) / (len(own) - j))
            print(f"{qtype.name}: sweep done ({time.perf_counter() - t_start:.0f} s, "
                  f"{bench.n_timed} configs timed)", flush=True)

    # The ceiling again, after the kernels have run (the card warm); the better of the two counts.
    end = hbm_read_gbps(64 << 20 if args.smoke else 4 << 30)
    res["hbm_read_gbps_start"], res["hbm_read_gbps_end"] = ceiling, end
    if end > ceiling:
        ceiling = bench.ceiling = res["hbm_read_gbps"] = end
        for case in cases.values():
            for rec in case.configs:
                if "time_s" in rec:
                    rec["gbps"], rec["pct_hbm"] = bench.gbps(case.weight_bytes, rec["time_s"])
    res["results"] = [_case_record(c) for c in cases.values()]
    for r in res["results"]:
        where = f"{r['type']} {r['n']}x{r['k']} M={r['m']}"
        if r["default"] is None or "error" in r["default"]:
            bench.failures.append(f"!!! {where}: the default BlockSizes did not run")
        if r["best"] is None:
            bench.failures.append(f"!!! {where}: no config ran correctly")
    res["failures"] = bench.failures
    res["configs_timed"] = bench.n_timed
    res["elapsed_s"] = time.perf_counter() - t_start
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if bench.failures:
        print(f"\n!!! {len(bench.failures)} FAILURES:\n" + "\n".join(bench.failures))
    print(f"\n{res['card']} jax {res['jax']}, HBM read ceiling {ceiling:.0f} GB/s (start"
          f" {res['hbm_read_gbps_start']:.0f}, end {end:.0f}), "
          f"{bench.n_timed} configs timed in {res['elapsed_s']:.0f} s"
          + (" (interpret mode: timings mean nothing)" if args.smoke else ""))
    print(_table(res))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
