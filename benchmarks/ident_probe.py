"""Which placements give bit-identical logits on this device (kernels on): the resident stacked
path against the layered path (all VRAM, mixed A/B/C with disk layers repacked on the device),
over several random inputs, decode-sized (5 ids) and prefill (40 ids). Run with and without
XLA_FLAGS=--xla_gpu_deterministic_ops=true."""
import os
import numpy as np
import ntransformer_jax as nt
from ntransformer_jax import synth

path = "/tmp/six.gguf"
if not os.path.exists(path):
    synth.write_synthetic(path, synth.SynthShape(n_layers=6, n_embd=256, n_ff=512, n_head=4, n_kv_head=2,
                                                 n_vocab=512, ctx_len=256), "Q4_K_M", seed=3)
engines = {name: nt.load(path, ctx_size=64, **opts) for name, opts in
           [("resident", {}), ("layered_vram", dict(max_vram_layers=6)),
            ("mixed", dict(max_vram_layers=2, max_ram_layers=2))]}
rng = np.random.default_rng(1)
for n_ids in (5, 40):
    diffs = {k: [] for k in ("resident_again", "layered_vram", "mixed", "mixed_again")}
    for trial in range(8):
        ids = rng.integers(0, 512, n_ids)
        r = engines["resident"].logits(ids)
        m = engines["mixed"].logits(ids)
        for k, v in (("resident_again", engines["resident"].logits(ids)), ("layered_vram", engines["layered_vram"].logits(ids)),
                     ("mixed", m), ("mixed_again", engines["mixed"].logits(ids) - m + r)):
            diffs[k].append(float(np.abs(v - r).max()))
    print(os.environ.get("XLA_FLAGS", "default"), n_ids, {k: f"{sum(d == 0 for d in v)}/8 max {max(v):.1e}" for k, v in diffs.items()}, flush=True)
