"""Statistics that match the design: paired within seeds, blocked tests, Holm, stated power, the paper's claims.

Tiny synthetic results with planted effects (no training): the paired analysis finds a 1-point effect that
Welch's test over seeds misses, and the claims table says "not resolved" for an effect below its printed
minimal detectable difference."""
import csv
from pathlib import Path

import numpy as np
import pytest

from ablation import stats
from ablation.cli import main
from ablation.studies import build_plan
from synthetic_runs import fill

SEED_SHIFT = [-3.0, 2.0, 0.5, 4.0, -2.5]          # seeds differ a lot (their own base, data order, init)
WOBBLE = [0.10, -0.05, 0.0, -0.10, 0.05]          # within a seed, a point moves little


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_paired_analysis_finds_a_planted_one_point_effect_that_welch_misses(tmp_path):
    runs = tmp_path / "runs"
    plan = build_plan("single_freq", "mini", runs_root=runs, seeds=5)

    def value(run):
        if run.role == "base":
            return 75.0 + SEED_SHIFT[run.seed]
        point = 1.0 if run.point == "u1v1" else 0.0  # the planted effect: (1,1) is one point better
        noise = WOBBLE[(run.seed + (run.meta.get("u", 0) * 4 + run.meta.get("v", 0)) // 2) % 5]
        return 80.0 + SEED_SHIFT[run.seed] + point + noise

    fill(plan, value)
    assert main(["collect", "--study", "single_freq", "--preset", "mini", "--runs-dir", str(runs),
                 "--seeds", "5"]) == 0
    table = {(r["u"], r["v"]): r for r in rows(runs / "tables/single_freq/table.csv")}
    planted = table[("1", "1")]
    assert float(planted["vs_00_mean"]) == pytest.approx(1.0, abs=0.2)
    assert float(planted["vs_00_p_holm"]) < 0.05  # paired over seeds, Holm over 15 comparisons
    others = [r for k, r in table.items() if k not in (("0", "0"), ("1", "1"))]
    assert all(r["vs_00_p_holm"] == "" or float(r["vs_00_p_holm"]) > 0.05 for r in others)  # "": no spread
    a = [float(v) for v in planted_values(runs, "u1v1")]
    b = [float(v) for v in planted_values(runs, "u0v0")]
    assert stats.welch_p(a, b) > 0.5  # the seed spread swamps it when the pairing is ignored
    md = (runs / "tables/single_freq/table.md").read_text()
    assert "**The frequency matters**" in md and "Minimal detectable difference" in md
    power = stats.mdd(stats.residual_sd(stats.complete_blocks(
        {k: dict(enumerate(map(float, planted_values(runs, k)))) for k in ("u0v0", "u1v1", "u2v2")},
        ["u0v0", "u1v1", "u2v2"])[1]) * 2 ** 0.5, 5)
    assert power < 1.0  # the design can resolve 1 point, and says so


def planted_values(runs: Path, point: str) -> list[str]:
    return [r["best_top1"] for r in rows(runs / "tables/single_freq/runs.csv") if r["point"] == point]


def test_claims_verdicts_follow_the_power(tmp_path):
    """Top-k vs Low-k planted at +0.2 (below the MDD: not resolved), vs Bot-k at +3 (supported), vs GAP at -2
    (contradicted); k=1 of Top-k and Low-k is the same (0,0) network: flagged, not a test."""
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    noise = {}
    level = {"topk": 0.0, "lowk": -0.2, "botk": -3.0}
    for study in ("lowk", "topk", "botk"):
        plan = build_plan(study, "imagenet", runs_root=runs, seeds=4)

        def value(run, study=study):
            key = (study, run.meta["k"], run.seed)
            noise.setdefault(key, rng.normal(0, 0.4))
            gap_boost = 2.0 if study == "lowk" and run.meta["k"] == 1 else 0.0  # GAP beats every Top-k by 2
            return 78.0 + SEED_SHIFT[run.seed] + level[study] + gap_boost + noise[key]

        fill(plan, value)
    assert main(["collect", "--study", "claims", "--preset", "imagenet", "--runs-dir", str(runs), "--seeds", "4"]) == 0
    claims = rows(runs / "tables/claims/claims.csv")
    pooled = {r["claim"]: r for r in claims if r["k"] == "pooled"}
    low = pooled["top_vs_low"]
    assert low["verdict"] == "not resolved at this power" and abs(float(low["mean"])) < float(low["mdd"])
    assert pooled["top_vs_bot"]["verdict"] == "supported" and float(pooled["top_vs_bot"]["mean"]) > 2
    assert pooled["top_vs_gap"]["verdict"] == "contradicted"
    k1 = next(r for r in claims if r["claim"] == "top_vs_low" and r["k"] == "1")
    assert k1["verdict"] == "not a test" and "same network" in k1["flag"]
    assert pooled["top_vs_bot"]["paper_gap"] and float(pooled["top_vs_bot"]["paper_gap"]) > 0
    md = (runs / "tables/claims/table.md").read_text()
    for needle in ("Top-k > Low-k", "Top-k > Bot-k", "GAP (k = 1)", "MDD", "paper ≥ MDD", "supported",
                   "contradicted", "not resolved at this power", "Provenance"):
        assert needle in md, needle


def test_mdd_is_the_80_percent_power_difference():
    from scipy.stats import nct, t
    for sd, n, m in ((1.0, 3, 1), (1.76, 3, 1), (0.5, 10, 15)):
        d = stats.mdd(sd, n, m)
        crit = t.ppf(1 - 0.05 / (2 * m), n - 1)
        nc = d / sd * n ** 0.5
        assert nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8, abs=1e-4)
    assert stats.mdd(1.0, 100) == pytest.approx(0.2829, abs=1e-3)  # large n: (1.96 + 0.84) / 10, plus t's tails
    assert stats.mdd(1.0, 1) is None and stats.mdd(None, 5) is None and stats.mdd(0.0, 5) == 0.0
    assert stats.mdd(1.0, 5, 15) > stats.mdd(1.0, 5) > stats.mdd(1.0, 10)


def test_blocked_anova_with_two_points_is_the_paired_t():
    """With two points, the two-way additive ANOVA's F is the square of the paired t statistic."""
    from scipy.stats import ttest_rel
    matrix = np.array([[80.1, 83.0, 78.2, 81.5], [80.9, 83.2, 79.5, 81.9]])
    res = stats.blocked_test(matrix)
    paired = ttest_rel(matrix[1], matrix[0])
    assert res["f"] == pytest.approx(paired.statistic ** 2) and res["p"] == pytest.approx(paired.pvalue)
    shifted = matrix + np.array([10.0, -5.0, 2.0, 0.0])  # seed shifts change nothing
    assert stats.blocked_test(shifted)["f"] == pytest.approx(res["f"])
    three = np.vstack([matrix, matrix[1] + 0.3])
    assert stats.blocked_test(three)["friedman_p"] is not None
    assert stats.blocked_test(matrix[:, :1])["p"] is None  # one seed: no test


def test_set_stability_resamples_whole_seeds():
    """Points that move together with their seed keep their order in every seed: resampling whole seeds keeps
    the set (P = 1), where resampling each point's seeds independently would scramble it."""
    values = {(u, v): {s: 80 + 10 * shift - 0.1 * (u * 4 + v) for s, shift in enumerate(SEED_SHIFT)}
              for u in range(4) for v in range(4)}
    res = stats.set_stability(values, [1, 2, 4], descending=True, resamples=200)
    assert all(res[k]["p_same"] == 1.0 for k in (1, 2, 4)) and res[2]["set"] == [(0, 0), (0, 1)]


def test_paired_welch_and_holm_helpers():
    d = stats.paired({0: 2.0, 1: 3.0, 2: 4.5}, {0: 1.0, 1: 1.5, 2: 3.0, 3: 9.0})
    assert d["n"] == 3 and d["mean"] == pytest.approx(4 / 3) and d["p"] is not None  # seeds both sides have
    assert stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["p"] is None  # identical runs: no spread, no test
    a, b = [10.0, 11.0, 12.0, 13.0], [7.0, 9.0, 8.5]
    from scipy.stats import t as tdist
    va, vb = 1.6666667 / 4, 1.0833333 / 3
    tval = (11.5 - 8.1666667) / (va + vb) ** 0.5
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert stats.welch_p(a, b) == pytest.approx(2 * tdist.sf(tval, df), rel=1e-5)
    assert stats.welch_p([1.0], b) is None and stats.welch_p([2.0, 2.0], [2.0, 2.0]) == 1.0
    assert stats.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    s = stats.summarize([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["ci_high"] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
