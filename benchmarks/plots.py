"""PNG plots of the sweep results: time (p50, p20-p80 band) and peak memory against rows per slide (loss batch B
for contrastive_loss), one line per provider, one figure per op and mode. Matplotlib with the Agg backend."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The x axis of each op's size sweep.
X_AXIS = {"contrastive_loss": ("B", "loss batch B"), "kmeans": ("rows_per_slide", "rows clustered N")}
DEFAULT_X = ("rows_per_slide", "rows per slide (fresh + bank)")
SIZE_SWEEP = {"contrastive_loss": "B"}
# Distinct markers and dashes, so providers with equal numbers (reference and torch often) stay visible.
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
LINESTYLES = ["-", "--", "-.", ":"]


def _finite(v):
    return isinstance(v, (int, float)) and not math.isnan(v) and not math.isinf(v)


def plot_all(rows, out_dir, title=""):
    """One PNG per (op, mode) of the size sweep; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ops = list(dict.fromkeys(r["op"] for r in rows))
    for op in ops:
        sweep = SIZE_SWEEP.get(op, "rows")
        xcol, xlabel = X_AXIS.get(op, DEFAULT_X)
        for mode in dict.fromkeys(r["mode"] for r in rows if r["op"] == op):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r["sweep"] == sweep]
            if not sel:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            for i, provider in enumerate(dict.fromkeys(r["provider"] for r in sel)):
                style = dict(marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)])
                pts = sorted((r[xcol], r) for r in sel if r["provider"] == provider)
                ok = [(x, r) for x, r in pts if r["status"] == "ok" and _finite(r["p50_ms"])]
                if ok:
                    xs = [x for x, _ in ok]
                    line, = ax_t.plot(xs, [r["p50_ms"] for _, r in ok], label=provider, **style)
                    ax_t.fill_between(xs, [r["p20_ms"] for _, r in ok], [r["p80_ms"] for _, r in ok],
                                      color=line.get_color(), alpha=0.2)
                    mem = [(x, r["peak_mb"]) for x, r in ok if _finite(r["peak_mb"]) and r["peak_mb"] > 0]
                    if mem:
                        ax_m.plot([x for x, _ in mem], [m for _, m in mem], label=provider, color=line.get_color(),
                                  **style)
                oom = [x for x, r in pts if r["status"] == "oom"]
                if oom:
                    ax_t.plot(oom, [ax_t.get_ylim()[1]] * len(oom), "x", color="red")
            for ax, ylabel in ((ax_t, "time p50 (ms), band p20-p80"), (ax_m, "peak extra memory (MB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
            r0 = sel[0]["_case"]
            fixed = (f"loss P={r0.P} {r0.dtype}" if op == "contrastive_loss"
                     else f"B={r0.B} K={r0.K} D={r0.D} {r0.dtype}" + (f", bank {r0.bank_dtype}" if r0.bank_dtype else ""))
            fig.suptitle(f"{op} {mode} ({fixed}) - {title}", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}_{mode.replace('+', '_')}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
