"""Offline sm_90 SASS of the prefill kernel `qmatmul_packed`: which MMA it uses, and what the
dequantize costs per weight value. No GPU needed (CPU jax is enough).

    pip download --no-deps triton -d /tmp/tritonwheel
    pip install --no-deps --target /tmp/tritonpkg /tmp/tritonwheel/triton-*.whl
    python benchmarks/qmatmul_sass.py [--triton /tmp/tritonpkg] [--out /tmp/qmatmul_sass]
        [--configs q4_0:64:64:128:4:3,q8_0:128:64:128:8:3] [--m 512 --n 1024 --k 8192]

How. For each config (qtype:block_m:block_n:block_k:num_warps:num_stages) the wrapper is lowered
with `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` while
`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module` is wrapped to keep the Triton
module it returns (`get_asm()`: TTIR). The TTIR goes to a child process (PYTHONPATH = the
triton wheel; its LLVM is kept apart from jaxlib's), which runs
`triton.compile(file.ttir, target=GPUTarget("cuda", 90, 32), options=dict(num_warps, num_stages))`
and writes the TTGIR, PTX and cubin; `cuobjdump -sass` from the wheel's backends/nvidia/bin
disassembles it. The parent then finds the K loop (the backward branch whose body holds the MMA
instructions), counts its SASS opcodes by class and divides by block_n * block_k (the weight
values one iteration consumes). Everything goes to --out: *.ttir, *.ttgir, *.ptx, *.sass, and
summary.json. Every warp runs the loop body, so the SM issues loop * num_warps warp instructions
per iteration (at most 4 per clock: `issue_clk`), i.e. loop * num_warps * 32 / (block_n * block_k)
thread instructions per weight value (`thread_instr_per_value`); `tensor_clk` is the iteration's
2 * block_m * block_n * block_k FLOP at 4096 bf16 FLOP/clock/SM (H100/H200 dense peak). `--fold_acc` (experiment) rewrites the TTIR so each dot takes the
loop accumulator instead of `acc + dot(x, w, 0)` and writes summary_foldacc.json.

Found (triton 3.9.0 wheel, jax 0.10.2): every config lowers to wgmma (HGMMA.64x64x16, both operands
from shared memory; the dequantized tile is stored with STS first), waited with pendings=0 after
each plane's dot; ~5.0 (Q4_0) / ~6.5 (Q8_0) thread instructions of dequant per weight value.

Caveat: jaxlib compiles Pallas kernels with XLA's bundled Triton, whose pass pipeline can differ
from the wheel's; this is the wheel's (upstream) code generation for the same TTIR.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASSES = {
    "mma": ("HGMMA", "HMMA", "WARPGROUP", "WARPSYNC"),
    "load_global": ("LDG", "LDGSTS", "LDGDEPBAR", "UTMALDG"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "dequant_int": ("LOP3", "LOP", "SHF", "PRMT", "IMAD", "IADD3", "SEL", "ISETP", "LEA"),
    "convert": ("I2F", "F2F", "F2FP", "I2FP", "F2I"),
    "float": ("FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2", "FSEL"),
    "move": ("MOV", "UMOV", "S2R", "S2UR", "CS2R", "R2UR", "SHFL"),
    "sync": ("BAR", "DEPBAR", "SYNCS", "ARRIVES", "FENCE", "MEMBAR", "ERRBAR", "CCTL"),
    "control": ("BRA", "EXIT", "NOP", "BSSY", "BSYNC", "YIELD", "WARPSYNC", "VOTE", "PLOP3",
                "ISETP"),
}


def op_class(op: str) -> str:
    base = op.split(".")[0]
    for cls, names in CLASSES.items():
        if base in names:
            return cls
    return "other"


# ---------------------------------------------------------------------------------------------
# Parent: lower to TTIR.
# ---------------------------------------------------------------------------------------------

def lower_ttir(qtype_name: str, m: int, n: int, k: int, bs, kernel: str = "qmatmul") -> str:
    import gguf
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    from ntransformer_jax.kernels import qmatmul as qmm
    from ntransformer_jax.kernels import qmatvec as qm

    qtype = gguf.GGMLQuantizationType[qtype_name.upper()]
    captured = []
    orig = lowering.lower_jaxpr_to_triton_module

    def wrapped(*a, **kw):
        res = orig(*a, **kw)
        captured.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    lowering.lower_jaxpr_to_triton_module = wrapped
    try:
        if kernel == "qmatvec":
            f = functools.partial(qm.qmatvec_packed, qtype=qtype, n_cols=k, block_sizes=bs)
            x = jax.ShapeDtypeStruct((m, k), jnp.float32)
        else:
            f = functools.partial(qmm.qmatmul_packed, qtype=qtype, n_cols=k, block_sizes=bs,
                                  dtype=jnp.bfloat16)
            x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        packed = tuple(qm.packed_shapes(qtype, n, k))
        jax.jit(f).trace(x, packed).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = orig
    if len(captured) != 1:
        raise RuntimeError(f"expected one Triton module, captured {len(captured)}")
    return captured[0]


def fold_acc(ttir: str) -> str:
    """Experiment: `%y = tt.dot %a, %b, %zero` + `%s = arith.addf %acc, %y` -> `%s = tt.dot %a,
    %b, %acc` (the accumulator fed to the MMA instead of a separate float add)."""
    lines = ttir.splitlines()
    out, i, n = [], 0, 0
    while i < len(lines):
        dot = re.match(r"(\s*)(%[\w#]+) = tt\.dot (%[\w#]+), (%[\w#]+), (%[\w#]+)(.*)$", lines[i])
        add = i + 1 < len(lines) and dot and re.match(
            r"\s*(%[\w#]+) = arith\.addf (%[\w#]+), " + re.escape(dot.group(2)) + r"\s*:", lines[i + 1])
        if add:
            out.append(f"{dot.group(1)}{add.group(1)} = tt.dot {dot.group(3)}, {dot.group(4)},"
                       f" {add.group(2)}{dot.group(6)}")
            i, n = i + 2, n + 1
            continue
        out.append(lines[i])
        i += 1
    if not n:
        raise RuntimeError("fold_acc: no dot + addf pair found")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Child: compile with the triton wheel.
# ---------------------------------------------------------------------------------------------

def child_compile(ttir_path: str, num_warps: int, num_stages: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(ttir_path, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    stem = ttir_path[:-len(".ttir")]
    for key, ext in (("ttgir", "ttgir"), ("llir", "ll"), ("ptx", "ptx")):
        if key in compiled.asm:
            with open(f"{stem}.{ext}", "w") as fh:
                fh.write(compiled.asm[key])
    with open(f"{stem}.cubin", "wb") as fh:
        fh.write(compiled.asm["cubin"])
    md = compiled.metadata
    meta = {k: getattr(md, k) for k in ("shared", "num_warps", "num_stages", "name")
            if hasattr(md, k)}
    meta["triton"] = triton.__version__
    with open(f"{stem}.meta.json", "w") as fh:
        json.dump(meta, fh, default=str)


# ---------------------------------------------------------------------------------------------
# SASS analysis.
# ---------------------------------------------------------------------------------------------

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    out = []
    for line in text.splitlines():
        mt = LINE.search(line)
        if mt:
            out.append((int(mt.group(1), 16), mt.group(3), mt.group(4)))
    return out


def loops(ins: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(start index, end index) of every backward branch's body, innermost first by size."""
    addr = {a: i for i, (a, _, _) in enumerate(ins)}
    res = []
    for i, (a, op, args) in enumerate(ins):
        if op.startswith("BRA"):
            mt = re.search(r"0x([0-9a-f]+)", args)
            if mt and int(mt.group(1), 16) <= a and int(mt.group(1), 16) in addr:
                res.append((addr[int(mt.group(1), 16)], i))
    return sorted(res, key=lambda r: r[1] - r[0])


def analyse(sass: str, ptx: str, bs, loop_ops=("HGMMA", "HMMA")) -> dict:
    """Counts of the kernel and of its K loop: the innermost backward branch whose body holds
    one of `loop_ops` (the MMA for qmatmul, the global loads for qmatvec)."""
    ins = parse_sass(sass)
    total = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    mma_ops = ("HGMMA", "HMMA")
    body = None
    for s, e in loops(ins):
        if any(op.split(".")[0] in loop_ops for _, op, _ in ins[s:e + 1]):
            body = (s, e)
            break
    res = dict(sass_total=len(ins),
               kernel_hgmma=total["HGMMA"], kernel_hmma=total["HMMA"],
               ptx_wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
               ptx_mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
               ptx_ldmatrix=len(re.findall(r"\bldmatrix", ptx)),
               ptx_cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
               ptx_cp_async_bulk=len(re.findall(r"\bcp\.async\.bulk", ptx)),
               ptx_st_shared=len(re.findall(r"\bst\.shared", ptx)),
               ptx_ld_shared=len(re.findall(r"\bld\.shared", ptx)))
    if body is None:
        res["loop"] = None
        return res
    s, e = body
    ops = [op for _, op, _ in ins[s:e + 1]]
    base = collections.Counter(op.split(".")[0] for op in ops)
    by_class = collections.Counter(op_class(op) for op in ops)
    values = bs.block_n * bs.block_k
    mma_full = collections.Counter(op for op in ops if op.split(".")[0] in mma_ops)
    res["loop"] = dict(
        start=hex(ins[s][0]), end=hex(ins[e][0]), instructions=len(ops),
        weight_values_per_iter=values, per_weight_value=len(ops) / values,
        by_class=dict(by_class.most_common()),
        by_class_per_value={c: v / values for c, v in by_class.most_common()},
        mma=dict(mma_full),
        opcodes=dict(base.most_common()),
        dequant_named=sum(base[o] for o in ("LOP3", "LOP", "SHF", "PRMT", "I2F", "I2FP", "FADD",
                                             "FMUL", "FFMA", "F2F", "F2FP")),
        loads=sum(base[o] for o in ("LDG", "LDS", "LDSM", "LDGSTS")),
        stores_shared=sum(base[o] for o in ("STS", "STSM")))
    res["loop"]["dequant_named_per_value"] = res["loop"]["dequant_named"] / values
    warps = bs.num_warps
    res["loop"].update(
        warp_instr_per_iter=len(ops) * warps,
        thread_instr_per_value=len(ops) * warps * 32 / values,
        dequant_named_thread_instr_per_value=res["loop"]["dequant_named"] * warps * 32 / values,
        issue_clk=len(ops) * warps / 4,
        dp4a=base["IDP"] + base["IDP4A"])
    if hasattr(bs, "block_m"):
        res["loop"]["tensor_clk"] = 2 * bs.block_m * values / 4096
        res["loop"]["tensor_over_issue"] = res["loop"]["tensor_clk"] / res["loop"]["issue_clk"]
    res["loop"]["loads_per_value"] = res["loop"]["loads"] / values
    return res


# ---------------------------------------------------------------------------------------------

def parse_config(text: str, kernel: str = "qmatmul"):
    """qmatmul: `qtype:block_m:block_n:block_k:num_warps:num_stages`; qmatvec:
    `qtype:block_n:block_k:num_warps:num_stages:int|float[:xla_x][:pf]` (`int_dot`; `xla_x`:
    fuse_x off, x quantized by the wrapper; `pf`: prefetch)."""
    if kernel == "qmatvec":
        from ntransformer_jax.kernels.qmatvec import BlockSizes as VecSizes
        q, bn, bk, nw, ns, path, *x = text.split(":")
        return q, VecSizes(block_n=int(bn), block_k=int(bk), num_warps=int(nw),
                           num_stages=int(ns), int_dot=path == "int", fuse_x="xla_x" not in x,
                           prefetch="pf" in x)
    from ntransformer_jax.kernels.qmatmul import BlockSizes
    q, bm, bn, bk, nw, ns = text.split(":")
    return q, BlockSizes(block_m=int(bm), block_n=int(bn), block_k=int(bk), num_warps=int(nw),
                         num_stages=int(ns))


SMS, CLOCK_GHZ = 132, 1.98   # H100 SXM / H200: SMs and boost clock, for the issue bound


def vec_metrics(loop: dict, bs, qname: str, n: int, k: int) -> dict:
    """qmatvec: weight bytes one loop iteration reads (the packed bytes of block_n x block_k
    values), thread instructions per byte, and the bandwidth at which the SMs' instruction
    issue (4 warp instructions a clock) would bind if nothing else did."""
    import gguf
    from ntransformer_jax.kernels import qmatvec as qm
    qtype = gguf.GGMLQuantizationType[qname.upper()]
    per_value = qm.packed_nbytes(qtype, n, k) / (n * k)
    nbytes = bs.block_n * bs.block_k * per_value
    return dict(bytes_per_iter=nbytes, thread_instr_per_byte=loop["warp_instr_per_iter"] * 32 / nbytes,
                issue_bound_gbps=nbytes / loop["issue_clk"] * SMS * CLOCK_GHZ)


VEC_CONFIGS = ",".join(f"{q}:{c}:{path}" for q in ("q4_0", "q8_0", "q4_1")
                       for c in ("32:512:8:3", "16:512:4:3") for path in ("int", "float"))
DEFAULT_CONFIGS = ",".join(f"{q}:{c}" for q in ("q4_0", "q8_0")
                           for c in ("64:64:128:4:3", "128:64:128:8:3", "256:64:128:8:3"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triton", default="/tmp/tritonpkg", help="--target dir of the triton wheel")
    p.add_argument("--out", default="/tmp/qmatmul_sass")
    p.add_argument("--configs", default=None, help="comma-separated configs (parse_config);"
                   " default: DEFAULT_CONFIGS, or VEC_CONFIGS with --kernel qmatvec")
    p.add_argument("--kernel", choices=("qmatmul", "qmatvec"), default="qmatmul")
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--n", type=int, default=1024, help="W rows (70B gate/up is 28672; any"
                   " multiple of block_n gives the same kernel body)")
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--fold_acc", action="store_true", help="experiment: rewrite the TTIR so"
                   " each dot takes the loop accumulator (no separate addf)")
    p.add_argument("--child", nargs=3, metavar=("TTIR", "WARPS", "STAGES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_compile(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0

    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    cuobjdump = os.path.join(args.triton, "triton", "backends", "nvidia", "bin", "cuobjdump")
    env = dict(os.environ, PYTHONPATH=args.triton, JAX_PLATFORMS="cpu")
    summary = []
    vec = args.kernel == "qmatvec"
    configs = args.configs or (VEC_CONFIGS if vec else DEFAULT_CONFIGS)
    for text in configs.split(","):
        qname, bs = parse_config(text, args.kernel)
        if vec:
            tag = (f"qmatvec_{qname}_m{args.m}_n{bs.block_n}_k{bs.block_k}_w{bs.num_warps}"
                   f"_s{bs.num_stages}_{'int' if bs.int_dot else 'float'}"
                   + ("" if bs.fuse_x else "_xlax") + ("_pf" if bs.prefetch else ""))
        else:
            tag = (f"{qname}_m{bs.block_m}_n{bs.block_n}_k{bs.block_k}_w{bs.num_warps}"
                   f"_s{bs.num_stages}" + ("_foldacc" if args.fold_acc else ""))
        stem = os.path.join(args.out, tag)
        rec = dict(config=tag, qtype=qname, block_sizes=dataclasses.asdict(bs), m=args.m, n=args.n, k=args.k)
        try:
            ttir = lower_ttir(qname, args.m, args.n, args.k, bs, args.kernel)
            if args.fold_acc:
                ttir = fold_acc(ttir)
            with open(stem + ".ttir", "w") as fh:
                fh.write(ttir)
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                stem + ".ttir", str(bs.num_warps), str(bs.num_stages)],
                               env=env, capture_output=True, text=True, timeout=600)
            if r.returncode:
                raise RuntimeError("triton.compile failed:\n" + r.stderr[-4000:])
            sass = subprocess.run([cuobjdump, "-sass", stem + ".cubin"], capture_output=True,
                                  text=True, check=True).stdout
            with open(stem + ".sass", "w") as fh:
                fh.write(sass)
            res_usage = subprocess.run([cuobjdump, "-res-usage", stem + ".cubin"],
                                       capture_output=True, text=True).stdout
            mt = re.search(r"REG:(\d+)", res_usage)
            rec["registers"] = int(mt.group(1)) if mt else None
            with open(stem + ".ptx") as fh:
                ptx = fh.read()
            with open(stem + ".meta.json") as fh:
                rec["meta"] = json.load(fh)
            ttgir = open(stem + ".ttgir").read() if os.path.exists(stem + ".ttgir") else ""
            rec["ttgir_mma"] = sorted(set(re.findall(r"#ttg\.nvidia_mma<\{[^}]*versionMajor = (\d)",
                                                     ttgir)))
            rec["ttgir_dot_ops"] = sorted(set(re.findall(r"\b(ttng\.warp_group_dot|tt\.dot)\b",
                                                         ttgir)))
            rec.update(analyse(sass, ptx, bs, ("LDG", "LDGSTS") if vec else ("HGMMA", "HMMA")))
            if vec and rec.get("loop"):
                rec["loop"].update(vec_metrics(rec["loop"], bs, qname, args.n, args.k))
        except Exception as e:  # noqa: BLE001 - report and go on
            rec["error"] = f"{type(e).__name__}: {e}"
        summary.append(rec)
        lp = rec.get("loop") or {}
        if vec:
            print(f"{tag}: " + (rec["error"][:2000] if "error" in rec else
                  f"loop {lp.get('instructions')} instr x {bs.num_warps} warps per"
                  f" {lp.get('bytes_per_iter', 0):.0f} weight bytes ="
                  f" {lp.get('thread_instr_per_byte', float('nan')):.2f} thread instr/byte;"
                  f" issue bound {lp.get('issue_bound_gbps', float('nan')):.0f} GB/s;"
                  f" dp4a {lp.get('dp4a')}; {rec.get('registers')} registers;"
                  f" classes {lp.get('by_class')}"), flush=True)
            continue
        print(f"{tag}: " + (rec["error"][:2000] if "error" in rec else
              f"ttgir mma v{rec['ttgir_mma']} {rec['ttgir_dot_ops']}; PTX wgmma {rec['ptx_wgmma']}"
              f" mma.sync {rec['ptx_mma_sync']}; SASS HGMMA {rec['kernel_hgmma']} HMMA"
              f" {rec['kernel_hmma']}; loop {lp.get('instructions')} instr ="
              f" {lp.get('per_weight_value', float('nan')):.3f}/value ="
              f" {lp.get('thread_instr_per_value', float('nan')):.2f} thread instr/value;"
              f" issue {lp.get('issue_clk')} clk vs tensor {lp.get('tensor_clk')} clk;"
              f" mma {lp.get('mma')},"
              f" classes {lp.get('by_class')}"), flush=True)
    name = "summary_foldacc.json" if args.fold_acc else "summary.json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
