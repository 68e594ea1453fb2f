"""The numbers of the ablation tables, computed from the records of a plan (no Markdown here).

Design: a seed is a whole replicate, so every comparison is paired within seeds (:func:`ablation.stats.paired`),
families of comparisons are Holm-adjusted, and every table carries the minimal detectable difference of its
own design (observed paired spread, number of seeds).
"""
from __future__ import annotations

import math
from typing import Any

from . import stats as st
from .records import BEST, FINAL, Record, curve, point_values
from .studies import Plan, grid_points


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def stat_columns(prefix: str, s: dict[str, Any]) -> dict[str, Any]:
    """Columns of one statistic; the interval is clipped to the possible range of an accuracy, [0, 100]."""
    lo = None if s["ci_low"] is None else max(0.0, s["ci_low"])
    hi = None if s["ci_high"] is None else min(100.0, s["ci_high"])
    return {f"{prefix}_mean": _r(s["mean"]), f"{prefix}_std": _r(s["std"]), f"{prefix}_ci_low": _r(lo),
            f"{prefix}_ci_high": _r(hi)}


def diff_columns(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_mean": _r(d.get("mean")), f"{prefix}_ci_low": _r(d.get("ci_low")),
            f"{prefix}_ci_high": _r(d.get("ci_high")), f"{prefix}_n": d.get("n"), f"{prefix}_p": _r(d.get("p"), 6),
            f"{prefix}_p_holm": _r(d.get("p_holm"), 6)}


def holm_family(diffs: list[dict[str, Any]]) -> None:
    """Add ``p_holm`` to each paired result of one family of comparisons."""
    for d, p in zip(diffs, st.holm([d.get("p") for d in diffs]), strict=True):
        d["p_holm"] = p


def pooled_paired_sd(diffs: list[dict[str, Any]]) -> float | None:
    """sd of a paired difference pooled over a family (root mean of the variances; n >= 2 only)."""
    variances = [d["std"] ** 2 for d in diffs if d.get("std") is not None]
    return math.sqrt(sum(variances) / len(variances)) if variances else None


def power(sd: float | None, n: int, comparisons: int) -> dict[str, Any]:
    return {"paired_sd": _r(sd), "n": n, "comparisons": comparisons, "mdd": _r(st.mdd(sd, n)),
            "mdd_holm": _r(st.mdd(sd, n, comparisons))}


def compare(rows: list[dict[str, Any]], against: dict[str, Any]) -> dict[str, Any] | None:
    """Paired comparisons of every row's ``values`` (one family per name, Holm-adjusted): ``against[name](row)``
    gives the other side's ``{seed: value}`` (falsy: no comparison), and ``vs_best`` compares with the row of
    the highest mean. Adds ``is_best``, ``<name>`` (the paired result) and its columns to each row; returns
    the best row."""
    have = [r for r in rows if r["n"]]
    top = max(have, key=lambda r: r["best_top1_mean"]) if have else None
    against = {**against, "vs_best": lambda r: top["values"] if top is not None and r is not top else None}
    for name, other in against.items():
        family = []
        for r in rows:
            side = other(r)
            r[name] = st.paired(r["values"], side) if side else {}
            if r[name]:
                family.append(r[name])
        holm_family(family)
        for r in rows:
            r.update(diff_columns(name, r[name]))
    for r in rows:
        r["is_best"] = r is top
    return top


# ------------------------------------------------------------------------------------------ single_freq
def plateau(points: list[dict[str, float]], window: int, tol: float) -> dict[str, Any]:
    """The base's plateau criterion: the best val top-1 of the last ``window`` evaluations exceeds the best
    before them by less than ``tol`` points."""
    vals = [p["val_top1"] for p in points]
    if len(vals) <= window:
        return {"gain": None, "reached": None}
    gain = max(vals[-window:]) - max(vals[:-window])
    return {"gain": _r(gain, 2), "reached": gain < tol}


def single_freq(plan: Plan, records: list[Record]) -> dict[str, Any]:
    """Rows per grid point, the blocked test of "does the frequency matter", attention vs control, base curves,
    power."""
    size = plan.preset.grid_size
    best, final = point_values(records, BEST), point_values(records, FINAL)
    keys = [f"u{u}v{v}" for u, v in grid_points(size)]
    control = best.get("control", {})
    rows = []
    for (u, v), key in zip(grid_points(size), keys, strict=True):
        b, f = best.get(key, {}), final.get(key, {})
        rows.append({"key": key, "u": u, "v": v, "n": len(b), "values": b,
                     **stat_columns("best_top1", st.summarize([b[s] for s in sorted(b)])),
                     **stat_columns("final_top1", st.summarize([f[s] for s in sorted(f)]))})
    reference = best.get("u0v0", {})
    top = compare(rows, {"vs_control": lambda r: control,
                         "vs_00": lambda r: reference if r["key"] != "u0v0" else None})
    seeds, matrix = st.complete_blocks(best, keys)
    blocked = st.blocked_test(matrix)
    resid = st.residual_sd(matrix)
    out = {"rows": rows, "best_key": top["key"] if top else None, "blocked": blocked, "blocks": seeds,
           "power": power(None if resid is None else resid * math.sqrt(2), len(seeds), len(keys) - 1)}
    means = [r["best_top1_mean"] for r in rows if r["n"]]
    out["span"] = _r(max(means) - min(means)) if means else None
    out["bases"] = bases(plan, records, best, final)
    out["attention"] = attention_effect(best, control, keys)
    out["vs_base"] = versus_base(best, keys, best.get("base", {}))
    return out


def bases(plan: Plan, records: list[Record], best, final) -> list[dict[str, Any]]:
    """Per seed: the base's best/final top-1, its curve and plateau verdict, and its control."""
    spec = plan.preset.base
    out = []
    for rec in records:
        if rec.run.role != "base":
            continue
        seed = rec.run.seed or 0
        points = curve(rec.run.run_dir) if rec.summary else []
        out.append({"seed": seed, "complete": rec.summary is not None, "best": rec.value(BEST),
                    "best_epoch": rec.value("best_epoch"), "final": rec.value(FINAL),
                    "train_top1": points[-1]["train_top1"] if points else None, "curve": points,
                    **plateau(points, spec.plateau_window, spec.plateau_tol),
                    "control_best": best.get("control", {}).get(seed),
                    "control_final": final.get("control", {}).get(seed)})
    return out


def attention_effect(best, control, keys) -> dict[str, Any]:
    """Per seed, the mean over its fine-tunes of (fine-tune - control); paired over seeds against 0."""
    per_seed = {}
    for seed, c in control.items():
        vals = [best[k][seed] for k in keys if seed in best.get(k, {})]
        if vals:
            per_seed[seed] = sum(vals) / len(vals) - c
    result = st.paired(per_seed, {s: 0.0 for s in per_seed})
    return {**result, "per_seed": per_seed, "mdd": _r(st.mdd(result.get("std"), result["n"]))}


def versus_base(best, keys, base) -> dict[str, Any]:
    """Fine-tunes vs their own seed's base, best epoch vs best epoch (it includes the extra training)."""
    diffs = [best[k][s] - base[s] for k in keys for s in best.get(k, {}) if s in base]
    return {"n": len(diffs), "mean": _r(sum(diffs) / len(diffs)) if diffs else None,
            "below": sum(d < 0 for d in diffs)}


# --------------------------------------------------------------------------------------------- k-studies
def kstudy(plan: Plan, records: list[Record], reference: dict[int, float], ref_label: str) -> dict[str, Any]:
    """Rows per k; paired comparisons with the (0,0) reference (GAP) and the best row; power."""
    best, final, top5 = (point_values(records, key) for key in (BEST, FINAL, "final_top5"))
    cells = plan.preset.grid_size ** 2
    by_point = {r.point: r for r in plan.points}
    rows = []
    for k in plan.preset.study(plan.study).ks:
        point = f"{plan.points[0].meta['method']}{k}"
        run = by_point[point]
        b = best.get(point, {})
        rows.append({"key": point, "k": k, "n": len(b), "values": b, "frequencies": run.meta.get("frequencies"),
                     **stat_columns("best_top1", st.summarize([b[s] for s in sorted(b)])),
                     **stat_columns("final_top1", st.summarize(list(final.get(point, {}).values()))),
                     "final_top5_mean": _r(st.summarize(list(top5.get(point, {}).values()))["mean"]),
                     "whole_grid": k == cells, "shared_with": run.meta.get("shared_with"),
                     "is_reference": run.meta.get("frequencies") == [[0, 0]]})
    compare(rows, {"vs_00": lambda r: reference if not r["is_reference"] else None})
    family = [r["vs_00"] for r in rows if r["vs_00"]]
    n = min((d["n"] for d in family), default=0)
    return {"rows": rows, "reference": ref_label if reference else None,
            "power": power(pooled_paired_sd(family), n, max(1, len(family)))}


# ------------------------------------------------------------------------------------------------ claims
CLAIMS = (("top_vs_low", "Top-k > Low-k", "topk", "lowk"),
          ("top_vs_bot", "Top-k > Bot-k", "topk", "botk"),
          ("top_vs_gap", "Top-k (k > 1) > GAP (k = 1)", "topk", "gap"))


def claims(sides: dict[str, dict[str, Any]], paper: dict[str, dict[int, float]], cells: int) -> list[dict]:
    """The paper's claims as paired tests over seeds, per k and pooled over k.

    ``sides[study]``: ``{"values": {k: {seed: top-1}}, "freqs": {k: [[u, v], ...]}, "shared": {k: name}}`` for
    topk, lowk and botk; ``sides["gap"]["values"]``: ``{1: {seed: top-1}}`` (the (0,0) runs). ``paper[study]``:
    ``{k: top-1}`` (Tables 1, 5, 6; ``gap``: the k = 1 row). A per-k comparison is left out of the pooled test
    (and flagged) when it cannot test the claim: the same frequencies on both sides (k equal to the whole grid;
    or the same list in the same order), or a side selected as the best/worst of these very runs.
    Verdicts: supported / contradicted (Holm-adjusted p < alpha, by the sign) or not resolved at this power."""
    rows = []
    for claim, text, a, b in CLAIMS:
        per_k = []
        for k in sorted(sides[a]["values"]):
            kb = 1 if b == "gap" else k
            if b == "gap" and k == 1:
                continue
            if kb not in sides[b]["values"]:  # not planned on the other side
                continue
            d = st.paired(sides[a]["values"][k], sides[b]["values"][kb])
            flag = claim_flag(sides, a, b, k, kb, cells)
            paper_gap = (paper[a][k] - paper[b][kb]) if k in paper[a] and kb in paper[b] else None
            per_k.append({"claim": claim, "text": text, "k": k, **d, "flag": flag, "paper_a": paper[a].get(k),
                          "paper_b": paper[b].get(kb), "paper_gap": paper_gap,
                          "ours_a": mean_of(sides[a]["values"][k]), "ours_b": mean_of(sides[b]["values"][kb])})
        holm_family(per_k)
        valid = [r for r in per_k if not r["flag"]]
        rows += per_k
        rows.append(pooled_claim(claim, text, sides, a, b, valid))
    pooled = [r for r in rows if r["k"] == "pooled"]
    holm_family(pooled)
    for r in rows:
        r["mdd"] = _r(st.mdd(r.get("std"), r.get("n", 0)))
        r["verdict"] = verdict(r)
        r["paper_above_mdd"] = (None if r.get("paper_gap") is None or r["mdd"] is None
                                else abs(r["paper_gap"]) >= r["mdd"])
    return rows


def mean_of(values: dict[int, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


def claim_flag(sides, a, b, k, kb, cells) -> str:
    fa, fb = sides[a]["freqs"].get(k), sides[b]["freqs"].get(kb)
    if b != "gap" and k == cells:
        return "whole grid: both sides hold the same frequencies"
    if fa is not None and fa == fb:
        return "same frequencies in the same order: the same network"
    for side, kk in ((a, k), (b, kb)):
        if sides[side].get("selected", {}).get(kk):
            return f"{sides[side]['selected'][kk]}: selected as the best/worst of these very runs"
    return ""


def pooled_claim(claim, text, sides, a, b, valid) -> dict[str, Any]:
    """Per seed, the mean over the valid k of (a - b); paired over the seeds that have every valid k."""
    if not valid:
        return {"claim": claim, "text": text, "k": "pooled", "n": 0, "mean": None, "p": None, "flag": "no valid k",
                "ks": []}
    ks = [r["k"] for r in valid]
    pairs = [(sides[a]["values"][k], sides[b]["values"][1 if b == "gap" else k]) for k in ks]
    seeds = set.intersection(*(set(x) & set(y) for x, y in pairs))
    per_seed = {s: sum(x[s] - y[s] for x, y in pairs) / len(pairs) for s in seeds}
    d = st.paired(per_seed, {s: 0.0 for s in per_seed})
    gaps = [r["paper_gap"] for r in valid if r["paper_gap"] is not None]
    return {"claim": claim, "text": text, "k": "pooled", **d, "flag": "", "ks": ks,
            "paper_gap": sum(gaps) / len(gaps) if len(gaps) == len(valid) else None,
            "ours_a": None, "ours_b": None, "paper_a": None, "paper_b": None}


def verdict(row: dict[str, Any]) -> str:
    if not row.get("n"):
        return "no runs yet"
    if row.get("flag"):
        return "not a test" if row["k"] != "pooled" else "not resolved at this power"
    p = row.get("p_holm", row.get("p"))
    if p is not None and p < st.ALPHA and row.get("mean") is not None:
        return "supported" if row["mean"] > 0 else "contradicted"
    return "not resolved at this power"
