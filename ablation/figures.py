"""PNG figures of the ablation tables: the Fig. 4 heatmap and the top-1-vs-k curves (matplotlib, Agg)."""
from __future__ import annotations

import io
from typing import Any
from collections.abc import Sequence

from . import stats as st


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return matplotlib, plt


def heatmap_png(rows: Sequence[dict[str, Any]], size: int, title: str, paper: dict | None) -> bytes:
    """Left: ours (mean best-epoch top-1 per cell). Right: the paper's Fig. 4 on the same colour scale when
    ``paper`` is given (a comparable preset on the 7x7 grid); otherwise ours minus the no-attention control
    (a diverging panel; ``*`` marks Holm-adjusted paired p < 0.05)."""
    import numpy as np
    matplotlib, plt = _pyplot()

    ours = np.full((size, size), np.nan)
    diff = np.full((size, size), np.nan)
    marks = np.zeros((size, size), dtype=bool)
    for r in rows:
        if r["n"]:
            ours[r["u"], r["v"]] = r["best_top1_mean"]
        if r.get("vs_control_mean") is not None:
            diff[r["u"], r["v"]] = r["vs_control_mean"]
            marks[r["u"], r["v"]] = r.get("vs_control_p_holm") is not None and r["vs_control_p_holm"] < st.ALPHA
    if paper is not None:
        right = np.full((size, size), np.nan)
        for (u, v), value in paper.items():
            right[u, v] = value
        right_title, is_diff = "Paper (Fig. 4, ResNet-50, ImageNet), same colour scale", False
        finite = np.concatenate([ours[np.isfinite(ours)], right.ravel()])
        scales = [(finite.min(), finite.max(), "viridis")] * 2
    else:
        right, is_diff = diff, True
        right_title = (f"Fine-tune minus the no-attention control (paired over seeds): * = Holm-adjusted "
                       f"p < {st.ALPHA:g}, {int(marks.sum())} of {int(np.isfinite(diff).sum())} cells")
        lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
        lim = lim if lim > 0 else 1.0
        f = ours[np.isfinite(ours)]
        scales = [((f.min(), f.max()) if f.size else (0.0, 1.0)) + ("viridis",), (-lim, lim, "RdBu")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    panels = ((axes[0], ours, "Ours: best-epoch top-1 (%), mean over seeds", scales[0], False),
              (axes[1], right, right_title, scales[1], is_diff))
    for ax, data, sub, (lo, hi, cmap_name), signed in panels:
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=lo, vmax=hi)
        for u in range(size):
            for v in range(size):
                value = data[u, v]
                text = "missing" if not np.isfinite(value) else (f"{value:+.2f}" if signed else f"{value:.2f}")
                text += " *" if signed and np.isfinite(value) and marks[u, v] else ""
                frac = (value - lo) / (hi - lo) if np.isfinite(value) and hi > lo else 0.5
                light_bg = (0.25 < frac < 0.75) if signed else (frac >= 0.6 or not np.isfinite(value))
                ax.text(v, u, text, ha="center", va="center", fontsize=7 if size > 5 else 9,
                        color="black" if light_bg else "white")
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
        ax.set_xlabel("v (horizontal frequency)")
        ax.set_ylabel("u (vertical frequency)")
        ax.set_title(sub, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="top-1 difference (points)" if signed else "top-1 (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def curve_png(rows: Sequence[dict[str, Any]], title: str, separate_axes: bool = False) -> bytes:
    """Best-epoch top-1 vs k, ours (mean with the 95% interval over seeds) and the paper's. ``separate_axes``:
    the paper's values on their own right-hand axis (a preset on other data, whose scale has nothing to do
    with them)."""
    _, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ks = [r["k"] for r in rows]
    have = [r for r in rows if r["n"]]
    paper = [(r["k"], r["paper_top1"]) for r in rows if r["paper_top1"] is not None]
    pax = ax.twinx() if separate_axes else ax
    pax.plot([k for k, _ in paper], [p for _, p in paper], "s--", color="tab:gray", label="paper (ImageNet)")
    if separate_axes:
        pax.set_ylabel("paper top-1 (%, ResNet-50, ImageNet)", color="tab:gray")
        pax.legend(fontsize=8, loc="lower right")
    if have:
        mean = [r["best_top1_mean"] for r in have]
        pairs = list(zip(mean, have, strict=True))
        lo = [m - (r["best_top1_ci_low"] if r["best_top1_ci_low"] is not None else m) for m, r in pairs]
        hi = [(r["best_top1_ci_high"] if r["best_top1_ci_high"] is not None else m) - m for m, r in pairs]
        ax.errorbar([r["k"] for r in have], mean, yerr=[lo, hi], fmt="o-", color="tab:blue", capsize=3,
                    label="ours: best-epoch top-1, mean and 95% interval")
        ax.plot([r["k"] for r in have], [r["final_top1_mean"] for r in have], "x:", color="tab:blue", alpha=0.6,
                label="ours: final-epoch top-1, mean")
    missing = [r["k"] for r in rows if not r["n"]]
    if missing:
        ax.text(0.02, 0.02, "ours missing for k = " + ", ".join(map(str, missing)), transform=ax.transAxes,
                fontsize=8, color="tab:red")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("number of frequencies k")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    if have or not separate_axes:  # an empty axis has nothing to label
        ax.legend(fontsize=8, loc="upper left" if separate_axes else "best")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _figure_bytes(fig)
