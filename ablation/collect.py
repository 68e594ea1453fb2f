"""Tables and figures of a study from its runs' ``summary.json`` files, next to the paper's numbers.

Writes ``<output>/<study>/``: ``table.csv`` (one row per point: best-epoch and final-epoch top-1 over seeds with
mean, sample std, n and a 95% interval, significance vs the best row and vs the SE-equivalent (0, 0), the paper's
value), ``runs.csv`` (one row per run), ``table.md`` (the same, with every protocol choice flagged) and PNG
figures: ``fig4_heatmap.png`` for ``single_freq``, ``<study>_curve.png`` (top-1 vs k) for the k-studies.
Statistics: :mod:`ablation.stats`. Missing runs show as missing (empty cells / "missing"), never as zero. Every
file is written atomically, so an interrupted collect never leaves a torn table.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from models.dct import GRID

from . import stats as st
from .preset import REPO
from .studies import STUDY_METHOD, Plan, grid_points, single_freq_values
from .summaries import is_complete, read_summary

PAPER_DIR = REPO / "results" / "paper"
PAPER_TABLES = {"topk": ("table1_topk.csv", "Table 1", "Top-k"), "lowk": ("table5_lowk.csv", "Table 5", "Low-k"),
                "botk": ("table6_botk.csv", "Table 6", "Bot-k")}
BEST, FINAL = "best_top1", "final_top1"


# --------------------------------------------------------------------------------------------- helpers
def write_atomic(path: Path, data: bytes | str) -> None:
    """Write text or bytes atomically (the engine's writers: temp file, fsync, rename)."""
    from engine.checkpoint import atomic_open, atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        atomic_write_text(path, data)
    else:
        with atomic_open(path, "wb") as f:
            f.write(data)


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


def fmt(x: Optional[float], nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def fmt_ours(s: dict[str, Any], nd: int = 2) -> str:
    """``92.00 ± 0.71 (n=2)``, or ``missing``."""
    if not s["n"]:
        return "missing"
    text = f"{s['mean']:.{nd}f}"
    if s["std"] is not None:
        text += f" ± {s['std']:.{nd}f}"
    return text + f" (n={s['n']})"


def fmt_ci(s: dict[str, Any]) -> str:
    return "" if s.get("ci_low") is None else f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


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
    if key == BEST and isinstance(value, (int, float)) and value < 0:
        return None  # the trainer's "never evaluated" sentinel
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
                     "best_top1": _num(s, BEST), "best_epoch": _num(s, "best_epoch"),
                     "final_top1": _num(s, FINAL), "final_top5": _num(s, "final_top5"),
                     "gpu_hours": _num(s, "gpu_hours"), "machine": (rec["recorded"] or {}).get("machine"),
                     "run_dir": _display_path(run.run_dir)})
    return rows


def _display_path(path: Path) -> str:
    """Relative to the repository when inside it (committed tables carry no machine-specific prefix)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


RUNS_HEADER = ["run", "point", "seed", "status", "epochs", "freq_source", "frequencies", "best_top1", "best_epoch",
               "final_top1", "final_top5", "gpu_hours", "machine", "run_dir"]


# ------------------------------------------------------------------------------------------ point values
def point_values(records, point: str, key: str) -> list[float]:
    """The complete runs' ``key`` values of one point, in seed order."""
    recs = sorted((r for r in records if r["run"].point == point and r["summary"]),
                  key=lambda r: r["run"].overrides.get("seed", 0))
    return [v for v in (_num(r["summary"], key) for r in recs) if v is not None]


def compare_rows(rows: list[dict[str, Any]], values: dict[str, list[float]], reference: Optional[list[float]],
                 ref_label: str) -> None:
    """Add to each row (``row["key"]`` names its ``values``) the difference and Holm-adjusted Welch p-value vs
    the best row (highest mean best-epoch top-1) and vs ``reference`` (the SE-equivalent (0, 0))."""
    have = [r for r in rows if len(values[r["key"]])]
    best = max(have, key=lambda r: r["best_top1_mean"]) if have else None
    p_best, p_ref = [], []
    for r in rows:
        vals = values[r["key"]]
        p_best.append(None if best is None or r is best else st.welch_p(vals, values[best["key"]]))
        p_ref.append(None if reference is None or r.get("is_reference") else st.welch_p(vals, reference))
    for r, pb, pr in zip(rows, st.holm(p_best), st.holm(p_ref)):
        vals = values[r["key"]]
        r["is_best"] = r is best
        r["diff_vs_best"] = _r(r["best_top1_mean"] - best["best_top1_mean"]) if vals and best else None
        r["p_vs_best"] = _r(pb, 6)
        ref_mean = sum(reference) / len(reference) if reference else None
        r["diff_vs_00"] = _r(r["best_top1_mean"] - ref_mean) if vals and ref_mean is not None else None
        r["p_vs_00"] = _r(pr, 6)
    for r in rows:
        r["ref_label"] = ref_label


def cell_vs(row: dict[str, Any], which: str) -> str:
    """``-1.23 (p 0.012 *)``: difference of mean best-epoch top-1 and the adjusted p-value."""
    diff, p = row.get(f"diff_vs_{which}"), row.get(f"p_vs_{which}")
    if which == "best" and row.get("is_best"):
        return "best"
    if which == "00" and row.get("is_reference"):
        return "(0,0)"
    if diff is None:
        return "n/a"
    return f"{diff:+.2f} ({'p ' + st.mark(p) if p is not None else 'n/a'})"


def stat_columns(prefix: str, s: dict[str, Any]) -> dict[str, Any]:
    """Table columns of one statistic; the interval is clipped to the possible range of an accuracy, [0, 100]."""
    lo = None if s["ci_low"] is None else max(0.0, s["ci_low"])
    hi = None if s["ci_high"] is None else min(100.0, s["ci_high"])
    return {f"{prefix}_mean": _r(s["mean"]), f"{prefix}_std": _r(s["std"]), f"{prefix}_ci_low": _r(lo),
            f"{prefix}_ci_high": _r(hi)}


def stat_header(prefix: str) -> list[str]:
    return [f"{prefix}_mean", f"{prefix}_std", f"{prefix}_ci_low", f"{prefix}_ci_high"]


def _stats_of(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {"n": row["n"], "mean": row[f"{prefix}_mean"], "std": row[f"{prefix}_std"],
            "ci_low": row[f"{prefix}_ci_low"], "ci_high": row[f"{prefix}_ci_high"]}


# --------------------------------------------------------------------------------------- protocol notes
def machines(records) -> list[str]:
    """Where the complete runs trained: the CPU model the runner recorded, and the trainer's device if not the
    CPU (``summary.json`` ``device``, e.g. a GPU name)."""
    found = set()
    for r in records:
        if r["summary"] and r["recorded"] and r["recorded"].get("machine"):
            device = r["summary"].get("device")
            cpu = str(r["recorded"]["machine"])
            found.add(cpu if device in (None, "cpu") else f"{device} (host CPU: {cpu})")
    return sorted(found)


def _trainer_config(run):
    """The run's resolved trainer config (the parse the trainer itself does), or None if it cannot be read."""
    try:
        from engine.config import load_config
        return load_config(REPO / run.config, run.override_args())
    except Exception:  # a config the trainer would refuse: the notes just leave those facts out
        return None


def protocol_notes(plan: Plan, records) -> list[str]:
    """Markdown bullets flagging every protocol choice behind the numbers of this table."""
    preset = plan.preset
    runs = [r for r in plan.runs if r.point != "base"]
    cfg = _trainer_config(runs[0]) if runs else None
    notes = ["## Protocol (choices that affect the numbers)", "",
             "- **Best vs final.** *best* = the highest of the per-epoch validation top-1 values (the authors' "
             "`best_prec1`, the statistic the paper prints); *final* = the last epoch's. The comparison with the "
             "paper, the ranking of the two-step criterion and the significance tests use *best*; *final* is "
             "shown beside it (best is optimistic by the choice of epoch on the validation set)."]
    if cfg is not None:
        amp = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "off": "fp32"}[cfg.train.amp]
        notes.append(f"- **Precision.** {amp} (the authors trained in fp16 with apex O2 and a static loss scale "
                     f"of 128; bf16 keeps fp32's range, so no loss scaling, but has fewer mantissa bits).")
    if plan.study == "single_freq" and cfg is not None:
        sched = {"ours": f"linear warmup {cfg.train.warmup_epochs:g} epochs, then cosine to 0 over the "
                         f"fine-tune's {cfg.train.epochs} epochs (our reading of \"similar optimization setting\", "
                         f"Sec. 4.2)",
                 "paper-code": "the authors' main.py length: 5 warmup + 95 cosine epochs, of which the fine-tune "
                               f"runs the first {cfg.train.epochs} (`--finetune-schedule paper-code`)"}
        base_runs = [r for r in plan.runs if r.point == "base"]
        base_cfg = _trainer_config(base_runs[0]) if base_runs else None
        ratio = ""
        if base_cfg is not None and base_cfg.optim.base_lr:
            ratio = (f" It is {cfg.optim.base_lr / base_cfg.optim.base_lr:.2g}x the base run's base_lr "
                     f"{base_cfg.optim.base_lr:g} (paper: 0.02 / 0.1 = 0.2x) and runs {cfg.train.epochs} epochs after "
                     f"the base's {base_cfg.train.epochs} (paper: 20 after 100).")
        notes.append(f"- **Fine-tune lr.** base_lr {cfg.optim.base_lr:g} read as per 256 images (lr = base_lr x "
                     f"global batch / 256; batch {cfg.train.batch_size} per process); the paper's \"lr 0.02\" does "
                     f"not say per how many images.{ratio} Schedule: {sched[plan.finetune_schedule]}. Attention is "
                     f"freshly initialised on the plain base network; `--finetune-schedule paper-code` measures the "
                     f"other schedule reading.")
    elif cfg is not None:
        notes.append(f"- **Recipe.** {cfg.train.epochs} epochs from scratch, base_lr {cfg.optim.base_lr:g} per 256 "
                     f"images, warmup {cfg.train.warmup_epochs:g} epochs then cosine, label smoothing "
                     f"{cfg.train.label_smoothing:g}.")
    notes.append("- **Baselines.** The SE-equivalent here is FCA with the single frequency (0, 0) trained with the "
                 "same recipe (Theorem 1: the (0, 0) component is GAP up to a constant). The paper's Table 2 "
                 "ResNet/SENet/ECANet numbers are quoted from their original papers, not trained with the FcaNet "
                 "recipe; baselines reproduced with this recipe are likely higher (the paper's own (0, 0) fine-tune "
                 "reaches 77.26 vs the quoted SENet-50 76.71).")
    notes.append(f"- **Statistics.** Mean ± sample std over n seeds; 95% interval = Student-t interval of the mean "
                 f"(clipped to [0, 100]). "
                 f"Significance: {st.TEST_NAME}; `*` = adjusted p < {st.ALPHA:g}; n/a = fewer than 2 seeds on a "
                 f"side.")
    if not preset.paper_comparable:
        notes.append(f"- **Not the paper's setting.** Dataset: {preset.dataset}; "
                     f"network: {preset.description}. Compare orderings and gaps with the paper, not "
                     f"absolute numbers.")
    found = machines(records)
    if found:
        notes.append(f"- **Machine.** Runs trained on: {', '.join(found)}. Numerics differ across processors (and "
                     f"thread counts), so a rerun elsewhere differs by about the printed intervals, not bitwise.")
    return notes + [""]


def paper_note(preset: dict[str, Any]) -> str:
    return ("Paper columns: ResNet-50 on ImageNet-1k, one run per point, best-epoch top-1 (`best_prec1`)." +
            ("" if preset.paper_comparable else " Shown for orientation only: a different network "
             "and data set (no Δ column)."))


# ------------------------------------------------------------------------------------------ single_freq
def collect_single_freq(plan: Plan, out: Path, records) -> list[Path]:
    size = plan.preset.grid_size
    points = grid_points(size)
    paper = {(int(r["u"]), int(r["v"])): r for r in _read_csv("fig4_single_frequency.csv")}
    on_paper_grid = size == GRID
    comparable = plan.preset.paper_comparable and on_paper_grid
    rows, values = [], {}
    for u, v in points:
        key = f"u{u}v{v}"
        values[key] = point_values(records, key, BEST)
        best, final = st.summarize(values[key]), st.summarize(point_values(records, key, FINAL))
        p1 = float(paper[(u, v)]["top1_fig4"]) if on_paper_grid else None
        rows.append({"key": key, "u": u, "v": v, "n": best["n"], **stat_columns("best_top1", best),
                     **stat_columns("final_top1", final), "paper_top1": p1,
                     "paper_top1_unrounded": float(paper[(u, v)]["top1_unrounded"]) if on_paper_grid else None,
                     "diff_top1": _r(best["mean"] - p1) if comparable and best["n"] else None,
                     "is_reference": (u, v) == (0, 0)})
    compare_rows(rows, values, values["u0v0"] or None, "(0,0)")
    header = ["u", "v", "n", *stat_header("best_top1"), *stat_header("final_top1"), "diff_vs_best", "p_vs_best",
              "diff_vs_00", "p_vs_00", "paper_top1", "paper_top1_unrounded", "diff_top1"]
    base = [r for r in records if r["run"].point == "base"]
    base_s = base[0]["summary"] if base else None
    base_final, base_best = _num(base_s, FINAL), _num(base_s, BEST)
    measured = sum(1 for r in rows if r["n"])
    dataset = plan.preset.dataset

    md = [f"# Fig. 4: single-frequency fine-tunes ({plan.preset.name} preset, {size}x{size} grid)", "",
          f"Top-1 accuracy (%) of the base network fine-tuned with FCA using one frequency (u, v) for all channels "
          f"(u = row, vertical frequency; v = column). Data: {dataset}. {measured}/{len(points)} points measured, "
          f"{plan.seeds} seed(s) planned per point.", ""]
    if base:
        md += [f"Base network ({base[0]['run'].name}): " + (f"top-1 final {base_final:.2f}, best {base_best:.2f}"
                                                           if base_s else "missing"), ""]
    elif plan.base_checkpoint:
        md += [f"Base checkpoint: `{plan.base_checkpoint}` (given with --base-checkpoint)", ""]
    all_final = [v for r in records if r["run"].point != "base" for v in [_num(r["summary"], FINAL)] if v is not None]
    if all_final and base_final is not None:
        mean_ft = sum(all_final) / len(all_final)
        md += [f"Fine-tunes vs base: mean final top-1 of all {len(all_final)} fine-tunes {mean_ft:.2f} vs the base's "
               f"{base_final:.2f} ({mean_ft - base_final:+.2f}); "
               + ("they end at or above the base on average." if mean_ft >= base_final else
                  "**they end below the base on average: the fine-tune budget is too small to recover from "
                  "inserting fresh attention, so the grid mostly measures that recovery.**"), ""]
    md += protocol_notes(plan, records)

    def grid_table(title: str, cell) -> list[str]:
        lines = [f"### {title}", "", "| u \\ v | " + " | ".join(str(v) for v in range(size)) + " |",
                 "|---|" + "---|" * size]
        for u in range(size):
            lines.append(f"| **{u}** | " + " | ".join(cell(rows[u * size + v]) for v in range(size)) + " |")
        return lines + [""]

    md += grid_table("Ours: best-epoch top-1, mean ± std (n)", lambda r: fmt_ours(_stats_of(r, "best_top1")))
    md += grid_table("Ours: final-epoch top-1, mean ± std (n)", lambda r: fmt_ours(_stats_of(r, "final_top1")))
    if on_paper_grid:
        md += grid_table("Paper (Fig. 4, best_prec1)", lambda r: f"{r['paper_top1']:.2f}")
        if comparable:
            md += grid_table("Difference (ours best − paper)", lambda r: fmt_diff(r["best_top1_mean"],
                                                                                 r["paper_top1"]) or "missing")
    from models.dct import rank_frequencies
    by_point = {(r["u"], r["v"]): r for r in rows if r["n"]}
    # the criterion's own order (its tie rule included), so the table and the derived Top-k lists agree
    ranked = [by_point[f] for f in rank_frequencies({f: r["best_top1_mean"] for f, r in by_point.items()}, True)]
    md += ["### Ranking (step one of the two-step criterion, by mean best-epoch top-1)", "",
           f"Significance: {st.TEST_NAME}. `*`: adjusted p < {st.ALPHA:g}.", "",
           "| rank | (u, v) | best top-1 | 95% interval | final top-1 | vs best row | vs (0,0) |"
           + (" paper rank |" if on_paper_grid else ""), "|---|---|---|---|---|---|---|" + ("---|" if on_paper_grid
                                                                                            else "")]
    paper_rank = {}
    if on_paper_grid:
        order = rank_frequencies({k: float(p["top1_unrounded"]) for k, p in paper.items()}, True)
        paper_rank = {f: i + 1 for i, f in enumerate(order)}
    for i, r in enumerate(ranked):
        md.append(f"| {i + 1} | ({r['u']},{r['v']}) | {fmt_ours(_stats_of(r, 'best_top1'))} | "
                  f"{fmt_ci(_stats_of(r, 'best_top1'))} | {fmt_ours(_stats_of(r, 'final_top1'))} | "
                  f"{cell_vs(r, 'best')} | {cell_vs(r, '00')} |"
                  + (f" {paper_rank[(r['u'], r['v'])]} |" if on_paper_grid else ""))
    md += [""]
    md += stability_section(plan, size)

    written = [out / "table.csv", out / "table.md", out / "runs.csv", out / "fig4_heatmap.png"]
    write_atomic(out / "table.csv", csv_text(header, rows))
    write_atomic(out / "runs.csv", csv_text(RUNS_HEADER, runs_rows(records)))
    write_atomic(out / "table.md", "\n".join(md))
    ns = sorted({r["n"] for r in rows if r["n"]}) or [0]
    n_text = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    stds = sorted(r["best_top1_std"] for r in rows if r["best_top1_std"] is not None)
    spread = f"; median seed std {stds[len(stds) // 2]:.2f} points" if stds else ""
    title = (f"{plan.preset.name} preset: {dataset}\nn = {n_text} seed(s) per cell{spread}; base network top-1 "
             + (f"{base_final:.2f}" if base_final is not None else "n/a"))
    write_atomic(out / "fig4_heatmap.png", heatmap_png(rows, size, title, on_paper_grid, comparable))
    return written


def stability_section(plan: Plan, size: int) -> list[str]:
    """Markdown: how stable the two-step criterion's Top-k and Bot-k sets are under resampling seeds."""
    values = single_freq_values(plan.runs_root, plan.preset)
    ks = [k for k in plan.preset.studies.topk.ks if k < size * size]
    if len(values) < size * size or not ks:
        return [f"Two-step criterion stability: needs all {size * size} points ({len(values)} complete).", ""]
    if min(len(v) for v in values.values()) < 2:
        return ["Two-step criterion stability: needs at least 2 seeds per point.", ""]
    lines = ["### Stability of the two-step criterion's sets under resampling seeds", "",
             f"Bootstrap: {st.BOOTSTRAP_RESAMPLES} replicates, each resampling every point's seeds with replacement "
             f"and re-ranking the means of best-epoch top-1. *P(same set)*: share of replicates giving exactly the "
             f"observed set; *Jaccard*: mean overlap with it; *weakest member*: the member least often included. "
             f"A low P(same set) means the derived list is not a finding of this data.", "",
             "| list | k | observed set | P(same set) | Jaccard | weakest member |", "|---|---|---|---|---|---|"]
    for name, descending in (("Top-k", True), ("Bot-k", False)):
        result = st.set_stability(values, ks, descending)
        for k in ks:
            res = result[k]
            weakest = min(res["inclusion"].items(), key=lambda kv: kv[1])
            lines.append(f"| {name} | {k} | {' '.join(f'({u},{v})' for u, v in res['set'])} | "
                         f"{res['p_same']:.2f} | {res['jaccard']:.2f} | ({weakest[0][0]},{weakest[0][1]}) "
                         f"{weakest[1]:.0%} |")
    return lines + [""]


def heatmap_png(rows, size: int, title: str, on_paper_grid: bool, comparable: bool) -> bytes:
    """Left: ours (mean best-epoch top-1). Right: the paper's Fig. 4 on the same colour scale when comparable;
    otherwise ours minus the (0, 0) cell (a diverging difference panel; ``*`` marks adjusted p < 0.05)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ours = np.full((size, size), np.nan)
    marks = np.zeros((size, size), dtype=bool)
    paper = np.full((size, size), np.nan)
    for r in rows:
        if r["n"]:
            ours[r["u"], r["v"]] = r["best_top1_mean"]
            marks[r["u"], r["v"]] = r.get("p_vs_00") is not None and r["p_vs_00"] < st.ALPHA
        if on_paper_grid:
            paper[r["u"], r["v"]] = r["paper_top1"]
    ref = ours[0, 0]
    if comparable:
        right, right_title = paper, "Paper (Fig. 4, ResNet-50, ImageNet), same colour scale"
        finite = np.concatenate([ours[np.isfinite(ours)], paper.ravel()])
        scales = [(finite.min(), finite.max(), "viridis")] * 2
    else:
        right = ours - ref
        right_title = (f"Ours minus (0, 0): * = adjusted p < 0.05 (Welch), {int(marks.sum())} of "
                       f"{int(np.isfinite(right).sum()) - 1} cells")
        lim = np.nanmax(np.abs(right)) if np.isfinite(right).any() and np.nanmax(np.abs(right)) > 0 else 1.0
        f = ours[np.isfinite(ours)]
        scales = [((f.min(), f.max()) if f.size else (0.0, 1.0)) + ("viridis",), (-lim, lim, "RdBu")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, data, sub, (lo, hi, cmap_name), diff in ((axes[0], ours, "Ours: best-epoch top-1 (%), mean over seeds",
                                                      scales[0], False), (axes[1], right, right_title, scales[1],
                                                                          not comparable)):
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=lo, vmax=hi)
        for u in range(size):
            for v in range(size):
                value = data[u, v]
                if not np.isfinite(value):
                    text = "missing"
                else:
                    text = f"{value:+.2f}" if diff else f"{value:.2f}"
                    text += " *" if diff and marks[u, v] else ""
                frac = (value - lo) / (hi - lo) if np.isfinite(value) and hi > lo else 0.5
                light_bg = (0.25 < frac < 0.75) if diff else (frac >= 0.6 or not np.isfinite(value))
                ax.text(v, u, text, ha="center", va="center", fontsize=7 if size > 5 else 9,
                        color="black" if light_bg else "white")
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
        ax.set_xlabel("v (horizontal frequency)")
        ax.set_ylabel("u (vertical frequency)")
        ax.set_title(sub, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="top-1 difference (points)" if diff else "top-1 (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- k-studies
def reference_values(plan: Plan) -> tuple[Optional[list[float]], str]:
    """Best-epoch top-1 per seed of the SE-equivalent trained from scratch: FCA with the single frequency (0, 0),
    i.e. the Low-k study's k=1 runs (``lowk/published/low1-s*``) of the same preset and runs directory."""
    spec = plan.preset.studies.lowk
    values = []
    for run_dir in sorted((plan.runs_root / "lowk" / "published").glob("low1-s*")):
        if is_complete(run_dir, spec.epochs):
            v = _num(read_summary(run_dir), BEST)
            if v is not None:
                values.append(v)
    return (values or None), "lowk k=1, i.e. (0,0)"


def collect_k(plan: Plan, out: Path, records) -> list[Path]:
    fname, table_name, label = PAPER_TABLES[plan.study]
    paper = {int(r["k"]): r for r in _read_csv(fname)}
    comparable = plan.preset.paper_comparable
    method = STUDY_METHOD[plan.study]
    ks = list(plan.preset.study(plan.study).ks)
    rows, values = [], {}
    for k in ks:
        point = f"{method}{k}"
        values[point] = point_values(records, point, BEST)
        best, final = st.summarize(values[point]), st.summarize(point_values(records, point, FINAL))
        top5 = st.summarize(point_values(records, point, "final_top5"))
        freqs = next(r["run"].meta["frequencies"] for r in records if r["run"].point == point)
        p1 = float(paper[k]["top1"]) if k in paper else None
        p5 = float(paper[k]["top5"]) if k in paper else None
        rows.append({"key": point, "k": k, "n": best["n"], **stat_columns("best_top1", best),
                     **stat_columns("final_top1", final), "final_top5_mean": _r(top5["mean"]),
                     "final_top5_std": _r(top5["std"]), "paper_top1": p1, "paper_top5": p5,
                     "diff_top1": _r(best["mean"] - p1) if comparable and best["n"] and p1 is not None else None,
                     "freq_source": plan.freq_source, "frequencies": json.dumps(freqs),
                     "is_reference": freqs == [[0, 0]]})
    reference, ref_label = reference_values(plan)
    own = [r for r in rows if r["is_reference"] and values[r["key"]]]
    if own:  # this study's own (0, 0) row (Low-k k=1, or Top-k k=1 when (0, 0) ranks first)
        reference = values[own[0]["key"]]
        ref_label = f"k={own[0]['k']}, i.e. (0,0)"
    compare_rows(rows, values, reference, ref_label)
    header = ["k", "n", *stat_header("best_top1"), *stat_header("final_top1"), "final_top5_mean", "final_top5_std",
              "diff_vs_best", "p_vs_best", "diff_vs_00", "p_vs_00", "paper_top1", "paper_top5", "diff_top1",
              "freq_source", "frequencies"]
    source_text = {"published": ("the fixed Low-k order (appendix Fig. 5b; on other grids, restricted to the grid)"
                                 if plan.study == "lowk" else "the authors' published order (our single_freq grid "
                                                              "is not complete)"),
                   "measured": "the two-step criterion on our own measured single_freq grid (mean best-epoch "
                               "top-1 over seeds)"}[plan.freq_source]
    mismatched = [r["run"].name for r in records if r["recorded"] and
                  r["recorded"].get("frequencies") not in (None, r["run"].meta.get("frequencies"))]
    dataset = plan.preset.dataset
    md = [f"# {table_name}: {label} frequency selection ({plan.preset.name} preset)", "",
          f"Top-1 accuracy (%) with k frequencies, trained from scratch "
          f"({plan.preset.study(plan.study).epochs} epochs); data: {dataset}; {plan.seeds} seed(s) planned "
          f"per k. {paper_note(plan.preset)}", "",
          f"Frequency source: **{plan.freq_source}** ({source_text}).", ""]
    if mismatched:
        md += [f"Warning: runs {', '.join(mismatched)} were started with other frequencies than listed here.", ""]
    md += protocol_notes(plan, records)
    md += [f"Significance: {st.TEST_NAME}; `*`: adjusted p < {st.ALPHA:g}. Reference (0,0): "
           + (ref_label if reference else "none (run `--study lowk`: its k=1 runs are the (0,0) reference)") + ".",
           "",
           "| k | best top-1 | 95% interval | final top-1 | final top-5 | vs best row | vs (0,0) | paper top-1 |"
           + (" Δ best − paper |" if comparable else ""), "|---|---|---|---|---|---|---|---|"
           + ("---|" if comparable else "")]
    for r in rows:
        top5 = {"n": r["n"], "mean": r["final_top5_mean"], "std": r["final_top5_std"]}
        md.append(f"| {r['k']} | {fmt_ours(_stats_of(r, 'best_top1'))} | {fmt_ci(_stats_of(r, 'best_top1'))} | "
                  f"{fmt_ours(_stats_of(r, 'final_top1'))} | {fmt_ours(top5)} | {cell_vs(r, 'best')} | "
                  f"{cell_vs(r, '00')} | {fmt(r['paper_top1'])} |"
                  + (f" {fmt_diff(r['best_top1_mean'], r['paper_top1'])} |" if comparable else ""))
    md += ["", "Frequencies (u, v) per k, in order:", ""]
    md += [f"- k={r['k']}: {', '.join(f'({u},{v})' for u, v in json.loads(r['frequencies']))}" for r in rows]
    md += [""]
    if plan.freq_source == "measured":
        md += stability_section(plan, plan.preset.grid_size)
    curve = f"{plan.study}_curve.png"
    write_atomic(out / "table.csv", csv_text(header, rows))
    write_atomic(out / "runs.csv", csv_text(RUNS_HEADER, runs_rows(records)))
    write_atomic(out / "table.md", "\n".join(md))
    title = f"{label} ({plan.preset.name} preset, source: {plan.freq_source}, n = {plan.seeds} seed(s))\n{dataset}"
    write_atomic(out / curve, curve_png(rows, title, separate_axes=not comparable))
    return [out / "table.csv", out / "table.md", out / "runs.csv", out / curve]


def curve_png(rows, title: str, separate_axes: bool = False) -> bytes:
    """Best-epoch top-1 vs k, ours (mean with the 95% interval over seeds) and the paper's. ``separate_axes``:
    the paper's values on their own right-hand axis (a preset on other data, whose scale has nothing to do
    with them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        lo = [r["best_top1_mean"] - (r["best_top1_ci_low"] if r["best_top1_ci_low"] is not None
                                     else r["best_top1_mean"]) for r in have]
        hi = [(r["best_top1_ci_high"] if r["best_top1_ci_high"] is not None else r["best_top1_mean"])
              - r["best_top1_mean"] for r in have]
        ax.errorbar([r["k"] for r in have], [r["best_top1_mean"] for r in have], yerr=[lo, hi], fmt="o-",
                    color="tab:blue", capsize=3, label="ours: best-epoch top-1, mean and 95% interval")
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
    ax.legend(fontsize=8, loc="upper left" if separate_axes else "best")
    ax.set_title(title, fontsize=8)
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
