#!/usr/bin/env python
"""Parameters and FLOPs of every Table 2 model, beside the paper's numbers, under three FLOP conventions.

All figures are for one 224x224 image, in G (10^9): **MACs** (``torch.utils.flop_counter``, halved to
multiply-accumulates), **layers** (what a layer-level counter such as ptflops reports: the convention that
reproduces every figure of the paper's Table 2) and **all ops** (every arithmetic operation of the forward pass).
What each convention counts and leaves out: docs/models.md.

``--table2`` also writes the Table 2 reproduction table: every row with the paper's quoted number, the config
that trains it here with our recipe, the measured size and an (empty until run) column for our top-1.

Usage: python scripts/complexity.py [--output results/complexity.md] [--table2 results/imagenet/table2.md]
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from models import count_params, create_model  # noqa: E402
from models.attention import ECA, SE, CBAMChannelGate, DCTPooling  # noqa: E402

# Table 2's method names -> our families (None: quoted only, not built).
FAMILIES = {"ResNet": "resnet", "SENet": "senet", "ECANet": "ecanet", "FcaNet": "fcanet", "CBAM": "cbam",
            "GCNet": "gcnet", "GSoPNet1": "gsopnet", "AANet": None}
NOT_BUILT = {"AANet": "no official code, and the paper does not give the per-stage placement of its attention "
                      "augmentation, so the size cannot be reproduced exactly"}
PAPERS = {"ResNet": "ResNet (He et al., CVPR 2016)", "SENet": "SENet (Hu et al., CVPR 2018)",
          "ECANet": "ECA-Net (Wang et al., CVPR 2020)", "FcaNet": "FcaNet (Qin et al., ICCV 2021)",
          "CBAM": "CBAM (Woo et al., ECCV 2018)", "GCNet": "GCNet (Cao et al., ICCVW 2019)",
          "GSoPNet1": "GSoP-Net (Gao et al., CVPR 2019)", "AANet": "AA-Net (Bello et al., ICCV 2019)"}

# ------------------------------------------------------------------------------------ layer convention
# Attention squeezes counted as poolings: (module type, pooled maps per input element).
ATTENTION_POOLS: tuple[tuple[type, int], ...] = ((SE, 1), (ECA, 1), (CBAMChannelGate, 2), (DCTPooling, 1))
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
NORMS = (nn.BatchNorm2d, nn.LayerNorm)


def layer_ops(module: nn.Module, inputs: tuple, output) -> int:
    """Operations a layer-level counter assigns to one call of ``module`` (0 for containers and for modules
    whose work is counted through their layers)."""
    x = inputs[0] if inputs else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = math.prod(module.kernel_size) * module.in_channels // module.groups
        return output.numel() * k + (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features + (output.numel() if module.bias is not None else 0)
    if isinstance(module, NORMS):
        affine = module.affine if isinstance(module, nn.BatchNorm2d) else module.elementwise_affine
        return x.numel() * (2 if affine else 1)
    if isinstance(module, nn.ReLU):
        return output.numel()
    if isinstance(module, POOLS):
        return x.numel()
    for cls, maps in ATTENTION_POOLS:
        if isinstance(module, cls):
            return maps * x.numel()
    return 0


# --------------------------------------------------------------------------------------- all operations
aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _out_numel(out_shape) -> int:
    if isinstance(out_shape, (tuple, list)) and out_shape and isinstance(out_shape[0], (tuple, list, torch.Size)):
        out_shape = out_shape[0]  # ops returning several tensors (BN, max-pool with indices): the first
    return _numel(out_shape)


def _per_input(*args, out_shape=None, **kwargs) -> int:
    return _numel(args[0])


def _per_output(*args, out_shape=None, **kwargs) -> int:
    return _out_numel(out_shape)


def _two_per_input(*args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(args[0])


def _two_per_output(*args, out_shape=None, **kwargs) -> int:
    return 2 * _out_numel(out_shape)


# category -> (aten ops, formula on shapes). Anything else FlopCounterMode knows (conv, mm, bmm, ...) is "mac".
OP_CATEGORIES: dict[str, tuple[tuple, Callable]] = {
    "norm": ((aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.native_batch_norm,
              aten.native_layer_norm), _two_per_input),
    "relu": ((aten.relu, aten.relu_), _per_output),
    "reduce": ((aten.max_pool2d_with_indices, aten.avg_pool2d, aten._adaptive_avg_pool2d, aten.mean, aten.amax,
                aten.sum), _per_input),
    "elementwise": ((aten.add, aten.add_, aten.sub, aten.mul, aten.mul_, aten.div, aten.sigmoid, aten._softmax),
                    _per_output),
    "addcmul": ((aten.addcmul,), _two_per_output),
}
CUSTOM_MAPPING = {op: f for ops, f in OP_CATEGORIES.values() for op in ops}
CATEGORY = {op: cat for cat, (ops, _) in OP_CATEGORIES.items() for op in ops}


@dataclass
class Measure:
    params: int
    macs: float          # G
    layers: float        # G, the layer convention
    all_ops: float       # G


def measure_model(model: nn.Module, size: int = 224) -> Measure:
    """Parameters and the three FLOP conventions of one ``size`` x ``size`` image (eval mode, one forward)."""
    model = model.eval()
    total = [0]

    def hook(module, inputs, output):
        total[0] += layer_ops(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_MAPPING) as counter:
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    macs = ops = 0.0
    for op, value in counter.get_flop_counts()["Global"].items():
        if op in CATEGORY:
            ops += value
        else:  # FlopCounterMode's own formulas count 2 FLOPs per multiply-accumulate
            macs += value / 2
    return Measure(count_params(model), macs / 1e9, total[0] / 1e9, (macs + ops) / 1e9)


def measure(name: str, size: int = 224, **kwargs) -> Measure:
    return measure_model(create_model(name, **kwargs), size)


# ------------------------------------------------------------------------------------------------ tables
def paper_rows() -> list[dict]:
    with open(ROOT / "results" / "paper" / "table2_imagenet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    unknown = sorted({r["method"] for r in rows} - set(FAMILIES))
    if unknown:
        raise SystemExit(f"error: results/paper/table2_imagenet.csv: unknown method(s) {', '.join(unknown)}")
    return rows


def model_name(row: dict) -> str | None:
    family = FAMILIES[row["method"]]
    return None if family is None else f"{family}{row['backbone'].split('-')[1]}"


def recipe(config: Path) -> str:
    """The training recipe a config file sets, in one line (read from the file, not restated)."""
    from engine.config import load_config
    cfg = load_config(config)
    gpus = 8  # the configs' stated hardware: one node of 8 GPUs
    batch = cfg.train.batch_size * gpus
    return (f"{cfg.train.epochs} ep, {gpus}x{cfg.train.batch_size} (lr {cfg.optim.base_lr * batch / 256:g}), "
            f"{cfg.train.warmup_epochs:g} warm-up + cosine, LS {cfg.train.label_smoothing:g}, crop {cfg.data.crop}")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def flops_match(ours: float, paper: str) -> str:
    return "yes" if f"{ours:.2f}" == f"{float(paper):.2f}" else f"NO ({ours - float(paper):+.3f})"


def complexity_text(rows: list[dict], measured: dict[str, Measure]) -> str:
    lines = ["| model | params (M) | paper params (M) | params match | GMACs (conv/linear/matmul) | "
             "GFLOPs, layers | GFLOPs, all ops | paper GFLOPs | layers match |",
             "|---|---:|---:|:---:|---:|---:|---:|---:|:---:|"]
    for row in rows:
        name = model_name(row)
        paper_p, paper_f = float(row["params_M"]), row["flops_G"]
        if name is None:
            label = f"{row['method']} ({row['backbone']})"
            lines.append(f"| {label} | quoted, not built | {paper_p:.2f} | - | - | - | - | {float(paper_f):.2f} | - |")
            continue
        if name not in measured:
            continue
        m = measured[name]
        ok = f"{m.params / 1e6:.2f}" == f"{paper_p:.2f}"
        lines.append(f"| {name} | {m.params / 1e6:.2f} ({m.params:,}) | {paper_p:.2f} | {'yes' if ok else 'NO'} | "
                     f"{m.macs:.3f} | {m.layers:.3f} | {m.all_ops:.3f} | {float(paper_f):.2f} | "
                     f"{flops_match(m.layers, paper_f)} |")
    notes = [f"- {PAPERS[m]} ({m}): {why}." for m, why in NOT_BUILT.items()
             if any(r["method"] == m for r in rows)]
    return ("# Model complexity vs. the paper's Table 2\n\n"
            "Generated by `python scripts/complexity.py`. Parameters count trainable weights. FLOPs of one 224x224 "
            "image under three conventions (defined in docs/models.md#flop-conventions):\n\n"
            "- **GMACs**: multiply-accumulates of convolutions and matrix products "
            "(`torch.utils.flop_counter.FlopCounterMode`), the usual meaning of \"FLOPs\";\n"
            "- **layers**: a layer-level count (conv/linear MACs, BN and LayerNorm 2 per element, ReLU 1, poolings "
            "and attention squeezes 1 per input element; not the residual add, gating products, sigmoid/softmax or "
            "the matrix products inside GC and GSoP);\n"
            "- **all ops**: every arithmetic operation, including the residual add and the attention's "
            "elementwise ops.\n\n" + summary(rows, measured) + "\n\n" + remarks(measured)
            + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else ""))


def remarks(measured: dict[str, Measure]) -> str:
    """Measured notes on the CBAM and GSoP rows: the official CBAM's biased MLP, and where GSoP-Net1's FLOPs go."""
    out = []
    cbam = [n for n in measured if n.startswith("cbam")]
    if cbam:
        biased = ", ".join(f"{n} {count_params(create_model(n, mlp_bias=True)) / 1e6:.2f}M" for n in cbam)
        out.append(f"CBAM is built with a bias-free channel MLP, the count Table 2 prints; with `mlp_bias=True`, as "
                   f"the official code: {biased}.")
    gsop = [n for n in measured if n.startswith("gsopnet")]
    for name in gsop:
        depth = name[len("gsopnet"):]
        from models.registry import DEPTHS, FAMILIES
        from models.resnet import ResNet
        block, layers = DEPTHS[int(depth)]
        plain = measure_model(ResNet(block, layers, strides=FAMILIES["gsopnet"].strides))
        base = measure(f"resnet{depth}")
        out.append(f"{name}: a plain ResNet-{depth} with the same stride-1 last stage counts {plain.layers:.3f} G "
                   f"(layers) against {base.layers:.3f} G with the usual stride: the stride accounts for "
                   f"{plain.layers - base.layers:.3f} of the {measured[name].layers - base.layers:.3f} G that "
                   f"{name} adds to ResNet-{depth}, the GSoP blocks for the rest.")
    return "".join(f"{line}\n\n" for line in out)


def summary(rows: list[dict], measured: dict[str, Measure]) -> str:
    """Which convention matches the paper, from the measured rows (nothing here is restated by hand)."""
    built = [(r, measured[model_name(r)]) for r in rows if model_name(r) in measured]
    if not built:
        return "No row measured."
    verdicts = []
    for label, get in (("GMACs", lambda m: m.macs), ("layers", lambda m: m.layers), ("all ops", lambda m: m.all_ops)):
        diffs = [(model_name(r), get(m) - float(r["flops_G"])) for r, m in built]
        off = [(n, d) for (r, m), (n, d) in zip(built, diffs, strict=True)
               if f"{get(m):.2f}" != f"{float(r['flops_G']):.2f}"]
        lo, hi = min(d for _, d in diffs), max(d for _, d in diffs)
        if not off:
            verdicts.append(f"**{label}: every measured row equals the paper's figure at its printed precision** "
                            f"(differences {lo:+.3f} to {hi:+.3f} G before rounding)")
        else:
            worst = max(off, key=lambda t: abs(t[1]))
            verdicts.append(f"{label}: {len(off)} of {len(built)} rows differ at the printed precision "
                            f"(differences {lo:+.3f} to {hi:+.3f} G; largest {worst[0]} {worst[1]:+.3f} G)")
    return "Against the paper's GFLOPs: " + "; ".join(verdicts) + "."


def table2_text(rows: list[dict], measured: dict[str, Measure]) -> str:
    lines = ["| method | backbone | paper top-1 / top-5 | where the paper's number comes from | model | config "
             "(our recipe) | recipe | params (M), measured | GFLOPs (layers), measured | GMACs, measured | "
             "our top-1 |",
             "|---|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        name = model_name(row)
        paper = f"{float(row['top1']):.2f} / {float(row['top5']):.2f}"
        if row["method"] == "FcaNet":
            source = "FcaNet paper: the authors' recipe, which ours follows"
        else:
            source = f"quoted in FcaNet's Table 2 for {PAPERS[row['method']]}: other recipe"
        if name is None:
            lines.append(f"| {row['method']} | {row['backbone']} | {paper} | {source} | not built: "
                         f"{NOT_BUILT[row['method']]} | - | - | {float(row['params_M']):.2f} (paper) | "
                         f"{float(row['flops_G']):.2f} (paper) | - | |")
            continue
        if name not in measured:
            continue
        m = measured[name]
        config = Path("configs") / "imagenet" / f"{name}.yaml"
        if not (ROOT / config).is_file():
            raise SystemExit(f"error: {config}: missing (every built Table 2 row needs a config)")
        lines.append(f"| {row['method']} | {row['backbone']} | {paper} | {source} | `{name}` | `{config}` | "
                     f"{recipe(ROOT / config)} | {m.params / 1e6:.2f} | {m.layers:.2f} | {m.macs:.2f} | |")
    return ("# Table 2 on one recipe\n\n"
            "Generated by `python scripts/complexity.py --table2 results/imagenet/table2.md`.\n\n"
            "The paper's Table 2 compares FcaNet with other attention methods, but **its numbers for every method "
            "other than FcaNet are quoted from other work (mostly the methods' own papers), each trained with a "
            "different recipe** (epochs, augmentation, label smoothing, learning-rate schedule), not measured by the "
            "FcaNet authors with theirs. Here every row that can be built "
            "trains with one recipe, the FcaNet authors' (configs/base/imagenet.yaml), through the config in the "
            "table: `torchrun --nproc_per_node=8 train_imagenet.py --config <config> data.root=/data/imagenet`. "
            "\"our top-1\" stays empty until such a run is done. Params and FLOPs are measured on the built models "
            "(224x224; FLOPs in the paper's layer-level convention, see results/complexity.md).\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(ROOT / "results" / "complexity.md"))
    parser.add_argument("--table2", default=None, help="also write the Table 2 reproduction table here "
                                                        "(results/imagenet/table2.md)")
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these model names (e.g. fcanet50)")
    args = parser.parse_args(argv)
    rows = paper_rows()
    if args.only is not None:
        known = {model_name(r) for r in rows}
        bad = sorted(set(args.only) - known)
        if bad:
            print(f"error: --only: {', '.join(bad)} not in Table 2 (rows: {', '.join(sorted(filter(None, known)))})",
                  file=sys.stderr)
            return 2
        rows = [r for r in rows if model_name(r) in args.only]
    measured: dict[str, Measure] = {}
    mismatches = 0
    for row in rows:
        name = model_name(row)
        if name is None:
            continue
        m = measured[name] = measure(name)
        bad = (f"{m.params / 1e6:.2f}" != f"{float(row['params_M']):.2f}") + (f"{m.layers:.2f}" !=
                                                                              f"{float(row['flops_G']):.2f}")
        mismatches += bool(bad)
        print(f"{name}: {m.params:,} params, {m.macs:.3f} GMACs, {m.layers:.3f} G (layers), {m.all_ops:.3f} G "
              f"(all ops); paper {row['params_M']} M, {row['flops_G']} G", flush=True)
    write_atomic(Path(args.output), complexity_text(rows, measured))
    print(f"wrote {args.output}")
    if args.table2:
        write_atomic(Path(args.table2), table2_text(rows, measured))
        print(f"wrote {args.table2}")
    print(f"{mismatches} row(s) differ from the paper")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
