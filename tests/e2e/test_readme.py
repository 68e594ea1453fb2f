"""The README works as written: its python snippets run top to bottom, and the files it names exist."""
from __future__ import annotations

import re
import textwrap

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    """Every fenced python block, in order, dedented (a block may sit inside a list item)."""
    return [textwrap.dedent(block) for block in re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, re.M | re.S)]


def test_python_snippets_run_top_to_bottom(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README)
    assert blocks, "README has no ```python block"
    monkeypatch.chdir(tmp_path)  # snippets must not depend on the working directory
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            pytest.fail(f"README python block {i + 1} failed: {type(e).__name__}: {e}")
    out = capsys.readouterr().out
    # The expected outputs the README shows in comments are what the snippets print.
    for expected in re.findall(r"print\(.*\)[ \t]+# (.+)$", "\n".join(blocks), re.M):
        assert expected.strip() in out, (expected, out)


def test_named_repository_files_exist():
    """Paths of configs, scripts and results the README names (commands and links) are in the repository."""
    named = set(re.findall(r"(?<![\w/.])((?:configs|scripts|results|tests|models|engine|ablation)/[\w./-]*\w)",
                           README))
    named |= {m for m in re.findall(r"\]\(([^)#]+)\)", README) if not m.startswith("http")}
    named = {n for n in named if "<" not in n and "*" not in n and "{" not in n
             and not re.search(rf"(--out|writes) `?{re.escape(n)}", README)}  # files a command would create
    assert len(named) > 10
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_project_installs_every_top_level_package():
    """`pip install -e .` (requirements.txt) must install every package the README imports from anywhere."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == {"models", "engine", "ablation"} == set(project["tool"]["setuptools"]["packages"])
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "-e ." in lines
    assert {"torch", "torchvision"} <= {re.split(r"[<>=!~ ]", d)[0] for d in project["project"]["dependencies"]}
