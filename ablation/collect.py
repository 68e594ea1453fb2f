"""Tables and figures of a study from its runs' ``summary.json`` files, next to the paper's numbers.

Writes ``<output>/<study>/``: ``table.md`` (rendered from ``ablation/templates``), ``table.csv`` (one row per
point: statistics over seeds, paired comparisons, the paper's value), ``runs.csv`` (one row per run, with its
machine), ``stats.json`` (the table-level tests and power) and PNG figures: ``fig4_heatmap.png`` for
``single_freq``, ``<study>_curve.png`` for the k-studies; and ``<output>/claims/`` (:func:`collect_claims`).
The numbers come from :mod:`ablation.analysis`. Missing runs show as missing, never as zero. All files of a
call are written together or not at all (:func:`ablation.output.write_files`).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from models.dct import GRID, rank_frequencies

from . import analysis
from . import stats as st
from .figures import curve_png, heatmap_png
from .output import csv_text, write_files
from .preset import REPO
from .records import BEST, FINAL, Record, gather, mixed_points, point_values, provenance
from .render import bullets, fmt, fmt_ci, fmt_diff, fmt_ours, fmt_p, freq_list, join, md_table, render
from .studies import Plan, build_plan

PAPER_DIR = REPO / "results" / "paper"
PAPER_TABLES = {"topk": ("table1_topk.csv", "Table 1", "Top-k"), "lowk": ("table5_lowk.csv", "Table 5", "Low-k"),
                "botk": ("table6_botk.csv", "Table 6", "Bot-k")}
RUNS_HEADER = ["run", "point", "seed", "status", "epochs", "freq_source", "frequencies", "best_top1", "best_epoch",
               "final_top1", "final_top5", "gpu_hours", "machine", "git_commit", "shared_with", "run_dir"]
DIFFS = ("vs_control", "vs_00", "vs_best")


def _read_csv(name: str) -> list[dict[str, str]]:
    with open(PAPER_DIR / name, newline="") as f:
        return list(csv.DictReader(f))


def paper_k(study: str) -> dict[int, float]:
    return {int(r["k"]): float(r["top1"]) for r in _read_csv(PAPER_TABLES[study][0])}


def _display_path(path: Path) -> str:
    """Relative to the repository when inside it (committed tables carry no machine-specific prefix)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def diff_header(prefix: str) -> list[str]:
    return [f"{prefix}_{k}" for k in ("mean", "ci_low", "ci_high", "n", "p", "p_holm")]


def stat_header(prefix: str) -> list[str]:
    return [f"{prefix}_{k}" for k in ("mean", "std", "ci_low", "ci_high")]


def runs_rows(records: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        run, s = rec.run, rec.summary
        freqs = (rec.meta or {}).get("frequencies", run.meta.get("frequencies"))
        rows.append({"run": run.name, "point": run.point, "seed": run.overrides.get("seed"),
                     "status": "complete" if s else "missing", "epochs": run.epochs,
                     "freq_source": run.meta.get("freq_source"),
                     "frequencies": json.dumps(freqs) if freqs is not None else None,
                     "best_top1": rec.value(BEST), "best_epoch": rec.value("best_epoch"),
                     "final_top1": rec.value(FINAL), "final_top5": rec.value("final_top5"),
                     "gpu_hours": rec.value("gpu_hours"),
                     "machine": rec.machine, "git_commit": (s or {}).get("git_commit"),
                     "shared_with": run.meta.get("shared_with"), "run_dir": _display_path(run.run_dir)})
    return rows


def stats_of(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {"n": row["n"], "mean": row[f"{prefix}_mean"], "std": row[f"{prefix}_std"]}


def ci_of(row: dict[str, Any], prefix: str = "best_top1") -> str:
    return fmt_ci(row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"])


# --------------------------------------------------------------------------------------- shared sections
def protocol(plan: Plan) -> str:
    """The protocol bullets: every choice behind the numbers of this table."""
    preset, fr = plan.preset, "fragments"
    points = plan.points
    cfg = points[0].settings if points else None
    items = [render(fr, "best_vs_final")]
    if cfg:
        amp = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "off": "fp32"}[cfg["train"]["amp"]]
        items.append(render(fr, "precision", amp=amp))
        items.append(recipe(plan, cfg))
    items += [render(fr, "baselines"), render(fr, "statistics", alpha=f"{st.ALPHA:g}", power=f"{st.POWER:.0%}")]
    if not preset.paper_comparable:
        items.append(render(fr, "not_paper", dataset=preset.dataset, description=preset.description))
    return join(render(fr, "protocol_title"), bullets(items))


def recipe(plan: Plan, cfg: dict[str, Any]) -> str:
    fr, train, optim = "fragments", cfg["train"], cfg["optim"]
    if plan.study == "single_freq":
        if plan.finetune_schedule == "paper-code":
            length = train["schedule_epochs"]
            schedule = render(fr, "schedule_paper_code", length=length, warmup=f"{train['warmup_epochs']:g}",
                              rest=f"{length - train['warmup_epochs']:g}", epochs=train["epochs"])
        else:
            schedule = render(fr, "schedule_ours", warmup=f"{train['warmup_epochs']:g}", epochs=train["epochs"])
        base = next((r.settings for r in plan.runs if r.role == "base"), None)
        ratio = ""
        if base and base["optim"]["base_lr"]:
            ratio = render(fr, "lr_ratio", ratio=f"{optim['base_lr'] / base['optim']['base_lr']:.2g}",
                           base_lr=f"{base['optim']['base_lr']:g}", epochs=train["epochs"],
                           base_epochs=base["train"]["epochs"])
        return render(fr, "finetune_lr", lr=f"{optim['base_lr']:g}", batch=train["batch_size"], ratio=ratio,
                      schedule=schedule)
    start = plan.preset.study(plan.study).start
    return render(fr, f"recipe_{start}", epochs=train["epochs"], lr=f"{optim['base_lr']:g}",
                  warmup=f"{train['warmup_epochs']:g}", smoothing=f"{train['label_smoothing']:g}")


def provenance_text(records: list[Record], mixed: bool) -> str:
    fr = "fragments"
    prov = provenance(records)
    machines = (render(fr, "machines", list="; ".join(f"{m} ({n} runs)" for m, n in prov["machines"].most_common()))
                if prov["machines"] else render(fr, "machines_none"))
    if prov["cpu_counts"]:
        machines += " " + render(fr, "cpu_counts", list=", ".join(
            f"{c} logical CPUs ({n} runs)" for c, n in sorted(prov["cpu_counts"].items())))
    if mixed:
        machines = render(fr, "mixed") + " " + machines
    commits = (render(fr, "commits", list=", ".join(f"{c[:12]} ({n} runs)" for c, n in prov["commits"].most_common()))
               if prov["commits"] else "")
    unrecorded = (render(fr, "unrecorded", count=prov["unrecorded"], complete=prov["complete"])
                  if prov["unrecorded"] else "")
    return render(fr, "provenance", machines=machines, commits=commits, unrecorded=unrecorded)


def power_text(power: dict[str, Any], fragment: str, records: list[Record], span: float | None = None) -> str:
    fr = "fragments"
    counts = sorted({int(c) for c in (r.value("val_count") for r in records) if c})
    image = render(fr, "one_image", points=f"{100 / counts[0]:.2f}", count=counts[0]) if len(counts) == 1 else ""
    if power["mdd"] is None:
        return join(render(fr, "power_missing", n=power["n"]), image)
    span_text = render(fr, "span", span=fmt(span), mdd=fmt(power["mdd"])) if span is not None else ""
    return join(render(fr, fragment, sd=fmt(power["paired_sd"]), n=power["n"], alpha=f"{st.ALPHA:g}",
                       power=f"{st.POWER:.0%}", mdd=fmt(power["mdd"]), mdd_holm=fmt(power["mdd_holm"]),
                       m=power["comparisons"], span_text=span_text), image)


def stability(plan: Plan, values: dict[tuple[int, int], dict[int, float]]) -> str:
    """The two-step criterion's Top-k and Bot-k sets under resampling whole seeds."""
    size = plan.preset.grid_size
    ks = [k for k in plan.preset.studies.topk.ks if k < size * size]
    seeds, _ = st.complete_blocks(values, sorted(values)) if len(values) == size * size else ([], None)
    if len(seeds) < 2 or not ks:
        return render("fragments", "stability_missing", cells=size * size, blocks=len(seeds))
    rows = []
    for name, descending in (("Top-k", True), ("Bot-k", False)):
        for k, res in st.set_stability(values, ks, descending).items():
            (wu, wv), share = min(res["inclusion"].items(), key=lambda kv: kv[1])
            rows.append([name, k, freq_list(res["set"]), f"{res['p_same']:.2f}", f"{res['jaccard']:.2f}",
                         f"({wu},{wv}) {share:.0%}"])
    table = md_table(["list", "k", "observed set", "P(same set)", "Jaccard", "weakest member"], rows)
    return render("fragments", "stability", resamples=st.BOOTSTRAP_RESAMPLES, seeds=len(seeds), table=table)


# ------------------------------------------------------------------------------------------ single_freq
def collect_single_freq(plan: Plan, records: list[Record], out: Path, mixed: set) -> dict[Path, Any]:
    size, preset = plan.preset.grid_size, plan.preset
    res = analysis.single_freq(plan, records)
    rows = res["rows"]
    on_paper_grid = size == GRID
    paper = {(int(r["u"]), int(r["v"])): r for r in _read_csv("fig4_single_frequency.csv")} if on_paper_grid else {}
    comparable = preset.paper_comparable and on_paper_grid
    for r in rows:
        p = paper.get((r["u"], r["v"]))
        r["paper_top1"] = float(p["top1_fig4"]) if p else None
        r["paper_top1_unrounded"] = float(p["top1_unrounded"]) if p else None
        r["diff_top1"] = (round(r["best_top1_mean"] - r["paper_top1"], 4)
                          if comparable and r["n"] and r["paper_top1"] is not None else None)
    header = ["u", "v", "n", *stat_header("best_top1"), *stat_header("final_top1"),
              *[h for d in DIFFS for h in diff_header(d)], "paper_top1", "paper_top1_unrounded", "diff_top1"]
    fr = "fragments"
    page = render("single_freq", preset=preset.name, size=size, dataset=preset.dataset,
                  measured=sum(1 for r in rows if r["n"]), cells=size * size, seeds=plan.seeds,
                  blocked=blocked_text(res, size), attention=attention_text(plan, res),
                  power=power_text(res["power"], "power", records, res["span"]), bases=bases_text(plan, res),
                  grids=grids_text(rows, size, paper if on_paper_grid else None, comparable, mixed),
                  ranking_note=render(fr, "ranking_note", alpha=f"{st.ALPHA:g}"),
                  ranking=ranking_text(rows, paper, mixed),
                  stability=stability(plan, {(r["u"], r["v"]): r["values"] for r in rows if r["n"]}),
                  protocol=protocol(plan), provenance=provenance_text(records, bool(mixed)))
    base_best = [b["best"] for b in res["bases"] if b["best"] is not None]
    title = (f"{preset.name} preset: {preset.dataset}\n{plan.seeds} seed(s) planned, each with its own base"
             + (f" (base best top-1 {min(base_best):.2f}-{max(base_best):.2f})" if base_best else ""))
    paper_cells = {f: float(p["top1_fig4"]) for f, p in paper.items()} if comparable else None
    stats_json = {k: res[k] for k in ("blocked", "power", "attention", "vs_base", "span", "best_key")}
    stats_json["bases"] = [{k: v for k, v in b.items() if k != "curve"} for b in res["bases"]]
    return {out / "table.md": page + "\n", out / "table.csv": csv_text(header, rows),
            out / "runs.csv": csv_text(RUNS_HEADER, runs_rows(records)),
            out / "stats.json": json.dumps(stats_json, indent=2, default=str) + "\n",
            out / "fig4_heatmap.png": heatmap_png(rows, size, title, paper_cells)}


def blocked_text(res: dict[str, Any], size: int) -> str:
    b = res["blocked"]
    fr = "fragments"
    if b["p"] is None:
        fragment = "blocked_missing" if len(res["blocks"]) < 2 else "blocked_degenerate"
        return render(fr, fragment, cells=size * size, blocks=len(res["blocks"]))
    conclusion = render(fr, "blocked_yes" if b["p"] < st.ALPHA else "blocked_no", alpha=f"{st.ALPHA:g}")
    return render(fr, "blocked_test", blocks=len(res["blocks"]), cells=size * size, df1=b["df1"], df2=b["df2"],
                  f=fmt(b["f"]), p=fmt_p(b["p"]), seed_f=fmt(b["seed_f"]), seed_p=fmt_p(b["seed_p"]),
                  chi=fmt(b["friedman"]), friedman_p=fmt_p(b["friedman_p"]), conclusion=conclusion)


def attention_text(plan: Plan, res: dict[str, Any]) -> str:
    att, fr = res["attention"], "fragments"
    if not att["n"]:
        return render(fr, "attention_missing")
    verdict = "attention_no"
    if att["p"] is not None and att["p"] < st.ALPHA:
        verdict = "attention_yes" if att["mean"] > 0 else "attention_neg"
    vb = res["vs_base"]
    return render(fr, "attention", epochs=plan.preset.studies.single_freq.epochs, mean=fmt(att["mean"], 2, True),
                  ci=fmt_ci(att["ci_low"], att["ci_high"], True) or "n/a", n=att["n"], p=fmt_p(att["p"]),
                  mdd=fmt(att["mdd"]) or "n/a", verdict=render(fr, verdict), vs_base=fmt(vb["mean"], 2, True) or "n/a",
                  below=vb["below"], total=vb["n"])


def bases_text(plan: Plan, res: dict[str, Any]) -> str:
    spec, fr = plan.preset.base, "fragments"
    done = [b for b in res["bases"] if b["complete"]]
    rising = [b for b in done if b["reached"] is False]
    verdict = (render(fr, "bases_rising", rising=len(rising), total=len(done)) if rising
               else render(fr, "bases_plateau") if done else "")
    rows = []
    for b in res["bases"]:
        if not b["complete"]:
            rows.append([b["seed"], "missing", "", "", "", "", "", ""])
            continue
        curve_text = " ".join(f"{p['val_top1']:.1f}" for p in b["curve"]) or "not recorded"
        reached = {True: "yes", False: "**no**", None: "too short"}[b["reached"]]
        control = (fmt(b["control_best"]) + f" ({fmt(b['control_best'] - b['best'], 2, True)})"
                   if b["control_best"] is not None and b["best"] is not None else "missing")
        epoch = f" (epoch {int(b['best_epoch'])})" if b["best_epoch"] is not None else ""
        rows.append([b["seed"], f"{fmt(b['best'])}{epoch}", fmt(b["final"]),
                     fmt(b["train_top1"]), fmt(b["gain"], 2, True), reached, control, curve_text])
    table = md_table(["seed", "best top-1", "final", "last train top-1", f"gain in last {spec.plateau_window}",
                      "plateau", "control best (vs base)", "val top-1 by epoch"], rows)
    intro = render(fr, "bases_intro", window=spec.plateau_window, tol=f"{spec.plateau_tol:g}", verdict=verdict)
    return join(intro, table)


def grids_text(rows, size: int, paper: dict | None, comparable: bool, mixed: set) -> str:
    def grid(title: str, cell) -> str:
        table = md_table(["u \\ v", *map(str, range(size))],
                         [[f"**{u}**", *(cell(rows[u * size + v]) for v in range(size))] for u in range(size)])
        return join(f"### {title}", table)

    def mark(r) -> str:
        return " †" if r["key"] in mixed else ""

    blocks = [grid("Ours: best-epoch top-1, mean ± std (n)", lambda r: fmt_ours(stats_of(r, "best_top1")) + mark(r)),
              grid("Ours: final-epoch top-1, mean ± std (n)", lambda r: fmt_ours(stats_of(r, "final_top1"))),
              grid("Fine-tune minus the no-attention control (paired mean over seeds; * Holm p < 0.05)",
                   lambda r: (fmt(r["vs_control_mean"], 2, True) + (" *" if (r["vs_control_p_holm"] or 1) < st.ALPHA
                                                                    else "")) if r["vs_control_n"] else "n/a")]
    if paper is not None:
        blocks.append(grid("Paper (Fig. 4, best_prec1)", lambda r: fmt(r["paper_top1"])))
        if comparable:
            blocks.append(grid("Difference (ours best − paper)",
                               lambda r: fmt(r["diff_top1"], 2, True) if r["diff_top1"] is not None else "missing"))
    return join("## Grids", *blocks)


def ranking_text(rows, paper: dict, mixed: set) -> str:
    have = {(r["u"], r["v"]): r for r in rows if r["n"]}
    # the criterion's own order (its tie rule included), so the table and the derived Top-k lists agree
    ranked = [have[f] for f in rank_frequencies({f: r["best_top1_mean"] for f, r in have.items()}, True)]
    paper_rank = {}
    if paper:
        order = rank_frequencies({f: float(p["top1_unrounded"]) for f, p in paper.items()}, True)
        paper_rank = {f: i + 1 for i, f in enumerate(order)}
    out = []
    for i, r in enumerate(ranked):
        out.append([i + 1, f"({r['u']},{r['v']})" + (" †" if r["key"] in mixed else ""),
                    fmt_ours(stats_of(r, "best_top1")), ci_of(r), fmt_ours(stats_of(r, "final_top1")),
                    fmt_diff(r["vs_control"]), "best" if r["is_best"] else fmt_diff(r["vs_best"]),
                    "(0,0)" if r["key"] == "u0v0" else fmt_diff(r["vs_00"])]
                   + ([paper_rank.get((r["u"], r["v"]), "")] if paper else []))
    header = ["rank", "(u, v)", "best top-1", "95% interval", "final top-1", "minus control", "vs best",
              "vs (0,0)"] + (["paper rank"] if paper else [])
    return md_table(header, out)


# --------------------------------------------------------------------------------------------- k-studies
def reference_values(plan: Plan, allow_mixed: bool) -> tuple[dict[int, float], str]:
    """Best-epoch top-1 per seed of the SE-equivalent: FCA with the single frequency (0, 0), i.e. the Low-k
    study's k = 1 runs of the same preset, seeds and runs directory."""
    own = [r for r in plan.points if r.meta.get("frequencies") == [[0, 0]]]
    if plan.study == "lowk" and own:
        records = gather(plan, allow_mixed)
        return point_values(records).get(own[0].point, {}), f"this table's k = {own[0].meta['k']} row"
    lowk = build_plan("lowk", str(plan.preset_path), seeds=plan.seeds, runs_root=plan.runs_root)
    low1 = [r for r in lowk.points if r.meta.get("frequencies") == [[0, 0]]]
    if not low1:
        return {}, "none (the Low-k study has no k = 1)"
    values = point_values(gather(lowk, allow_mixed)).get(low1[0].point, {})
    return values, "the Low-k study's k = 1 runs (`--study lowk`)"


def collect_k(plan: Plan, records: list[Record], out: Path, mixed: set, allow_mixed: bool) -> dict[Path, Any]:
    fname, table_name, label = PAPER_TABLES[plan.study]
    preset, fr = plan.preset, "fragments"
    paper = {int(r["k"]): r for r in _read_csv(fname)}
    comparable = preset.paper_comparable
    reference, ref_label = reference_values(plan, allow_mixed)
    res = analysis.kstudy(plan, records, reference, ref_label)
    rows = res["rows"]
    for r in rows:
        p = paper.get(r["k"])
        r["paper_top1"] = float(p["top1"]) if p else None
        r["paper_top5"] = float(p["top5"]) if p else None
        r["diff_top1"] = (round(r["best_top1_mean"] - r["paper_top1"], 4)
                          if comparable and r["n"] and p is not None else None)
        r["freq_source"], r["frequencies_json"] = plan.freq_source, json.dumps(r["frequencies"])
        r["flags"] = "; ".join(f for f in (("whole grid" if r["whole_grid"] else ""),
                                           (f"shared with {r['shared_with']}" if r["shared_with"] else ""),
                                           ("mixed machines" if r["key"] in mixed else "")) if f)
    header = ["k", "n", *stat_header("best_top1"), *stat_header("final_top1"), "final_top5_mean",
              *diff_header("vs_00"), *diff_header("vs_best"), "paper_top1", "paper_top5", "diff_top1", "flags",
              "freq_source", "frequencies"]
    table_rows = []
    for r in rows:
        table_rows.append([r["k"], fmt_ours(stats_of(r, "best_top1")), ci_of(r), fmt_ours(stats_of(r, "final_top1")),
                           "(0,0)" if r["is_reference"] else fmt_diff(r["vs_00"]),
                           "best" if r["is_best"] else fmt_diff(r["vs_best"]), fmt(r["paper_top1"])]
                          + ([fmt(r["diff_top1"], 2, True)] if comparable else []) + [r["flags"]])
    results = md_table(["k", "best top-1", "95% interval", "final top-1", "vs (0,0)", "vs best", "paper top-1"]
                       + (["Δ best − paper"] if comparable else []) + ["flags"], table_rows)
    source = "pending" if plan.pending else ("low" if plan.study == "lowk" else plan.freq_source)
    mismatched = [rec.run.name for rec in records if rec.meta and rec.run.is_point and
                  rec.meta.get("frequencies") not in (None, rec.run.meta.get("frequencies"))]
    spec = preset.study(plan.study)
    page = render("kstudy", table=table_name, label=label, preset=preset.name,
                  start=render(fr, f"start_{spec.start}"), epochs=spec.epochs, dataset=preset.dataset,
                  seeds=plan.seeds, paper_note=render(fr, "paper_comparable" if comparable else "paper_other"),
                  source=plan.freq_source, source_text=render(fr, f"source_{source}", pending=plan.pending),
                  warnings=render(fr, "mismatched", runs=", ".join(mismatched)) if mismatched else "",
                  power=power_text(res["power"], "power_k", records),
                  results_note=render(fr, "k_results_note", alpha=f"{st.ALPHA:g}", reference=ref_label),
                  results=results,
                  frequencies=bullets([f"k={r['k']}: " + (freq_list(r["frequencies"]) if not plan.pending
                                                          else "pending") for r in rows]),
                  stability=stability_for_k(plan, allow_mixed), protocol=protocol(plan),
                  provenance=provenance_text(records, bool(mixed)))
    curve = f"{plan.study}_curve.png"
    title = f"{label} ({preset.name} preset, source: {plan.freq_source}, n = {plan.seeds} seed(s))\n{preset.dataset}"
    for r in rows:
        r["frequencies"] = r.pop("frequencies_json")
    return {out / "table.md": page + "\n", out / "table.csv": csv_text(header, rows),
            out / "runs.csv": csv_text(RUNS_HEADER, runs_rows(records)),
            out / "stats.json": json.dumps({"power": res["power"], "reference": res["reference"]}, indent=2) + "\n",
            out / curve: curve_png(rows, title, separate_axes=not comparable)}


def stability_for_k(plan: Plan, allow_mixed: bool) -> str:
    if plan.freq_source != "measured" or plan.pending:
        return ""
    sf = build_plan("single_freq", str(plan.preset_path), seeds=plan.seeds, runs_root=plan.runs_root)
    values = point_values(gather(sf, allow_mixed))
    return stability(plan, {(r.meta["u"], r.meta["v"]): values[r.point] for r in sf.points if r.point in values})


# ------------------------------------------------------------------------------------------------ claims
def claim_sides(plans: dict[str, Plan], allow_mixed: bool) -> tuple[dict[str, Any], list[Record]]:
    """The values, frequency lists and flags of each side of the claims, from the three k-study plans."""
    sides: dict[str, Any] = {}
    every: list[Record] = []
    for study, plan in plans.items():
        records = gather(plan, allow_mixed)
        every += records
        values = point_values(records)
        side = {"values": {}, "freqs": {}, "selected": {}}
        for run in plan.points:
            k = run.meta["k"]
            side["values"][k] = values.get(run.point, {})  # every planned k, measured or not
            if not plan.pending:
                side["freqs"][k] = run.meta["frequencies"]
            if run.meta.get("shared_with") and plan.freq_source == "measured":
                side["selected"][k] = f"shared with {run.meta['shared_with'].rsplit('-s', 1)[0]}"
        sides[study] = side
    low1 = [r.meta["k"] for r in plans["lowk"].points if r.meta.get("frequencies") == [[0, 0]]]
    sides["gap"] = {"values": {1: sides["lowk"]["values"].get(low1[0], {})} if low1 else {},
                    "freqs": {1: [[0, 0]]}, "selected": {}}
    return sides, every


def collect_claims(plans: dict[str, Plan], output: Path, allow_mixed: bool = False) -> list[Path]:
    """``<output>/claims/``: the paper's claims tested on the k-studies (table.md, claims.csv)."""
    preset, fr = plans["topk"].preset, "fragments"
    sides, records = claim_sides(plans, allow_mixed)
    paper = {s: paper_k(s) for s in ("topk", "lowk", "botk")}
    paper["gap"] = {1: paper_k("topk")[1]}
    rows = analysis.claims(sides, paper, preset.grid_size ** 2)
    table = []
    for r in rows:
        ks = f"pooled ({', '.join(map(str, r['ks']))})" if r["k"] == "pooled" and r.get("ks") else str(r["k"])
        paper_text = (f"{fmt(r['paper_a'])} vs {fmt(r['paper_b'])} ({fmt(r['paper_gap'], 2, True)})"
                      if r.get("paper_a") is not None else fmt(r.get("paper_gap"), 2, True))
        ours = f"{fmt(r['ours_a'])} vs {fmt(r['ours_b'])}" if r.get("ours_a") is not None else ""
        above = {True: "yes", False: "no", None: ""}[r["paper_above_mdd"]]
        table.append([r["text"], ks, paper_text, ours,
                      fmt(r.get("mean"), 2, True) or "n/a", fmt_ci(r.get("ci_low"), r.get("ci_high"), True),
                      fmt_p(r.get("p_holm")), r.get("n", 0), fmt(r["mdd"]) or "n/a", above, r["verdict"],
                      r.get("flag", "")])
    # pooled rows first within each claim read best: order claim by claim, pooled last (already)
    md = md_table(["claim", "k", "paper (gap)", "ours (mean)", "difference", "95% interval", "p (Holm)", "n",
                   "MDD", "paper ≥ MDD", "verdict", "flag"], table)
    flags = sorted({r["flag"].split(":")[0] for r in rows if r.get("flag")})
    complete = any(r.get("n") for r in rows)
    page = render("claims", preset=preset.name,
                  comparability=render(fr, "claims_comparable" if preset.paper_comparable else "claims_other"),
                  method=render(fr, "claims_method", alpha=f"{st.ALPHA:g}", power=f"{st.POWER:.0%}"),
                  table=md if complete else join(render(fr, "claims_missing"), md),
                  flags_note=render(fr, "claims_flags", list="; ".join(flags)) if flags and complete else "",
                  power_note="", provenance=provenance_text(records, bool(mixed_points(records))))
    header = ["claim", "text", "k", "n", "mean", "std", "ci_low", "ci_high", "p", "p_holm", "mdd", "paper_a",
              "paper_b", "paper_gap", "paper_above_mdd", "ours_a", "ours_b", "verdict", "flag"]
    out = Path(output) / "claims"
    return write_files({out / "table.md": page + "\n", out / "claims.csv": csv_text(header, rows)})


def collect(plan: Plan, output: Path, allow_mixed: bool = False) -> list[Path]:
    """Write the study's tables and figures into ``<output>/<study>/``; returns the paths written."""
    out = Path(output) / plan.study
    records = gather(plan, allow_mixed)  # validates every summary, settings and machine before anything is written
    mixed = mixed_points(records)
    if plan.study == "single_freq":
        files = collect_single_freq(plan, records, out, mixed)
    else:
        files = collect_k(plan, records, out, mixed, allow_mixed)
    return write_files(files)

