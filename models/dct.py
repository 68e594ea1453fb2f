"""DCT-II basis, the published frequency selections and the two-step selection criterion.

Paper references: "FcaNet: Frequency Channel Attention Networks" (Qin et al., ICCV 2021),
Sec. 3.2 Eq. (3)-(7) and the appendix Fig. 7 (the basis used by the released code).

Frequencies are (u, v) pairs in an S x S selection grid (S = 7 in the paper: "the smallest feature map size is
7x7 on ImageNet"): ``u`` is the row (vertical frequency), ``v`` the column (horizontal frequency). A layer whose
DCT size is ``h x w`` uses ``(u * (h // S), v * (w // S))``. The published orders are defined on S = 7; other grid
sizes (e.g. S = 4 for 32x32 inputs with a CIFAR-style stem, whose smallest map is 4x4) take explicit frequency
lists, such as the ones :func:`two_step_criterion` derives from a measured S x S single-frequency grid.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING
from collections.abc import Mapping, Sequence

if TYPE_CHECKING:  # torch is imported where the bases are built, so the frequency orders load without it
    import torch

Frequency = tuple[int, int]
FrequencySpec = str | Sequence[Sequence[int]] | None

GRID = 7  # the paper's selection grid: the last ResNet stage's map at 224x224 input

# The first 32 frequencies of the three selections released with the authors' code (7x7 space,
# (u, v) = (row, column)). ``top``: the two-step criterion applied to the paper's Fig. 4 grid;
# ``low``: the Low-k zig-zag order of appendix Fig. 5b; ``bot``: the Bot-k order (worst first).
# A copy of the same data with its provenance is in results/paper/published_frequency_orders.csv.
PUBLISHED_ORDERS: dict[str, tuple[Frequency, ...]] = {
    "top": ((0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0), (5, 0), (1, 6), (3, 0),
            (0, 4), (0, 6), (0, 3), (3, 5), (2, 2), (4, 6), (6, 3), (3, 3), (5, 3), (5, 5), (2, 1),
            (6, 1), (5, 2), (5, 4), (3, 2), (3, 1), (4, 1), (2, 3), (2, 0), (6, 5), (1, 3)),
    "low": ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2), (2, 2), (0, 3), (3, 0),
            (4, 0), (0, 4), (1, 3), (3, 1), (0, 5), (1, 4), (2, 3), (3, 2), (4, 1), (5, 0), (0, 6),
            (1, 5), (2, 4), (3, 3), (4, 2), (5, 1), (6, 0), (1, 6), (2, 5), (3, 4), (4, 3)),
    "bot": ((6, 6), (1, 4), (3, 4), (3, 6), (2, 6), (4, 3), (1, 1), (2, 4), (4, 4), (4, 5), (5, 6),
            (1, 5), (4, 2), (6, 2), (2, 5), (5, 1), (6, 4), (1, 3), (6, 5), (2, 0), (2, 3), (4, 1),
            (3, 1), (3, 2), (5, 4), (5, 2), (6, 1), (2, 1), (5, 5), (5, 3), (3, 3), (6, 3)),
}
METHODS = tuple(PUBLISHED_ORDERS)
MAX_K = 32


def dct_1d(length: int, freq: int) -> torch.Tensor:
    """Orthonormal DCT-II basis vector of ``freq`` over ``length`` samples (appendix Fig. 7).

    ``B[i] = cos(pi * freq * (i + 0.5) / L) / sqrt(L)``, times ``sqrt(2)`` when ``freq != 0``. Shape (L,).
    Computed in float64 so that the float32 buffer is exact to rounding.
    """
    import torch

    if not 0 <= freq < length:
        raise ValueError(f"DCT frequency {freq} out of range for length {length} (must be in [0, {length - 1}])")
    i = torch.arange(length, dtype=torch.float64)
    basis = torch.cos(math.pi * freq * (i + 0.5) / length) / math.sqrt(length)
    return basis * (math.sqrt(2.0) if freq != 0 else 1.0)


def dct_2d(height: int, width: int, u: int, v: int) -> torch.Tensor:
    """2D DCT-II basis image for frequency (u, v): outer product of two 1D bases (Eq. 5). Shape (H, W)."""
    import torch

    return torch.outer(dct_1d(height, u), dct_1d(width, v))


def scale_frequencies(freqs: Sequence[Frequency], height: int, width: int, grid: int = GRID) -> list[Frequency]:
    """Map frequencies chosen in the ``grid x grid`` space to an ``height x width`` DCT (multiply by
    ``size // grid``).

    E.g. (1, 1) in 7x7 is (2, 2) in 14x14; with ``grid=4``, (1, 1) is (8, 8) in 32x32. DCT sizes below the
    grid use the indices unscaled and must then hold them, which :func:`dct_filters` checks.
    """
    if grid < 1:
        raise ValueError(f"frequency grid size must be positive, got {grid}")
    su, sv = max(1, height // grid), max(1, width // grid)
    return [(u * su, v * sv) for u, v in freqs]


def dct_filters(height: int, width: int, freqs: Sequence[Frequency]) -> torch.Tensor:
    """Stack of 2D DCT basis images, one per frequency (already in the ``height x width`` index space).

    Returns a float64 tensor of shape (k, H, W).
    """
    out = []
    for u, v in freqs:
        if not (0 <= u < height and 0 <= v < width):
            raise ValueError(f"frequency ({u}, {v}) out of range for a {height}x{width} DCT")
        out.append(dct_2d(height, width, u, v))
    import torch

    return torch.stack(out)


def published_frequencies(method: str, k: int) -> list[Frequency]:
    """The first ``k`` frequencies of a published selection (``top``, ``low`` or ``bot``)."""
    if method not in PUBLISHED_ORDERS:
        raise ValueError(f"unknown frequency selection {method!r}; expected one of {', '.join(METHODS)}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"number of frequencies k={k} out of range: the published orders hold 1..{MAX_K}")
    return list(PUBLISHED_ORDERS[method][:k])


def parse_frequencies(spec: FrequencySpec, grid: int = GRID) -> list[Frequency]:
    """Resolve a frequency specification to an explicit list of (u, v) pairs in the ``grid x grid`` space.

    ``spec`` is a string ``"<method><k>"`` (``"top16"``, ``"low4"``, ``"bot32"``; the published orders, 7x7
    grid only), or an explicit sequence of (u, v) pairs such as ``[(0, 0), (0, 1)]`` (the single-frequency
    ablation uses one pair for all channels).
    """
    if spec is None:
        spec = "top16"
    if isinstance(spec, str) and grid != GRID:
        raise ValueError(f"frequency selection {spec!r} is a published order, defined on the {GRID}x{GRID} grid; "
                         f"with a {grid}x{grid} grid give explicit (u, v) pairs (e.g. from the two-step criterion "
                         f"on a measured {grid}x{grid} single-frequency grid)")
    if isinstance(spec, str):
        text = spec.strip().lower()
        method = text.rstrip("0123456789")
        digits = text[len(method):]
        if method not in PUBLISHED_ORDERS or not digits:
            raise ValueError(f"bad frequency selection {spec!r}: expected e.g. 'top16', 'low4', 'bot32' "
                             f"or an explicit list of (u, v) pairs")
        return published_frequencies(method, int(digits))
    freqs: list[Frequency] = []
    for item in spec:
        if isinstance(item, (str, bytes)) or len(item) != 2:
            raise ValueError(f"bad frequency {item!r}: expected a (u, v) pair")
        u, v = (int(x) for x in item)
        if not (0 <= u < grid and 0 <= v < grid):
            raise ValueError(f"frequency ({u}, {v}) out of range: u and v must be in [0, {grid - 1}] "
                             f"({grid}x{grid} grid)")
        freqs.append((u, v))
    if not freqs:
        raise ValueError("empty frequency list: give at least one (u, v) pair")
    return freqs


def rank_frequencies(grid: Mapping[Frequency, float] | Sequence[Sequence[float]] | torch.Tensor,
                     descending: bool = True) -> list[Frequency]:
    """Step one of the two-step criterion (Sec. 4.2): order single-frequency results by accuracy.

    ``grid`` is an S x S table ``grid[u][v]`` (or a mapping ``(u, v) -> accuracy``; missing cells are ignored).
    Ties are broken the way the authors' lists were produced: a stable ascending sort in row-major
    order, reversed for the descending (Top) order. This reproduces the published ``top`` and ``bot``
    orders exactly from Fig. 4's unrounded values (three ties occur there).
    """
    if isinstance(grid, Mapping):
        cells = [((int(u), int(v)), float(a)) for (u, v), a in grid.items()]
    else:
        rows = grid.tolist() if hasattr(grid, "tolist") else grid  # a tensor or array: nested lists
        cells = [((u, v), float(a)) for u, row in enumerate(rows) for v, a in enumerate(row)]
    cells = [c for c in cells if not math.isnan(c[1])]
    cells.sort(key=lambda c: c[0])  # row-major first, so the tie order is defined
    ascending = sorted(cells, key=lambda c: c[1])
    ordered = ascending[::-1] if descending else ascending
    return [f for f, _ in ordered]


def two_step_criterion(grid, ks: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> dict[str, dict[int, list[Frequency]]]:
    """The paper's two-step selection (Sec. 4.2): (1) rank the single-frequency results, (2) take the
    best k (Top-k) or worst k (Bot-k) for each k. Returns ``{"top": {k: [...]}, "bot": {k: [...]}}``."""
    top, bot = rank_frequencies(grid, True), rank_frequencies(grid, False)
    for k in ks:
        if not 1 <= k <= len(top):
            raise ValueError(f"k={k} out of range: the grid holds {len(top)} results")
    return {"top": {k: top[:k] for k in ks}, "bot": {k: bot[:k] for k in ks}}


def low_order(grid: int = GRID) -> list[Frequency]:
    """All ``grid x grid`` frequencies, lowest first (the Low-k order of appendix Fig. 5b, generalised).

    On the 7x7 grid the first 32 are the authors' released ``low`` list. Any S x S grid takes that list's cells
    that fall inside it, in the same order, then the remaining cells by (u + v, max(u, v), u): for S <= 4 the
    released list alone covers the grid, so e.g. the 4x4 order is the released one with the cells u, v >= 4 left out.
    """
    if grid < 1:
        raise ValueError(f"frequency grid size must be positive, got {grid}")
    order = [(u, v) for u, v in PUBLISHED_ORDERS["low"] if u < grid and v < grid]
    rest = sorted(((u, v) for u in range(grid) for v in range(grid) if (u, v) not in order),
                  key=lambda f: (f[0] + f[1], max(f), f[0]))
    return order + rest
