"""Throughput benchmarks, one command with sub-commands (run from the repository root)::

    python -m scripts.bench data        # input pipeline: fast vs torchvision transforms, per core
    python -m scripts.bench train       # training-step img/s of ResNet/SENet/ECANet/FcaNet-50
    python -m scripts.bench trainer     # whole trainer vs the torchvision reference loop on JPEGs
    python -m scripts.bench attention   # FCA vs SE vs the paper's Fig. 3 pooling, per ResNet-50 stage
    python -m scripts.bench gpu         # all of the GPU figures side by side in one process (<= 8 min)

Every figure is measured side by side in one run (variants interleaved round by round, median over rounds
with the min-max spread) and printed as a ratio to its reference. Reports go to
``results/benchmarks/<command>.md`` with the machine and the exact command, unless ``--out`` says otherwise.
``--quick`` runs tiny sizes (a smoke test: the figures mean nothing).
"""
from .cli import build_parser, main

__all__ = ["build_parser", "main"]
