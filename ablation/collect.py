"""Tables and figures of a study from its runs' ``summary.json`` files, next to the paper's numbers.

Writes ``<output>/<study>/``: ``table.csv`` (one row per point: mean, sample std and n over seeds, the paper's
value and the difference), ``runs.csv`` (one row per run), ``table.md`` (the paper's layout) and PNG figures:
``fig4_heatmap.png`` (ours and the paper's 7x7 grid) for ``single_freq``, ``<study>_curve.png`` (top-1 vs k)
for the k-studies. Missing runs show as missing (empty cells / "missing"), never as zero. Every file is
written to a temporary name and renamed into place, so an interrupted collect never leaves a torn table.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from models.dct import GRID, rank_frequencies

from .studies import GRID_POINTS, REPO, STUDY_METHOD, Plan, is_complete, read_summary

PAPER_DIR = REPO / "results" / "paper"
PAPER_TABLES = {"topk": ("table1_topk.csv", "Table 1", "Top-k"), "lowk": ("table5_lowk.csv", "Table 5", "Low-k"),
                "botk": ("table6_botk.csv", "Table 6", "Bot-k")}


# --------------------------------------------------------------------------------------------- helpers
def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def csv_text(header: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})
    return buf.getvalue()


def _read_csv(name: str) -> list[dict[str, str]]:
    with open(PAPER_DIR / name, newline="") as f:
        return list(csv.DictReader(f))


def stats(values: list[float]) -> dict[str, Optional[float]]:
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n > 1 else None}


def fmt(x: Optional[float], nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def fmt_ours(s: dict[str, Any], nd: int = 2) -> str:
    if not s["n"]:
        return "missing"
    text = f"{s['mean']:.{nd}f}"
    if s["std"] is not None:
        text += f" ± {s['std']:.{nd}f}"
    return text + f" (n={s['n']})"


def fmt_diff(ours: Optional[float], paper: Optional[float]) -> str:
    if ours is None or paper is None:
        return ""
    return f"{ours - paper:+.2f}"


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None else round(x, nd)


def gather(plan: Plan) -> list[dict[str, Any]]:
    """One record per planned run: its summary if complete (errors on corrupt summaries), else missing."""
    records = []
    for run in plan.runs:
        summary = read_summary(run.run_dir)  # raises AblationError on a corrupt file
        complete = summary is not None and is_complete(run.run_dir, run.epochs)
        meta_path = run.run_dir / "ablation.json"
        recorded = None
        if meta_path.exists():
            try:
                recorded = json.loads(meta_path.read_text())
            except ValueError:
                recorded = None
        records.append({"run": run, "summary": summary if complete else None, "recorded": recorded})
    return records


def _num(summary: Optional[dict[str, Any]], key: str) -> Optional[float]:
    if not summary:
        return None
    value = summary.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def runs_rows(records) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        run, s = rec["run"], rec["summary"]
        freqs = (rec["recorded"] or {}).get("frequencies", run.meta.get("frequencies"))
        rows.append({"run": run.name, "point": run.point, "seed": run.overrides.get("seed"),
                     "status": "complete" if s else "missing", "epochs": run.epochs,
                     "freq_source": run.meta.get("freq_source"),
                     "frequencies": json.dumps(freqs) if freqs is not None else None,
                     "final_top1": _num(s, "final_top1"), "final_top5": _num(s, "final_top5"),
                     "best_top1": _num(s, "best_top1"), "gpu_hours": _num(s, "gpu_hours"),
                     "run_dir": _display_path(run.run_dir)})
    return rows


def _display_path(path: Path) -> str:
    """Relative to the repository when inside it (committed tables carry no machine-specific prefix)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


RUNS_HEADER = ["run", "point", "seed", "status", "epochs", "freq_source", "frequencies", "final_top1", "final_top5",
               "best_top1", "gpu_hours", "run_dir"]


def _point_stats(records, point: str, key: str) -> dict[str, Any]:
    values = [_num(r["summary"], key) for r in records if r["run"].point == point and r["summary"]]
    return stats([v for v in values if v is not None])


# ------------------------------------------------------------------------------------------ single_freq
def collect_single_freq(plan: Plan, out: Path, records) -> list[Path]:
    paper = {(int(r["u"]), int(r["v"])): r for r in _read_csv("fig4_single_frequency.csv")}
    rows, ours_grid = [], {}
    for u, v in GRID_POINTS:
        top1 = _point_stats(records, f"u{u}v{v}", "final_top1")
        top5 = _point_stats(records, f"u{u}v{v}", "final_top5")
        p1 = float(paper[(u, v)]["top1_fig4"])
        if top1["n"]:
            ours_grid[(u, v)] = top1["mean"]
        rows.append({"u": u, "v": v, "n": top1["n"], "top1_mean": _r(top1["mean"]), "top1_std": _r(top1["std"]),
                     "top5_mean": _r(top5["mean"]), "top5_std": _r(top5["std"]), "paper_top1": p1,
                     "paper_top1_unrounded": float(paper[(u, v)]["top1_unrounded"]),
                     "diff_top1": _r(top1["mean"] - p1) if top1["n"] else None})
    header = ["u", "v", "n", "top1_mean", "top1_std", "top5_mean", "top5_std", "paper_top1",
              "paper_top1_unrounded", "diff_top1"]
    base = [r for r in records if r["run"].point == "base"]
    base_s = base[0]["summary"] if base else None

    md = [f"# Fig. 4: single-frequency fine-tunes ({plan.preset['name']} preset)", "",
          f"Top-1 accuracy (%) of the base network fine-tuned with FCA using one frequency (u, v) for all channels; "
          f"u = row (vertical frequency), v = column. Ours: mean ± sample std over n seeds of `final_top1`; "
          f"paper: Fig. 4 (ResNet-50, ImageNet). {sum(1 for r in rows if r['n'])}/49 points measured.", ""]
    if plan.preset["name"] != "imagenet":
        md += [f"Note: the `{plan.preset['name']}` preset trains a different network on different data "
               f"({plan.preset.get('description', '')}); its numbers are not comparable with the paper's "
               f"and the differences are shown only to exercise the pipeline.", ""]
    if base:
        md += [f"Base network ({base[0]['run'].name}): "
               + (f"top-1 {_num(base_s, 'final_top1'):.2f}" if base_s else "missing"), ""]
    elif plan.base_checkpoint:
        md += [f"Base checkpoint: `{plan.base_checkpoint}` (given with --base-checkpoint)", ""]

    def grid_table(title: str, cell) -> list[str]:
        lines = [f"### {title}", "", "| u \\ v | " + " | ".join(str(v) for v in range(GRID)) + " |",
                 "|---|" + "---|" * GRID]
        for u in range(GRID):
            lines.append(f"| **{u}** | " + " | ".join(cell(rows[u * GRID + v]) for v in range(GRID)) + " |")
        return lines + [""]

    md += grid_table("Ours", lambda r: fmt_ours({"n": r["n"], "mean": r["top1_mean"], "std": r["top1_std"]}))
    md += grid_table("Paper (Fig. 4)", lambda r: f"{r['paper_top1']:.2f}")
    md += grid_table("Difference (ours − paper)", lambda r: fmt_diff(r["top1_mean"], r["paper_top1"]) or "missing")
    if len(ours_grid) == len(GRID_POINTS):
        ranked = rank_frequencies(ours_grid, True)
        paper_ranked = rank_frequencies({k: float(p["top1_unrounded"]) for k, p in paper.items()}, True)
        md += ["### Ranking (step one of the two-step criterion)", "",
               "| rank | ours (u, v) | paper (u, v) |", "|---|---|---|"]
        md += [f"| {i + 1} | {ranked[i]} | {paper_ranked[i]} |" for i in range(len(ranked))]
        md += [""]
    else:
        md += [f"Ranking: needs all 49 points ({len(ours_grid)} measured); the Top-k/Bot-k studies use the "
               f"published orders until then.", ""]

    written = [out / "table.csv", out / "table.md", out / "runs.csv", out / "fig4_heatmap.png"]
    write_atomic(out / "table.csv", csv_text(header, rows))
    write_atomic(out / "runs.csv", csv_text(RUNS_HEADER, runs_rows(records)))
    write_atomic(out / "table.md", "\n".join(md))
    write_atomic(out / "fig4_heatmap.png", heatmap_png(rows, plan.preset["name"]))
    return written


def heatmap_png(rows, preset: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ours = np.full((GRID, GRID), np.nan)
    paper = np.zeros((GRID, GRID))
    for r in rows:
        paper[r["u"], r["v"]] = r["paper_top1"]
        if r["n"]:
            ours[r["u"], r["v"]] = r["top1_mean"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, data, title in ((axes[0], ours, f"Ours ({preset} preset)"), (axes[1], paper, "Paper (Fig. 4)")):
        masked = np.ma.masked_invalid(data)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
        finite = data[np.isfinite(data)]
        im = ax.imshow(masked, cmap=cmap, vmin=finite.min() if finite.size else 0,
                       vmax=finite.max() if finite.size else 1)
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        for u in range(GRID):
            for v in range(GRID):
                value = data[u, v]
                text = "missing" if not np.isfinite(value) else f"{value:.2f}"
                bright = not np.isfinite(value) or (hi > lo and (value - lo) / (hi - lo) > 0.6)
                ax.text(v, u, text, ha="center", va="center", fontsize=7, color="black" if bright else "white")
        ax.set_xticks(range(GRID))
        ax.set_yticks(range(GRID))
        ax.set_xlabel("v (horizontal frequency)")
        ax.set_ylabel("u (vertical frequency)")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="top-1 (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- k-studies
def collect_k(plan: Plan, out: Path, records) -> list[Path]:
    fname, table_name, label = PAPER_TABLES[plan.study]
    paper = {int(r["k"]): r for r in _read_csv(fname)}
    method = STUDY_METHOD[plan.study]
    ks = [int(k) for k in plan.preset["studies"][plan.study]["ks"]]
    rows = []
    for k in ks:
        point = f"{method}{k}"
        top1, top5 = _point_stats(records, point, "final_top1"), _point_stats(records, point, "final_top5")
        freqs = next(r["run"].meta["frequencies"] for r in records if r["run"].point == point)
        p1 = float(paper[k]["top1"]) if k in paper else None
        p5 = float(paper[k]["top5"]) if k in paper else None
        rows.append({"k": k, "n": top1["n"], "top1_mean": _r(top1["mean"]), "top1_std": _r(top1["std"]),
                     "top5_mean": _r(top5["mean"]), "top5_std": _r(top5["std"]), "paper_top1": p1, "paper_top5": p5,
                     "diff_top1": _r(top1["mean"] - p1) if top1["n"] and p1 is not None else None,
                     "diff_top5": _r(top5["mean"] - p5) if top5["n"] and p5 is not None else None,
                     "freq_source": plan.freq_source, "frequencies": json.dumps(freqs)})
    header = ["k", "n", "top1_mean", "top1_std", "top5_mean", "top5_std", "paper_top1", "paper_top5", "diff_top1",
              "diff_top5", "freq_source", "frequencies"]
    source_text = {"published": "the authors' published order: " + (
        "the fixed zig-zag Low-k order of appendix Fig. 5b" if plan.study == "lowk" else
        "our single_freq grid is not complete"),
        "measured": "the two-step criterion on our own measured single_freq grid"}[plan.freq_source]
    mismatched = [r["run"].name for r in records if r["recorded"] and
                  r["recorded"].get("frequencies") not in (None, r["run"].meta.get("frequencies"))]
    md = [f"# {table_name}: {label} frequency selection ({plan.preset['name']} preset)", "",
          f"Top-1 / top-5 accuracy (%) with k frequencies, trained from scratch "
          f"({plan.preset['studies'][plan.study]['epochs']} epochs). Ours: mean ± sample std over n seeds of "
          f"`final_top1`/`final_top5`; paper: {table_name} (ResNet-50, ImageNet, 100 epochs).", "",
          f"Frequency source: **{plan.freq_source}** ({source_text}).", ""]
    if plan.preset["name"] != "imagenet":
        md += [f"Note: the `{plan.preset['name']}` preset trains a different network on different data "
               f"({plan.preset.get('description', '')}); its numbers are not comparable with the paper's.", ""]
    if mismatched:
        md += [f"Warning: runs {', '.join(mismatched)} were started with other frequencies than listed here.", ""]
    md += ["| Number of frequencies | Top-1 ours | Top-1 paper | Δ top-1 | Top-5 ours | Top-5 paper | Δ top-5 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['k']} | {fmt_ours({'n': r['n'], 'mean': r['top1_mean'], 'std': r['top1_std']})} | "
                  f"{fmt(r['paper_top1'])} | {fmt_diff(r['top1_mean'], r['paper_top1'])} | "
                  f"{fmt_ours({'n': r['n'], 'mean': r['top5_mean'], 'std': r['top5_std']})} | "
                  f"{fmt(r['paper_top5'])} | {fmt_diff(r['top5_mean'], r['paper_top5'])} |")
    md += ["", "Frequencies (u, v) per k, in order:", ""]
    md += [f"- k={r['k']}: {', '.join(f'({u},{v})' for u, v in json.loads(r['frequencies']))}" for r in rows]
    md += [""]
    curve = f"{plan.study}_curve.png"
    write_atomic(out / "table.csv", csv_text(header, rows))
    write_atomic(out / "runs.csv", csv_text(RUNS_HEADER, runs_rows(records)))
    write_atomic(out / "table.md", "\n".join(md))
    write_atomic(out / curve, curve_png(rows, f"{label} ({plan.preset['name']} preset, source: {plan.freq_source})",
                                        separate_axes=plan.preset["name"] != "imagenet"))
    return [out / "table.csv", out / "table.md", out / "runs.csv", out / curve]


def curve_png(rows, title: str, separate_axes: bool = False) -> bytes:
    """Top-1 and top-5 vs k, ours (mean ± std over seeds) and the paper's. ``separate_axes``: the paper's
    values on their own right-hand axis (a preset on other data, whose scale has nothing to do with them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r["k"] for r in rows]
    have = [r for r in rows if r["n"]]
    for ax, key, name in ((axes[0], "top1", "top-1"), (axes[1], "top5", "top-5")):
        paper = [(r["k"], r[f"paper_{key}"]) for r in rows if r[f"paper_{key}"] is not None]
        pax = ax.twinx() if separate_axes else ax
        pax.plot([k for k, _ in paper], [p for _, p in paper], "s--", color="tab:gray", label="paper")
        if separate_axes:
            pax.set_ylabel(f"paper {name} (%, ImageNet)", color="tab:gray")
            pax.legend(fontsize=8, loc="upper right")
        if have:
            ax.errorbar([r["k"] for r in have], [r[f"{key}_mean"] for r in have],
                        yerr=[r[f"{key}_std"] or 0.0 for r in have], fmt="o-", color="tab:blue", capsize=3,
                        label="ours (mean ± std over seeds)")
        missing = [r["k"] for r in rows if not r["n"]]
        if missing:
            ax.text(0.02, 0.02, "ours missing for k = " + ", ".join(map(str, missing)), transform=ax.transAxes,
                    fontsize=8, color="tab:red")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("number of frequencies k")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left" if separate_axes else "best")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def collect(plan: Plan, output: Path) -> list[Path]:
    out = Path(output) / plan.study
    records = gather(plan)  # validates every summary before anything is written
    if plan.study == "single_freq":
        return collect_single_freq(plan, out, records)
    return collect_k(plan, out, records)
