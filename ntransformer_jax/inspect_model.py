"""Inspecting a GGUF model without loading it: config, sizes, tensor types, tokenizer, the tier
plan the engine would make, and the token time that plan implies under bandwidth ceilings.

    python -m ntransformer_jax inspect --model model.gguf --max_vram_layers 40 [--json]

    report = inspect("model.gguf", max_vram_layers=40)   # a JSON-ready dict
    print(format_report(report))

Nothing is copied to the device: the file's header is parsed (the tensor bytes stay in the memory
map, unread) and the placement comes from `plan_for`, the function the engine places weights with.
"""

from __future__ import annotations

import collections
import dataclasses
import os

from ntransformer_jax.chat import KEY_CHAT_TEMPLATE
from ntransformer_jax.errors import InputError
from ntransformer_jax.model_file import ModelFile
from ntransformer_jax.placement import is_layered, plan_for
from ntransformer_jax.tiers import Plan, TierOptions, available_ram
from ntransformer_jax.tokenizer import KEY_MODEL, KEY_PRE, KEY_TOKENS

UNLIMITED = 1 << 61     # budgets at or above this are "unknown free memory" (plan_placement's 1 << 62)
TIER_LETTERS = {"vram": "A", "ram": "B", "disk": "C"}
TOKENIZER_KINDS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Bandwidth ceilings in bytes/s; defaults are the H100 figures of DESIGN.md."""

    hbm: float = 2.8e12       # device memory read
    pcie: float = 53.8e9      # pinned host -> device
    disk: float = 1.5e9       # cold disk read

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not v > 0:
                raise InputError(f"{f.name} bandwidth {v} must be positive")


def _budget(b: int) -> int | None:
    return None if b >= UNLIMITED else int(b)


def token_bound(f: ModelFile, plan: Plan, ceilings: Ceilings = Ceilings()) -> dict:
    """The decode time per token that the bandwidth ceilings allow for `plan` (batch 1).

    Per token the device reads every layer (resident, or copied into a slot) and the output head
    from its memory; tier B and C layers cross PCIe (C via pinned staging); tier C layers are
    read from disk. With copies overlapping compute, the token takes at least the slowest of the
    three. KV cache reads, which grow with the position, are left out.
    """
    cfg = f.config
    head = f.tensor("token_embd.weight" if cfg.tied_output else "output.weight").n_bytes
    hbm = sum(plan.layer_bytes) + head + f.tensor("output_norm.weight").n_bytes
    pcie = plan.bytes_in("ram") + plan.bytes_in("disk")
    disk = plan.bytes_in("disk")
    times = {"hbm": hbm / ceilings.hbm, "pcie": pcie / ceilings.pcie, "disk": disk / ceilings.disk}
    limit = max(times, key=times.get)
    return {
        "ceilings_bps": dataclasses.asdict(ceilings),
        "hbm_bytes": hbm, "pcie_bytes": pcie, "disk_bytes": disk,
        "hbm_s": times["hbm"], "pcie_s": times["pcie"], "disk_s": times["disk"],
        "token_s": times[limit], "tok_per_s": 1.0 / times[limit], "limited_by": limit,
    }


def report(f: ModelFile, plan: Plan, *, ctx_size: int, options: TierOptions,
           ceilings: Ceilings = Ceilings()) -> dict:
    """Everything `inspect` prints, as one JSON-ready dict."""
    cfg, md = f.config, f.metadata
    types: dict[str, dict] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for t in f.tensors.values():
        types[t.qtype.name]["count"] += 1
        types[t.qtype.name]["bytes"] += t.n_bytes
    template = md.get(KEY_CHAT_TEMPLATE)
    tokens = md.get(KEY_TOKENS)
    return {
        "path": f.path,
        "architecture": cfg.architecture,
        "name": md.get("general.name"),
        "file_bytes": os.path.getsize(f.path),
        "weight_bytes": sum(t.n_bytes for t in f.tensors.values()),
        "n_tensors": len(f.tensors),
        "config": {
            "n_layers": cfg.n_layers, "n_embd": cfg.n_embd, "n_ff": cfg.n_ff,
            "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "rope_base": cfg.rope_base, "rope_dims": cfg.n_rot, "rope_freq_scale": cfg.rope_freq_scale,
            "rope_freq_factors": cfg.has_rope_freqs, "ctx_train": cfg.ctx_train,
            "n_vocab": cfg.n_vocab, "rms_eps": cfg.rms_eps, "tied_output": cfg.tied_output,
        },
        "ctx_size": ctx_size,
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "tokenizer": {
            "kind": md.get(KEY_MODEL), "pre": md.get(KEY_PRE),
            "n_tokens": len(tokens) if isinstance(tokens, list) else None,
            "chat_template": isinstance(template, str) and bool(template),
        },
        "plan": {
            "path": "layered" if is_layered(plan, options) else "resident",
            "streaming": options.streaming,
            "prefetch_depth": options.prefetch_depth,
            "placement": list(plan.tiers),
            "tiers": {t: {"layers": plan.count(t), "bytes": plan.bytes_in(t)} for t in TIER_LETTERS},
            "device_working_set": dict(plan.device_working_set),
            "host_working_set": dict(plan.host_working_set),
            "device_bytes": plan.device_bytes, "host_bytes": plan.host_bytes,
            "vram_budget": _budget(plan.vram_budget), "ram_budget": _budget(plan.ram_budget),
        },
        "token_bound": token_bound(f, plan, ceilings),
    }


def inspect(path: str | os.PathLike[str], *, ctx_size: int | None = None,
            ceilings: Ceilings = Ceilings(), free_vram: int | None = None,
            avail_ram: int | None = None, kernels: str = "auto", **tier_options) -> dict:
    """Open `path`, plan its placement as `ntransformer_jax.load` would, and report.

    Args:
      path: the .gguf file.
      ctx_size: context length; default as `load` (min(training context, 4096)).
      ceilings: bandwidths for the token-time bound.
      free_vram / avail_ram: free device memory and available RAM in bytes. Default: measured,
        device memory only when no vram_budget_gb is given (it starts the JAX backend).
      kernels: as for `load`: "auto" (on where JAX's default backend is a GPU), "on", "off";
        with the kernels, matrices are planned at their repacked size.
      **tier_options: as for `load` (vram_budget_gb, max_vram_layers, streaming, ...).
    Returns:
      The report dict (see `report`).
    Raises:
      NTransformerError: the file or an option is unusable.
    """
    from ntransformer_jax import engine   # at call time: the engine may import this module
    unknown = sorted(set(tier_options) - {f.name for f in dataclasses.fields(TierOptions)})
    if unknown:
        raise InputError(f"unknown load option {unknown[0]!r}")
    options = TierOptions(**{k: v for k, v in tier_options.items() if v is not None})
    f = ModelFile(path)
    try:
        if not ctx_size:
            ctx_size = min(f.config.ctx_train, engine.DEFAULT_CTX)
        if ctx_size < 1:
            raise InputError(f"ctx_size={ctx_size} must be positive")
        if free_vram is None and options.vram_budget_gb is None:
            import jax
            from ntransformer_jax.tiers import free_device_memory
            free_vram = free_device_memory(jax.devices()[0])
        if avail_ram is None and options.ram_budget_gb is None:
            avail_ram = available_ram()
        if kernels not in ("auto", "on", "off"):
            raise InputError(f"kernels={kernels!r} must be one of auto, on, off")
        if kernels == "auto":
            import jax
            packed = jax.default_backend() == "gpu"
        else:
            packed = kernels == "on"
        plan = plan_for(f, ctx_size, options, free_vram, avail_ram,
                        prefill_chunk=engine.MAX_PREFILL_CHUNK, packed=packed)
        return report(f, plan, ctx_size=ctx_size, options=options, ceilings=ceilings)
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def _size(b: float | None) -> str:
    if b is None:
        return "unlimited"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def _seconds(s: float) -> str:
    if s == 0:
        return "0"
    return f"{s * 1e3:.2f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def format_report(r: dict) -> str:
    """The report as text for a terminal."""
    c, tok, p, b = r["config"], r["tokenizer"], r["plan"], r["token_bound"]
    lines = [f"{os.path.basename(r['path'])}" + (f" ({r['name']})" if r["name"] else ""),
             f"  file {_size(r['file_bytes'])}, weights {_size(r['weight_bytes'])} in {r['n_tensors']} tensors",
             f"architecture: {r['architecture']}",
             f"  layers {c['n_layers']}, embedding {c['n_embd']}, feed-forward {c['n_ff']}",
             f"  heads {c['n_head']}, KV heads {c['n_kv_head']} (GQA {c['n_head'] // c['n_kv_head']}), "
             f"head dim {c['head_dim']}",
             f"  rope base {c['rope_base']:g}, dims {c['rope_dims']}, freq factors "
             f"{'present' if c['rope_freq_factors'] else 'absent'}"
             + (f", linear scale 1/{1 / c['rope_freq_scale']:g}" if c["rope_freq_scale"] != 1 else ""),
             f"  context {c['ctx_train']} (training), {r['ctx_size']} (this run); vocabulary {c['n_vocab']}; "
             f"output {'tied to the embedding' if c['tied_output'] else 'untied'}; rms eps {c['rms_eps']:g}",
             "tensor types:"]
    for name, t in r["tensor_types"].items():
        lines.append(f"  {name:<6} {t['count']:>5} tensors {_size(t['bytes']):>11}")
    kind = tok["kind"] or "none"
    lines += ["tokenizer:",
              f"  {kind}" + (f" ({TOKENIZER_KINDS[kind]})" if kind in TOKENIZER_KINDS else "")
              + f", pre-tokenizer {tok['pre'] or 'default'}"
              + (f", {tok['n_tokens']} tokens" if tok["n_tokens"] is not None else ""),
              f"  chat template: {'present' if tok['chat_template'] else 'absent'}"]
    lines.append(f"tier plan: {p['path']} path, streaming {p['streaming']}, prefetch depth {p['prefetch_depth']}")
    for tier, letter in TIER_LETTERS.items():
        t = p["tiers"][tier]
        lines.append(f"  {letter} {tier:<4} {t['layers']:>4} layers {_size(t['bytes']):>11}")
    lines.append("  placement: " + "".join(TIER_LETTERS[t] for t in p["placement"]))
    parts = lambda tier, ws: " + ".join(f"{k} {_size(v)}" for k, v in
                                        {f"tier {TIER_LETTERS[tier]}": p["tiers"][tier]["bytes"], **ws}.items())
    lines.append(f"  device: {_size(p['device_bytes'])} of budget {_size(p['vram_budget'])} = "
                 + parts("vram", p["device_working_set"]))
    lines.append(f"  host:   {_size(p['host_bytes'])} of budget {_size(p['ram_budget'])} = "
                 + parts("ram", p["host_working_set"]))
    if p["vram_budget"] is None:
        lines.append("  (device memory unknown: pass --vram_budget_gb for a real plan)")
    ceil = b["ceilings_bps"]
    lines += [f"token time bound (batch 1; HBM {ceil['hbm'] / 1e9:g} GB/s, PCIe {ceil['pcie'] / 1e9:g} GB/s, "
              f"disk {ceil['disk'] / 1e9:g} GB/s):",
              f"  HBM  {_size(b['hbm_bytes']):>11}/token -> {_seconds(b['hbm_s'])}",
              f"  PCIe {_size(b['pcie_bytes']):>11}/token -> {_seconds(b['pcie_s'])} (tiers B and C)",
              f"  disk {_size(b['disk_bytes']):>11}/token -> {_seconds(b['disk_s'])} (tier C)",
              f"  at best {_seconds(b['token_s'])}/token = {b['tok_per_s']:.{1 if b['tok_per_s'] >= 10 else 2}f} tok/s, "
              f"limited by {b['limited_by']}"]
    return "\n".join(lines)
