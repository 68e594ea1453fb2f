"""Statistics over seeds for the ablation tables: intervals, significance marks, stability of the two-step lists.

The paper reports one run per point (Fig. 4, Tables 1, 5, 6), and its differences are often 0.1-0.3 points, the
size of seed noise. Our tables therefore give, for every point, the mean, sample standard deviation, n and a
95% Student-t interval over seeds, and mark differences with Welch's unequal-variance t-test (two-sided; Holm
correction within each family of comparisons of a table, so that 16-49 comparisons do not produce false marks by
chance). The two-step criterion's Top-k/Bot-k sets are bootstrapped over seeds to show whether a derived list is
a finding or a coin toss.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Optional, Sequence

import numpy as np

ALPHA = 0.05
TEST_NAME = "Welch's t-test (two-sided, unequal variances) over seeds, Holm-adjusted within each column"
BOOTSTRAP_RESAMPLES = 2000


def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    """n, mean, sample std and the 95% Student-t interval of the mean (``None`` where n is too small)."""
    n = len(values)
    out: dict[str, Optional[float]] = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if not n:
        return out
    out["mean"] = statistics.fmean(values)
    if n > 1:
        from scipy.stats import t

        std = statistics.stdev(values)
        half = float(t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def welch_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of Welch's t-test, or None when it is undefined (n < 2 on a side, or both samples
    constant: then equal means give p = 1 and different ones cannot be judged without a variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else None
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-Bonferroni adjusted p-values (None entries stay None and are not counted as comparisons)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m = len(idx)
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def mark(p_adj: Optional[float], same: bool = False) -> str:
    """Table cell text for an adjusted p-value: ``*`` when significant at ``ALPHA``."""
    if same:
        return "—"
    if p_adj is None:
        return "n/a"
    return f"{p_adj:.2g}{' *' if p_adj < ALPHA else ''}"


def set_stability(values: Mapping[tuple[int, int], Mapping[int, float]], ks: Sequence[int], descending: bool,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[int, dict]:
    """How stable the two-step criterion's best-k (``descending``) or worst-k set is under resampling seeds.

    ``values[(u, v)][seed]`` is a point's accuracy per seed. Each bootstrap replicate resamples every point's
    seeds with replacement, re-ranks the means (the criterion's step one, same tie rule as
    :func:`models.dct.rank_frequencies`) and takes the first k. Returns, per k: the observed set, ``p_same``
    (fraction of replicates giving exactly that set), ``jaccard`` (mean overlap |A∩B|/|A∪B| with it) and
    ``inclusion`` (fraction of replicates holding each observed member).
    """
    from models.dct import rank_frequencies

    points = sorted(values)
    rng = np.random.default_rng(seed)
    samples = [np.asarray([values[f][s] for s in sorted(values[f])], dtype=float) for f in points]
    observed = rank_frequencies({f: float(np.mean(x)) for f, x in zip(points, samples)}, descending)
    hits = {k: 0 for k in ks}
    jacc = {k: 0.0 for k in ks}
    incl = {k: {f: 0 for f in observed[:k]} for k in ks}
    for _ in range(resamples):
        means = {f: float(x[rng.integers(0, len(x), len(x))].mean()) for f, x in zip(points, samples)}
        order = rank_frequencies(means, descending)
        for k in ks:
            got, want = set(order[:k]), set(observed[:k])
            hits[k] += got == want
            jacc[k] += len(got & want) / len(got | want)
            for f in want & got:
                incl[k][f] += 1
    return {k: {"set": observed[:k], "p_same": hits[k] / resamples, "jaccard": jacc[k] / resamples,
                "inclusion": {f: c / resamples for f, c in incl[k].items()}} for k in ks}
