"""Plot tok/s against the VRAM budget with the PCIe roofline, from tiers_bench.json.

    python benchmarks/plot_tiers.py benchmarks/data/tiers_sweep.json benchmarks/tiers_sweep.png

Needs matplotlib (a development tool here, not a dependency of the package).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    res = json.load(open(src))
    runs = sorted((r for r in res["runs"] if r.get("opts", {}).get("streaming") != "mmap"
                   and r.get("opts", {}).get("ram_budget_gb") is None and "error" not in r),
                  key=lambda r: r["opts"]["vram_budget_gb"])
    budgets = [r["opts"]["vram_budget_gb"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(budgets, [r["tok_per_s"] for r in runs], "o-", label="measured (mean of decode tokens)")
    ax.plot(budgets, [r.get("steady_tok_per_s", 0) for r in runs], "s--", label="measured, steady median")
    ax.plot(budgets, [r["roofline_tok_per_s"] for r in runs], "k:",
            label=f"roofline: streamed bytes / {res['h2d_gbps']:.1f} GB/s (H2D measured)")
    ax.set_xlabel("VRAM budget (GB)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"synthetic 70B {runs[0].get('quant', '')}: {res['card']}, JAX {res['jax']}, {res['date']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
