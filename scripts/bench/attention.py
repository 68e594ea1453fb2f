"""``attention``: channel-attention cost at the four ResNet-50 stage shapes, and whole-model training steps.

Measured side by side in one run (interleaved rounds, median):

1. pooling only (N, C, H, W) -> (N, C): global average pooling (SE's squeeze), our DCT pooling
   (``models.attention.DCTPooling``, the ``FCA`` squeeze) and the paper's Fig. 3 formulation
   ``y = torch.sum(x * dct_weight, dim=[2, 3])`` with a full C x H x W weight (written below: the thing
   we compare against);
2. whole attention modules: ``SE``, ``FCA`` (ours), FCA with the Fig. 3 pooling swapped in, and the other
   attention modules of the zoo (``CBAM``, the ``GlobalContext`` block of GCNet, ``GSoP``), each at the stage's
   shape with its Table 2 settings;
3. a training step of ResNet-50, SENet-50, FcaNet-50, CBAM-50, GCNet-50 and GSoP-Net1-50 (the ``train``
   benchmark's step: SGD + CE), with FcaNet-50's throughput against each.

Forward+backward time (gradient w.r.t. the input, as inside a network) and peak memory of one
forward+backward beyond the live input and output gradient. Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` minus the allocation before the step; on CPU, the maximum of the running
sum of the CPU allocator's allocations and frees during the step, as recorded by ``torch.profiler`` with
``profile_memory=True`` (its ``[memory]`` events, i.e. tensor bytes, not RSS).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from torch import nn

from models.attention import CBAM, FCA, SE, GlobalContext, GSoP
from models.dct import parse_frequencies

from .common import (BenchError, device_args, interleaved_rates, interleaved_step_times, machine_description,
                     make_train_step, md_table, pick_device, report_args, resolve_precision, setup_threads, sync,
                     target_verdict, write_report)


STAGES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))  # ResNet-50 at 224x224: (C, H, W)
QUICK_STAGES = ((256, 14, 14), (2048, 7, 7))


class Fig3Pooling(nn.Module):
    """The paper's Fig. 3 multi-spectral pooling: an elementwise product with the full (C, H, W) DCT weight
    followed by a spatial sum (materializes an N x C x H x W temporary, saved for backward)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.weight.shape[-2:]:  # as in the authors' code (and DCTPooling)
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.weight.shape[-2:])
        return torch.sum(x * self.weight, dim=[2, 3])


class GAPPooling(nn.Module):
    """SE's squeeze: global average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def fig3_fca(fca: FCA) -> FCA:
    """A copy of ``fca`` (same excitation weights) whose pooling is the Fig. 3 formulation."""
    ref = copy.deepcopy(fca)
    ref.dct_layer = Fig3Pooling(fca.dct_layer.weight)
    return ref


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of live CPU tensor bytes allocated during ``fn`` (relative to its start), from the profiler's
    allocator events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak allocated bytes during ``fn`` beyond what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def fwd_bwd(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    """One forward + backward (fresh input gradient, as for one training step)."""
    def run():
        x.grad = None
        y = module(x)
        y.backward(gy)
    return run


def measure_peaks(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """(forward peak, forward + backward peak) in bytes beyond the live input: the forward peak includes the
    output and whatever autograd saves for backward; the forward + backward one the input gradient too.
    The previous input gradient is dropped before measuring, so that its release does not offset the peak."""
    def forward():
        y = module(x)
        del y

    def both():
        module(x).backward(gy)

    x.grad = None
    fwd = peak_bytes(forward, device)
    x.grad = None
    fb = peak_bytes(both, device)
    x.grad = None
    return fwd, fb


def bench_stage(c: int, h: int, w: int, args, device: torch.device, dtype: torch.dtype) -> list[list[str]]:
    freqs = parse_frequencies(args.freq)
    torch.manual_seed(0)
    fca = FCA(c, h, w, freqs).to(device, dtype)
    se = SE(c).to(device, dtype)
    se.fc.load_state_dict(fca.fc.state_dict())
    ref = fig3_fca(fca).to(device, dtype)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=mf).requires_grad_()
    cases = {  # (group, name) -> (module, output gradient)
        ("pooling", "GAP (SE squeeze)"): GAPPooling(),
        ("pooling", "Fig. 3 sum(x * weight)"): ref.dct_layer,
        ("pooling", "DCTPooling (ours)"): fca.dct_layer,
        ("module", "SE"): se,
        ("module", "FCA with Fig. 3 pooling"): ref,
        ("module", "FCA (ours)"): fca,
        ("module", "CBAM"): CBAM(c).to(device, dtype),
        ("module", "GC block (GCNet)"): GlobalContext(c).to(device, dtype),
        # GSoP reduces a first-stage map with stride 2 (the official rule); in GSoP-Net1 only a stage's last block
        # has one, and its last stage runs at twice the resolution shown here.
        ("module", "GSoP"): GSoP(c, reduce_stride=2 if c == STAGES[0][0] else 1).to(device, dtype),
    }
    with torch.no_grad():  # same numbers: ours vs the Fig. 3 reference
        err = (fca.dct_layer(x) - ref.dct_layer(x)).abs().max().item()
        scale = ref.dct_layer(x).abs().max().item()
    fns, gys = {}, {}
    for key, mod in cases.items():
        with torch.no_grad():
            gys[key] = torch.randn_like(mod(x))
        fns[key] = fwd_bwd(mod, x, gys[key])
    rates = interleaved_rates(fns, args.seconds, device=device)
    times = {k: 1.0 / r[0] for k, r in rates.items()}
    peaks = {k: measure_peaks(cases[k], x, gys[k], device) for k in fns}
    rows = []
    for group, ref_name in (("pooling", "Fig. 3 sum(x * weight)"), ("module", "FCA with Fig. 3 pooling")):
        t_ref = times[(group, ref_name)]
        for (g, name) in fns:
            if g != group:
                continue
            t = times[(g, name)]
            (pf, pb), (rf, rb) = peaks[(g, name)], peaks[(group, ref_name)]
            rows.append([f"({c},{h},{w})", group, name, f"{t * 1e3:.3f}", f"{t_ref / t:.2f}x",
                         f"{pf / 2**20:.2f}", f"{pf / max(rf, 1):.3f}", f"{pb / 2**20:.2f}", f"{pb / max(rb, 1):.3f}"])
    print(f"  stage ({c},{h},{w}): |ours - Fig. 3| max {err:.2e} (of max |y| {scale:.2e})")
    rows.append([f"({c},{h},{w})", "check", f"max abs diff ours vs Fig. 3: {err:.1e} (max abs y {scale:.1e})",
                 "", "", "", "", "", ""])
    return rows


def with_fig3_pooling(model: nn.Module) -> nn.Module:
    """``model`` with the Fig. 3 pooling swapped into every FCA block (same weights, same outputs)."""
    for mod in model.modules():
        if isinstance(mod, FCA):
            mod.dct_layer = Fig3Pooling(mod.dct_layer.weight)
    return model


class _UnfusedResidual(nn.Module):
    """Wraps a block's attention so that the block computes ``att(out) + identity`` as two passes (a product,
    then a sum) instead of one ``addcmul``: the formulation before the scale rode on the residual add."""

    def __init__(self, att: nn.Module):
        super().__init__()
        self.att = att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(x)


def with_unfused_residual(model: nn.Module) -> nn.Module:
    """``model`` whose blocks scale, then add (same weights, same outputs up to rounding)."""
    from models.resnet import BasicBlock, Bottleneck
    for mod in model.modules():
        if isinstance(mod, (BasicBlock, Bottleneck)):
            mod.att = _UnfusedResidual(mod.att)
    return model


def bench_models(args, device: torch.device) -> tuple[str, dict]:
    from models import create_model
    builders = {"resnet50": lambda: create_model("resnet50", num_classes=args.num_classes),
                "senet50": lambda: create_model("senet50", num_classes=args.num_classes),
                "fcanet50": lambda: create_model("fcanet50", num_classes=args.num_classes),
                "cbam50": lambda: create_model("cbam50", num_classes=args.num_classes),
                "gcnet50": lambda: create_model("gcnet50", num_classes=args.num_classes),
                "gsopnet50": lambda: create_model("gsopnet50", num_classes=args.num_classes),
                "fcanet50 (Fig. 3 pooling)": lambda: with_fig3_pooling(
                    create_model("fcanet50", num_classes=args.num_classes)),
                "fcanet50 (scale, then add)": lambda: with_unfused_residual(
                    create_model("fcanet50", num_classes=args.num_classes))}
    names = list(builders)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.model_batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           device=device)
    targets = torch.randint(0, args.num_classes, (args.model_batch,), device=device)
    steps = {n: make_train_step(b(), device, args.precision, args.channels_last) for n, b in builders.items()}
    for n in names:
        for _ in range(max(1, args.warmup)):  # >= 1: the optimizer state exists before the memory measurement
            steps[n](images, targets)
    peaks = {n: peak_bytes(lambda n=n: steps[n](images, targets), device) for n in names}
    times = interleaved_step_times({n: (lambda n=n: steps[n](images, targets)) for n in names}, device,
                                   args.rounds, args.steps, label="model round")
    med = {n: statistics.median(times[n]) for n in names}
    rows = [[n, f"{med[n] * 1e3:.1f}", f"{args.model_batch / med[n]:.2f}", f"{med['resnet50'] / med[n]:.3f}",
             f"{med['senet50'] / med[n]:.3f}", f"{med[n] / med['fcanet50']:.3f}", f"{peaks[n] / 2**20:.0f}",
             f"{peaks[n] / peaks['fcanet50']:.3f}"]
            for n in names]
    table = md_table(["model", "ms/step (median)", "img/s", "throughput vs ResNet-50", "throughput vs SENet-50",
                      "FcaNet-50 throughput vs this", "step peak MiB", "peak vs FcaNet-50 (ours)"], rows)
    per_round = [s / f for s, f in zip(times["senet50"], times["fcanet50"], strict=True)]
    return table, {"fca_vs_se": med["senet50"] / med["fcanet50"], "per_round": per_round,
                   "fig3_speed": med["fcanet50 (Fig. 3 pooling)"] / med["fcanet50"],
                   "fused_speed": med["fcanet50 (scale, then add)"] / med["fcanet50"]}


def run(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    setup_threads(args.threads)
    cuda = device.type == "cuda"
    args.precision = resolve_precision(args.precision, device)
    if args.channels_last is None:
        args.channels_last = cuda
    args.batch = args.batch or (32 if cuda else 8)
    args.model_batch = args.model_batch or (64 if cuda else 8)
    stages = STAGES
    if args.quick:
        args.batch, args.model_batch, args.image_size, args.num_classes = 2, 2, 32, 10
        args.seconds, args.rounds, args.steps, args.warmup = 0.01, 1, 1, 1
        stages = QUICK_STAGES
    if min(args.batch, args.model_batch, args.rounds, args.steps) < 1 or args.seconds <= 0:
        raise BenchError("--batch, --model-batch, --rounds, --steps must be >= 1 and --seconds > 0")
    try:
        k = len(parse_frequencies(args.freq))
    except ValueError as e:
        raise BenchError(f"--freq: {e}") from None
    if any(c % k for c, _, _ in stages):
        raise BenchError(f"--freq {args.freq}: k={k} frequencies must divide every stage's channel count")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    machine = machine_description(device)
    print("\n".join(machine))
    rows = []
    for c, h, w in stages:
        rows += bench_stage(c, h, w, args, device, dtype)
    table = md_table(["stage (C,H,W)", "what", "implementation", "fwd+bwd ms (median)", "speed vs Fig. 3",
                      "fwd peak MiB", "fwd peak vs Fig. 3", "fwd+bwd peak MiB", "fwd+bwd peak vs Fig. 3"], rows)
    print("\n" + table)
    mem_note = ("`torch.cuda.max_memory_allocated` minus the allocation before the call" if cuda else
                "running sum of CPU allocator allocations/frees recorded by `torch.profiler(profile_memory=True)` "
                "during the call, maximum")
    body = (f"Stage benchmarks: batch {args.batch}, {args.precision}, channels_last {args.channels_last}, "
            f"frequencies `{args.freq}`; time of forward + backward (gradient w.r.t. the input), "
            f"each case runs ~{args.seconds:g}s in total, all cases of a stage interleaved in ~50 ms slices; time = "
            f"{'wall clock' if cuda else 'process CPU time'} (torch threads {torch.get_num_threads()}). "
            f"'speed vs Fig. 3' > 1 means faster than the reference. Peak memory beyond the live input "
            f"({mem_note}): 'fwd peak' = the forward alone, including its output and the tensors autograd saves "
            f"for backward (what stays alive across a network's forward) and transient temporaries; 'fwd+bwd "
            f"peak' = forward + backward, including the input gradient (x-sized for every implementation).\n\n"
            + table)
    if not args.no_models:
        mtable, stats = bench_models(args, device)
        verdict = target_verdict(args, stats["fca_vs_se"] >= 0.97, "the 3% target")
        body += (f"\n\n## Whole-model training step\n\nBatch {args.model_batch}, {args.image_size}x"
                 f"{args.image_size}, {args.precision}, device {device}; {args.warmup} warm-up step(s), "
                 f"{args.rounds} interleaved rounds of {args.steps} steps, median; time = "
                 f"{'wall clock' if cuda else 'process CPU time'}.\n\n" + mtable +
                 f"\n\nFcaNet-50 / SENet-50 throughput: **{stats['fca_vs_se']:.3f}** ({verdict}); per round: "
                 + ", ".join(f"{v:.3f}" for v in stats["per_round"]) + ". "
                 f"FcaNet-50 with our pooling vs the same model with the Fig. 3 pooling: "
                 f"**{stats['fig3_speed']:.3f}x** the throughput; FcaNet-50 with the attention scale fused into the "
                 f"residual add (ours) vs scale, then add: **{1 / stats['fused_speed']:.3f}x**. Step peak memory: "
                 f"allocations during one training step beyond those live before it (weights, optimizer state), "
                 f"measured as above.")
        print("\n" + mtable + f"\nFcaNet-50 / SENet-50 throughput: {stats['fca_vs_se']:.3f}")
    write_report(args, "attention.md", "Channel attention: FCA vs SE vs the paper's Fig. 3 formulation", machine,
                 body)


def add_parser(sub) -> None:
    p = sub.add_parser("attention", parents=[report_args(), device_args()], help="FCA vs SE vs Fig. 3 pooling per "
                       "ResNet-50 stage, and whole-model steps", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run, quick_overrides=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on CUDA only)")
    p.add_argument("--batch", type=int, default=None, help="batch of the stage benchmarks (default: 32 CUDA, 8 CPU)")
    p.add_argument("--freq", default="top16", help="FCA frequency selection")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of the stage benchmarks and autocast of the model steps (default: bf16 CUDA, fp32 CPU)")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per case (stages)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model-batch", type=int, default=None, help="batch of the model steps (default: 64 CUDA, 8 CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2, help="timed model steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-models", action="store_true", help="skip the whole-model steps")
