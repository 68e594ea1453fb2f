"""The README and docs/ work as written, and the README's figures are those of the files it cites.

* every ```python block of a page runs, top to bottom in one namespace per page, and prints what its
  ``print(...)  # expected`` comments say;
* every command of a ```bash block is checked without running it: the project's entry points through their own
  argument parsers (``torchrun`` through torch's), trainer configs and overrides through the config schema,
  ``python -m ablation plan`` is run (it only reads presets);
* every repository file a page names (in text, commands or links, link anchors included) exists;
* every figure the README states (a number outside code, except references such as "Table 2") is found in a
  file linked from the same table row or paragraph, and the README's claims in words (all parameter counts
  equal, nothing significant, nothing measured on a GPU or on ImageNet) hold in those files.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]
TEXT_SUFFIXES = {".md", ".csv", ".json", ".jsonl", ".yaml", ".log", ".txt"}


def fenced(text: str, lang: str) -> list[str]:
    """Every fenced block of ``lang``, in order, dedented (a block may sit inside a list item)."""
    return [textwrap.dedent(b) for b in re.findall(rf"^[ \t]*```{lang}\n(.*?)^[ \t]*```", text, re.M | re.S)]


# ----------------------------------------------------------------------------------------------------------
# python snippets


@pytest.mark.parametrize("page", [p for p in PAGES if fenced(p.read_text(), "python")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_snippets_run_top_to_bottom(page, tmp_path, monkeypatch, capsys, request):
    blocks = fenced(page.read_text(), "python")
    monkeypatch.chdir(tmp_path)  # snippets must not depend on the working directory
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # model construction and tiny forwards: a second thread only spins
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page.name} python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            pytest.fail(f"{page.name} python block {i + 1} failed: {type(e).__name__}: {e}")
    out = capsys.readouterr().out
    # The expected outputs the page shows in comments are what the snippets print.
    for expected in re.findall(r"print\(.*\)[ \t]+# (.+)$", "\n".join(blocks), re.M):
        assert expected.strip() in out, (page.name, expected, out)


# ----------------------------------------------------------------------------------------------------------
# shell commands


class Parsed(Exception):
    """Raised in place of running a command once its arguments parsed."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


@contextlib.contextmanager
def parse_only(monkeypatch):
    """Every ``ArgumentParser.parse_args`` / ``parse_intermixed_args`` raises :class:`Parsed` after a
    successful parse (the entry points use the latter so that ``KEY=VALUE`` may stand anywhere)."""
    with monkeypatch.context() as m:
        for name in ("parse_args", "parse_intermixed_args"):
            original = getattr(argparse.ArgumentParser, name)

            def parse(self, args=None, namespace=None, _original=original):
                raise Parsed(_original(self, args, namespace))

            m.setattr(argparse.ArgumentParser, name, parse)
        yield


def parsed(main, argv: list[str], monkeypatch, capsys, what: str) -> argparse.Namespace:
    with parse_only(monkeypatch):
        try:
            main(argv)
        except Parsed as p:
            return p.namespace
        except SystemExit as e:
            pytest.fail(f"{what}: arguments refused (exit {e.code}): {capsys.readouterr().err.strip()}")
    pytest.fail(f"{what}: the command did not parse its arguments")


def load_script(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_config(config: str, overrides: list[str], what: str) -> None:
    """A repository config with these overrides passes the trainer's schema (no machine needed)."""
    from engine.config import ConfigError, load_config

    assert (ROOT / config).is_file(), f"{what}: no config {config}"
    try:
        load_config(str(ROOT / config), overrides)
    except ConfigError as e:
        pytest.fail(f"{what}: {e}")


def commands(block: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at && and ;."""
    out = []
    for line in re.sub(r"\\\n[ \t]*", " ", block).splitlines():
        line = re.sub(r"^\w+=\$\((.*?)\)(\s+#.*)?$", r"\1", line.strip())  # jid=$(sbatch ...): the inner command
        cmd: list[str] = []
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token in ("&&", ";", "||"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(token)
    return out


def check_module_command(module: str, rest: list[str], what: str, monkeypatch, capsys) -> None:
    """``python -m MODULE REST`` from the docs: markers exist, the project's modules accept the arguments."""
    if module == "pytest" and "-m" in rest:  # a marker expression names registered markers only
        ini = (ROOT / "pytest.ini").read_text()
        for marker in set(re.findall(r"\w+", rest[rest.index("-m") + 1])) - {"and", "or", "not"}:
            assert re.search(rf"^\s+{marker}:", ini, re.M), f"{what}: marker {marker!r} is not in pytest.ini"
    if module in ("venv", "pip", "pytest"):
        return
    if module == "ablation":
        from ablation.cli import main

        if parsed(main, rest, monkeypatch, capsys, what).command == "plan":  # reads the preset, nothing else
            assert main(rest) == 0, f"{what}: {capsys.readouterr().err.strip()}"
            capsys.readouterr()
        return
    if module in ("scripts.bench", "scripts.gpu_check"):
        import importlib

        parsed(importlib.import_module(module).main, rest, monkeypatch, capsys, what)
        return
    pytest.fail(f"unrecognised python -m {module} in the docs: {what}")


def check_command(argv: list[str], page_text: str, monkeypatch, capsys) -> None:
    what = " ".join(argv)
    while argv and (argv[0] == "sudo" or re.fullmatch(r"\w+=\S*", argv[0])):
        argv = argv[1:]
    prog, args = argv[0], argv[1:]
    if prog == "pip":  # pinned torch/torchvision builds are the ones CI tests
        ci = (ROOT / ".ci/run").read_text()
        for pin in (a for a in args if re.fullmatch(r"torch(vision)?==[\w.+]+", a)):
            assert re.search(rf"(?<![\w.]){re.escape(pin)}(?![\w.])", ci), f"{what}: {pin} is not the version CI pins"
        return
    if prog in (".", "export", "tensorboard"):
        return  # environment set-up, not the project's
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser

        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        try:
            get_args_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{what}: torchrun refuses its arguments: {capsys.readouterr().err.strip()}")
        prog, args = "python", args[script:]
    if prog == "sbatch":
        script = next(a for a in args if not a.startswith("-"))
        if (ROOT / script).is_file():  # our batch script: CONFIG [KEY=VALUE ...] as for train_imagenet.py
            rest = args[args.index(script) + 1:]
            check_config(rest[0], rest[1:], what)
        else:
            assert re.search(rf"--emit-sbatch {re.escape(script)}\b", page_text), \
                f"{what}: {script} is neither in the repository nor written by --emit-sbatch on this page"
        return
    assert prog in ("python", "python3"), f"unrecognised command in the docs: {what}"
    if args[0] == "-m":
        check_module_command(args[1], args[2:], what, monkeypatch, capsys)
        return
    script, rest = args[0], args[1:]
    assert (ROOT / script).is_file(), f"{what}: no {script} in the repository"
    if script in ("train_imagenet.py", "eval_imagenet.py"):
        from engine.entrypoints import eval_main, train_main

        ns = parsed(train_main if script == "train_imagenet.py" else eval_main, rest, monkeypatch, capsys, what)
        if (ROOT / ns.config).is_file():  # not a run's config.yaml that the docs' earlier command writes
            check_config(ns.config, ns.overrides, what)
    elif script.startswith("scripts/"):
        parsed(load_script(script).main, rest, monkeypatch, capsys, what)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_commands_parse(page, monkeypatch, capsys):
    text = page.read_text()
    for block in fenced(text, "bash"):
        for argv in commands(block):
            check_command(argv, text, monkeypatch, capsys)


# ----------------------------------------------------------------------------------------------------------
# named files


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", without_code_blocks(page.read_text()), re.M)}


def without_code_blocks(text: str) -> str:
    return re.sub(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", "", text, flags=re.M | re.S)


def named_paths(page: Path) -> tuple[set[Path], list[str]]:
    """Repository paths a page names (resolved) and the problems found with its links' anchors."""
    text = page.read_text()
    names = set(re.findall(r"(?<![\w/.$<-])((?:configs|scripts|results|tests|models|engine|ablation|docs|\.ci)"
                           r"/[\w./-]*\w/?)", text))
    # files a command on the page would create: `--out X`, `--emit-sbatch X`, `writes X`
    names = {n for n in names if not re.search(rf"(--out|--emit-sbatch|writes) `?{re.escape(n)}", text)}
    paths = {ROOT / n for n in names}
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        paths.add(path)
        if anchor and path.suffix == ".md" and path.is_file() and anchor not in anchors(path):
            problems.append(f"{target} (no heading with that anchor)")
    return paths, problems


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_named_repository_files_exist(page):
    paths, problems = named_paths(page)
    missing = sorted(str(p.relative_to(ROOT)) for p in paths if not p.exists())
    assert not missing and not problems, f"{page.name} names files that do not exist: {missing + problems}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {p for p in named_paths(README)[0] if p.parent == ROOT / "docs"}
    assert set(PAGES[1:]) <= linked, sorted(str(p) for p in set(PAGES[1:]) - linked)
    assert len(README.read_text().splitlines()) <= 200, "the README is a front page: at most 200 lines"


# ----------------------------------------------------------------------------------------------------------
# figures

# A figure: a number not glued to a word ("ResNet-50", "top-1", "4x4", "2-core", "fcanet50" are not figures),
# optionally a multiplier ("2.04x") or a percentage. References to the paper are not figures either.
FIGURE = re.compile(r"(?<![\w.])(?<![A-Za-z]-)[+-]?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
                    r"(?!x\d)(?!-[A-Za-z])(?!\.\d)(?=x?(?!\w))")
REFERENCE = re.compile(r"\b(?:Fig|Figs|Table|Tables|Sec|Eq|ICCV|ECCV|CVPR)\.?\s+\d+(?:\.\d+)*"
                       r"(?:(?:,\s*|,?\s+and\s+)\d+(?:\.\d+)*)*")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def figures(text: str) -> list[str]:
    text = re.sub(r"\]\([^)]*\)", "]", REFERENCE.sub("", text))  # link targets and references are not figures
    return [m.replace(",", "") for m in FIGURE.findall(text)]


def file_numbers(targets: list[Path]) -> tuple[set[str], set[str]]:
    """The numbers written in the target files (directories: every text file under them), and those of
    machine-written JSON files, whose full-precision values a page may round."""
    written: set[str] = set()
    precise: set[str] = set()
    for target in targets:
        files = sorted(f for f in target.rglob("*") if f.suffix in TEXT_SUFFIXES) if target.is_dir() else [target]
        for f in files:
            numbers = set(NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", f.read_text())))
            written |= numbers
            if f.suffix in (".json", ".jsonl"):
                precise |= numbers
    return written, precise


def found(figure: str, numbers: tuple[set[str], set[str]]) -> bool:
    """``figure`` is written in a file as it is, or a JSON value rounds to it (to as many decimals as it shows)."""
    written, precise = numbers
    if figure in written:
        return True
    decimals = len(figure.partition(".")[2])
    return any(len(n.partition(".")[2]) > decimals and f"{float(n):.{decimals}f}" == figure for n in precise)


def units(page: Path) -> list[str]:
    """Table rows and paragraphs of a page's prose: the scope within which a figure must cite its source."""
    out = []
    for chunk in re.split(r"\n[ \t]*\n", without_code_blocks(page.read_text())):
        lines = chunk.strip().splitlines()
        rows = [ln for ln in lines if ln.lstrip().startswith("|")]
        out += rows
        if len(rows) < len(lines):
            out.append("\n".join(ln for ln in lines if not ln.lstrip().startswith("|")))
    return out


def links(page: Path, unit: str) -> list[Path]:
    return [(page.parent / t.partition("#")[0]).resolve()
            for t in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", unit) if not t.startswith("http")]


# Figures stated without a link, each checked against the file that defines it.
def _python_floor(version: str) -> bool:
    floor = re.search(r'^requires-python = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    return floor is not None and floor.group(1) == f">={version}"


KNOWN = {re.compile(r"Python (\d+\.\d+) or newer"): _python_floor}


def unchecked_figures(page: Path, only_linked_rows: bool = False) -> list[str]:
    problems = []
    for unit in units(page):
        text = re.sub(r"`[^`\n]*`", "", unit)
        for pattern, check in KNOWN.items():
            for m in pattern.finditer(text):
                if not check(m.group(1)):
                    problems.append(f"{m.group(0)!r} does not hold")
            text = pattern.sub("", text)
        targets = links(page, text)
        if only_linked_rows and not (targets and text.lstrip().startswith("|")):
            continue
        numbers = file_numbers([t for t in targets if t.exists()])
        problems += [f"{fig} in {text.strip()[:90]!r}..." for fig in figures(text) if not found(fig, numbers)]
    return problems


def test_every_readme_figure_is_in_the_file_it_cites():
    assert len(figures(README.read_text())) > 15  # the check sees the results table
    problems = unchecked_figures(README)
    assert not problems, "README figures not found in the files linked beside them:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES[1:], ids=IDS[1:])
def test_docs_table_figures_are_in_the_files_they_cite(page):
    problems = unchecked_figures(page, only_linked_rows=True)
    assert not problems, f"{page.name}: figures not found in the files their rows link:\n" + "\n".join(problems)


def results_rows() -> dict[str, dict[str, str]]:
    """The README's results table: ``what`` -> {what, result, machine, source}."""
    text = README.read_text().split("## Results so far", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|")]
    header, body = rows[0], rows[2:]
    assert header == ["what", "result", "machine", "source"]
    return {r[0]: dict(zip(header, r, strict=True)) for r in body}


def test_readme_results_machines_are_those_of_the_reports():
    for row in results_rows().values():
        machine = row["machine"]
        if not machine or machine == "any":
            continue
        m = re.fullmatch(r"(\d+)-core (?:Intel|AMD) (\w+)", machine)
        assert m, machine
        text = "".join(p.read_text() if p.is_file() else "".join(f.read_text() for f in p.glob("*.md"))
                       for p in links(README, row["source"]))
        assert m.group(2) in text and re.search(rf"\b{m.group(1)} (cores|logical CPUs)", text), row


def test_readme_claims_in_words_hold():
    rows = results_rows()
    # "all equal to the paper's": every Table 2 model, parameters to the paper's two decimals
    params = next(r for w, r in rows.items() if w.startswith("parameters"))
    assert "all equal to the paper's" in params["result"]
    table = [ln.split("|")[1:-1] for ln in (ROOT / "results/complexity.md").read_text().splitlines()
             if re.match(r"\| (resnet|senet|ecanet|fcanet)\d", ln)]
    families, depths = ("resnet", "senet", "ecanet", "fcanet"), (34, 50, 101, 152)
    assert sorted(r[0].strip() for r in table) == sorted(f"{f}{d}" for f in families for d in depths)
    assert all(r[1].split()[0] == r[2].strip() and r[3].strip() == "yes" for r in table), table
    # the mini row's words: "no effect of the frequency" (the blocked test's p), "below the control" (the
    # paired interval excludes 0 from below), "none of the paper's three claims resolved" (every verdict)
    mini = next(r for w, r in rows.items() if "mini" in w)
    stats = json.loads((ROOT / "results/mini/single_freq/stats.json").read_text())
    assert "no effect of the frequency" in mini["result"] and stats["blocked"]["p"] >= 0.05
    assert "below the control" in mini["result"] and stats["attention"]["ci_high"] < 0
    with (ROOT / "results/mini/claims/claims.csv").open() as f:
        claims = list(csv.DictReader(f))
    assert "none of the paper's three claims resolved" in mini["result"]
    assert len({c["claim"] for c in claims}) == 3
    assert all(c["verdict"] in ("not resolved at this power", "not a test") for c in claims), claims
    # the demo's report states what its summary.json and /usr/bin/time measured
    demo = ROOT / "results/demo/fcanet_digits"
    report, summary = (demo / "README.md").read_text(), json.loads((demo / "summary.json").read_text())
    assert f"final val top-1 {summary['final_top1']:.2f}%" in report
    user, system = (float(re.search(rf"{k} time \(seconds\): ([\d.]+)", report).group(1)) for k in ("User", "System"))
    assert f"CPU time {user + system:.1f} s (user {user:.2f} s + system {system:.2f} s)" in report
    # "ImageNet accuracy, anything on a GPU: not measured yet" (and "No GPU path has run on a GPU yet")
    assert "not measured" in rows["ImageNet accuracy, anything on a GPU"]["result"]
    assert "No GPU path has run on a GPU yet" in README.read_text()
    assert not list((ROOT / "results/benchmarks").glob("gpu*")), "a GPU report exists: update the README"
    for runs in (ROOT / "results/imagenet").glob("*/runs.csv"):
        with runs.open() as f:
            assert {row["status"] for row in csv.DictReader(f)} == {"missing"}, f"{runs}: update the README"


def test_readme_model_names_are_registered():
    import models

    text = README.read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`([a-z_]+\d+)`", text))
    assert len(names) > 10
    assert names <= set(models.list_models(include_aliases=True)), names - set(models.list_models(True))


# ----------------------------------------------------------------------------------------------------------
# packaging


def test_project_installs_every_top_level_package():
    """`pip install -e .` (requirements.txt) must install every package the docs import from anywhere."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    include = set(project["tool"]["setuptools"]["packages"]["find"]["include"])
    assert packages == {"models", "engine", "ablation"} and {p for p in include if "." not in p} == packages
    # every subpackage is matched by a pattern
    subpackages = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("*/*/__init__.py")
                   if p.parts[-3] not in ("scripts", "tests")}
    assert subpackages and all(f"{s.split('.')[0]}.*" in include for s in subpackages)
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "-e ." in lines
    assert {"torch", "torchvision"} <= {re.split(r"[<>=!~ ]", d)[0] for d in project["project"]["dependencies"]}
