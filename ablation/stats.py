"""Statistics of the ablation tables, matched to the design: a seed is a whole replicate (its own base, data
order and initialisation), so runs are compared *within* a seed and the seeds are the blocks.

* :func:`paired`: a paired t-test over the seeds two points share (mean difference, 95% interval, p).
* :func:`blocked_test`: "does the frequency matter" with seed as a block: two-way additive ANOVA (points x
  seeds, no interaction) and Friedman's rank test on the complete blocks.
* :func:`holm`: Holm-Bonferroni adjustment within a family of comparisons.
* :func:`mdd`: the minimal detectable difference of a paired t-test (two-sided, exact noncentral t), from an
  observed or assumed sd of the paired differences and the number of seeds.
* :func:`welch_p`: only for samples that are truly independent (no shared seed).
* :func:`set_stability`: the two-step criterion's Top-k / Bot-k sets under resampling whole seeds.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_RESAMPLES = 2000
PAIRED_NAME = "paired t-test over seeds (two-sided)"


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """n, mean, sample std and the 95% Student-t interval of the mean (``None`` where n is too small)."""
    n = len(values)
    out: dict[str, float | None] = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if not n:
        return out
    out["mean"] = statistics.fmean(values)
    if n > 1:
        std = statistics.stdev(values)
        half = _t_quantile(1 - ALPHA / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(q, df))


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, float | None]:
    """``a - b`` over the seeds both have: n, mean difference, sd of the differences, 95% interval and the
    two-sided paired-t p-value (None with n < 2, or when the differences have no spread: identical runs)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = summarize(diffs)
    out["p"] = None
    if len(diffs) > 1 and out["std"]:
        tval = out["mean"] / (out["std"] / math.sqrt(len(diffs)))
        from scipy.stats import t
        out["p"] = float(2 * t.sf(abs(tval), len(diffs) - 1))
    return out


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test for *independent* samples, or None when it is undefined (n < 2 on a
    side, or both samples constant: then equal means give p = 1 and different ones cannot be judged)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else None
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries stay None and are not counted as comparisons)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def mdd(sd: float | None, n: int, comparisons: int = 1, alpha: float = ALPHA,
        power: float = POWER) -> float | None:
    """Minimal detectable difference of a two-sided paired t-test over ``n`` seeds: the true mean difference
    detected with probability ``power`` at level ``alpha / comparisons`` (Bonferroni, the first step of Holm:
    the strictest level a comparison of the family faces), given the sd of the paired differences. Exact:
    power from the noncentral t distribution with n - 1 degrees of freedom. None when n < 2 or sd is unknown."""
    if sd is None or n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    df = n - 1
    crit = float(t.ppf(1 - alpha / (2 * comparisons), df))

    def shortfall(effect: float) -> float:  # effect in units of sd; power(effect) - target
        nc = effect * math.sqrt(n)
        lower = float(nct.cdf(-crit, df, nc))  # the wrong-sign tail: negligible, and NaN in scipy far out
        return float(nct.sf(crit, df, nc)) + (lower if math.isfinite(lower) else 0.0) - power

    high = 1.0
    while shortfall(high) < 0:
        high *= 2
    return brentq(shortfall, 0.0, high, xtol=1e-6) * sd


def complete_blocks(values: Mapping, keys: Sequence) -> tuple[list, np.ndarray]:
    """The seeds every key has, and the ``len(keys) x seeds`` matrix of ``values[key][seed]`` on them."""
    seeds = sorted(set.intersection(*(set(values.get(k, {})) for k in keys))) if keys else []
    return seeds, np.array([[values[k][s] for s in seeds] for k in keys], dtype=float).reshape(len(keys), -1)


def residual_sd(matrix: np.ndarray) -> float | None:
    """sd of the residuals of the additive model ``point + seed`` (points x seeds), or None (too small)."""
    k, n = matrix.shape
    if k < 2 or n < 2:
        return None
    resid = matrix - matrix.mean(1, keepdims=True) - matrix.mean(0, keepdims=True) + matrix.mean()
    return math.sqrt(float((resid ** 2).sum()) / ((k - 1) * (n - 1)))


def blocked_test(matrix: np.ndarray) -> dict[str, float | None]:
    """Does the point matter, blocking on seed? ``matrix`` is points x seeds (complete blocks).

    Two-way additive ANOVA: F = MS(points) / MS(residual) with (k - 1, (k - 1)(n - 1)) degrees of freedom, and
    the seed (block) F for reference; Friedman's chi-square on the within-seed ranks (k >= 3). p-values are
    None where undefined (fewer than 2 seeds, or no residual variation)."""
    k, n = matrix.shape
    out: dict[str, float | None] = {"points": k, "seeds": n, "f": None, "df1": k - 1, "df2": (k - 1) * (n - 1),
                                    "p": None, "seed_f": None, "seed_p": None, "friedman": None,
                                    "friedman_p": None}
    if k < 2 or n < 2:
        return out
    from scipy.stats import f as fdist, friedmanchisquare

    grand = matrix.mean()
    ss_points = n * float(((matrix.mean(1) - grand) ** 2).sum())
    ss_seeds = k * float(((matrix.mean(0) - grand) ** 2).sum())
    ss_resid = float(((matrix - grand) ** 2).sum()) - ss_points - ss_seeds
    ms_resid = ss_resid / out["df2"]
    if ms_resid > 1e-12:
        out["f"] = (ss_points / out["df1"]) / ms_resid
        out["p"] = float(fdist.sf(out["f"], out["df1"], out["df2"]))
        out["seed_f"] = (ss_seeds / (n - 1)) / ms_resid
        out["seed_p"] = float(fdist.sf(out["seed_f"], n - 1, out["df2"]))
    if k >= 3 and not np.all(matrix == matrix[:, :1]):
        res = friedmanchisquare(*matrix)
        if math.isfinite(res.statistic):
            out["friedman"], out["friedman_p"] = float(res.statistic), float(res.pvalue)
    return out


def set_stability(values: Mapping[tuple[int, int], Mapping[int, float]], ks: Sequence[int], descending: bool,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[int, dict]:
    """How stable the two-step criterion's best-k (``descending``) or worst-k set is under resampling seeds.

    ``values[(u, v)][seed]`` is a point's accuracy per seed. A seed is a whole replicate (base, data order,
    fine-tunes), so each bootstrap replicate draws whole seeds with replacement from the seeds every point has,
    takes each point's mean over the drawn seeds, re-ranks (the criterion's step one, same tie rule as
    :func:`models.dct.rank_frequencies`) and takes the first k. Returns, per k: the observed set, ``p_same``
    (fraction of replicates giving exactly that set), ``jaccard`` (mean overlap |A∩B|/|A∪B| with it) and
    ``inclusion`` (fraction of replicates holding each observed member).
    """
    from models.dct import rank_frequencies

    points = sorted(values)
    seeds, matrix = complete_blocks(values, points)
    rng = np.random.default_rng(seed)
    observed = rank_frequencies({f: float(x) for f, x in zip(points, matrix.mean(1), strict=True)}, descending)
    hits = {k: 0 for k in ks}
    jacc = {k: 0.0 for k in ks}
    incl = {k: {f: 0 for f in observed[:k]} for k in ks}
    for _ in range(resamples):
        draw = rng.integers(0, len(seeds), len(seeds))
        means = matrix[:, draw].mean(1)
        order = rank_frequencies({f: float(x) for f, x in zip(points, means, strict=True)}, descending)
        for k in ks:
            got, want = set(order[:k]), set(observed[:k])
            hits[k] += got == want
            jacc[k] += len(got & want) / len(got | want)
            for f in want & got:
                incl[k][f] += 1
    return {k: {"set": observed[:k], "p_same": hits[k] / resamples, "jaccard": jacc[k] / resamples,
                "inclusion": {f: c / resamples for f, c in incl[k].items()}, "seeds": len(seeds)} for k in ks}
