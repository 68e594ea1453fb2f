"""Throughput benchmarks: ``python -m scripts.bench --help`` lists the commands (see :mod:`.cli`)."""
from .cli import build_parser, main

__all__ = ["build_parser", "main"]
