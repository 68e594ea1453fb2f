"""``python -m scripts.bench <command>``: the parser (one sub-parser per module, shared option groups from
``common``) and the dispatch; a bad argument or unusable environment is one ``error:`` line and exit code 2."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from . import attention, data, gpu, train, trainer
from .common import BenchError

COMMANDS = (data, train, trainer, attention, gpu)


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{data,train,trainer,attention,gpu}")
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.quick and args.quick_overrides is not None:
        args.quick_overrides(args)
    if args.quick and args.out is None:  # smoke figures never replace the committed reports under results/
        args.out = str(Path(tempfile.gettempdir()) / "fcanet_bench_quick" / f"{args.command}.md")
    try:
        args.run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
