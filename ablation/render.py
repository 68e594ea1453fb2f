"""Markdown of the ablation tables from templates (``ablation/templates/*.md``, :class:`string.Template`).

Every sentence of a table lives in a template file; the code only fills in numbers and builds table rows.
A template file is either one whole page, or a set of fragments, each starting with a line
``<!-- fragment: NAME -->``. Placeholders are ``$name``; a missing value is a programming error (KeyError).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from string import Template
from typing import Any
from collections.abc import Sequence

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_FRAGMENT = re.compile(r"^<!-- fragment: ([a-z0-9_]+) -->\n", re.M)


@functools.cache
def _templates(file: str) -> dict[str, Template]:
    text = (TEMPLATE_DIR / f"{file}.md").read_text()
    parts = _FRAGMENT.split(text)
    if len(parts) == 1:
        return {"": Template(text)}
    return {name: Template(body.strip("\n")) for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def render(file: str, fragment: str = "", **fields: Any) -> str:
    """The template ``file`` (or its ``fragment``) with ``fields`` filled in (optional blocks left empty leave
    no run of blank lines)."""
    text = _templates(file)[fragment].substitute(**fields)
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"(?<=\S)  +(?=\S)", " ", text))


def join(*blocks: str) -> str:
    """Markdown blocks separated by one empty line (empty blocks left out)."""
    return "\n\n".join(b.strip("\n") for b in blocks if b and b.strip())


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {item}" for item in items if item)


# ------------------------------------------------------------------------------------------- numbers
def fmt(x: float | None, nd: int = 2, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def fmt_p(p: float | None) -> str:
    """``0.012 *`` (significant at 0.05), ``0.3``, or ``n/a``."""
    from .stats import ALPHA
    if p is None:
        return "n/a"
    text = f"{p:.2g}" if p >= 0.001 else "<0.001"
    return text + (" *" if p < ALPHA else "")


def fmt_ours(s: dict[str, Any], nd: int = 2) -> str:
    """``92.00 ± 0.71 (n=2)``, or ``missing``."""
    if not s.get("n"):
        return "missing"
    text = fmt(s["mean"], nd)
    if s.get("std") is not None:
        text += f" ± {s['std']:.{nd}f}"
    return text + f" (n={s['n']})"


def fmt_ci(lo: float | None, hi: float | None, signed: bool = False) -> str:
    return "" if lo is None or hi is None else f"[{fmt(lo, 2, signed)}, {fmt(hi, 2, signed)}]"


def fmt_diff(d: dict[str, Any]) -> str:
    """A paired difference cell: ``+1.23 [+0.10, +2.36] p 0.04 *`` (Holm-adjusted p when present)."""
    if not d or d.get("n", 0) == 0 or d.get("mean") is None:
        return "n/a"
    text = fmt(d["mean"], 2, True)
    if d.get("ci_low") is not None:
        text += " " + fmt_ci(d["ci_low"], d["ci_high"], True)
    p = d.get("p_holm", d.get("p"))
    return text + f" p {fmt_p(p)}"


def freq_list(freqs: Sequence[Sequence[int]]) -> str:
    return " ".join(f"({u},{v})" for u, v in freqs)
