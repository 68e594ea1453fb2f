"""torch.compile of the attention networks: compiled outputs and gradients equal eager ones.

``aot_eager`` runs the whole compile front end (Dynamo capture, AOT autograd with fake tensors,
functionalization, the joint forward/backward graph), where traced custom autograd code breaks (a strided
``view`` in the FCA backward did): whole tiny networks go through it in channels_last (that failure's layout)
for every attention and block type, FcaNet in NCHW too, and single blocks in both layouts. ``inductor`` adds
code generation (C++ on CPU, one compiler process per kernel: a minute and a half of CPU for a tiny network
with a cold cache), so one FCA bottleneck block runs through it (marked slow).
"""
from __future__ import annotations

import pytest
import torch

from models import create_model, model_options
from models.attention import ECA, FCA, SE, DCTPooling, attend_add
from models.resnet import AttentionConfig, Bottleneck, ResNet


def tiny(kind: str, block: str = "basic") -> ResNet:
    """A one-block-per-stage network (FCA: 16 frequencies, so widths are multiples of 16 after expansion)."""
    widths = (16, 16, 32, 32) if block == "basic" else (4, 8, 8, 8)
    torch.manual_seed(0)
    return ResNet(block, (1, 1, 1, 1), AttentionConfig(kind=kind, input_size=32), num_classes=5, widths=widths)


def _fresh_compile(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def _compare(kind: str, block: str, channels_last: bool, backend: str, tol: float = 1e-4) -> None:
    eager = tiny(kind, block)
    compiled_src = tiny(kind, block)
    compiled_src.load_state_dict(eager.state_dict())
    mf = torch.channels_last if channels_last else torch.contiguous_format
    eager.to(memory_format=mf)
    compiled_src.to(memory_format=mf)
    compiled = _fresh_compile(compiled_src, backend)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=mf)

    # training: forward + backward, batch-statistics BN
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=tol, atol=tol)
    gy = torch.randn_like(ye)
    ye.backward(gy)
    yc.backward(gy)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=tol, atol=tol)
    pe, pc = dict(eager.named_parameters()), dict(compiled_src.named_parameters())
    assert pe.keys() == pc.keys()
    for name in pe:
        torch.testing.assert_close(pc[name].grad, pe[name].grad, rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # BN running statistics were updated identically
    for (name, be), bc in zip(eager.named_buffers(), compiled_src.buffers(), strict=True):
        if be.is_floating_point():
            torch.testing.assert_close(bc, be, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")

    # evaluation: running-statistics BN, no autograd
    eager.eval()
    compiled_src.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("kind,block,channels_last", [
    ("fca", "basic", True), ("fca", "bottleneck", True), ("se", "bottleneck", True), ("eca", "basic", True),
    ("fca", "basic", False),  # NCHW: the other attentions' blocks in NCHW are test_compile_block_matches_eager's
], ids=["fca-basic-channels_last", "fca-bottleneck-channels_last", "se-bottleneck-channels_last",
        "eca-basic-channels_last", "fca-basic-nchw"])
def test_compile_matches_eager_aot(kind, block, channels_last):
    _compare(kind, block, channels_last, "aot_eager")


@pytest.mark.slow
def test_compile_bf16_autocast_within_dtype_error(request):
    """Under bf16 autocast, compiled and eager differ by less than bf16 eager differs from fp32: the
    "dtype's tolerance", measured rather than guessed (batch-statistics BN over 4 samples amplifies bf16
    rounding in the first layers' weight gradients). Measured at 2 intra-op threads, whatever the machine
    (the tests otherwise run one): the per-parameter bound is tight, and the reduction order follows the thread
    count (at 1 thread one BN weight's gradient ends 1.08x its bound; 0.83x at 2 and 4 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)

    def run(bf16: bool, backend: str | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = tiny("fca", "bottleneck").to(memory_format=torch.channels_last)
        fwd = _fresh_compile(model, backend) if backend else model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = fwd(x)
        y.float().sum().backward()
        return y.float().detach(), {n: p.grad for n, p in model.named_parameters()}

    (y32, g32), (ye, ge), (yc, gc) = run(False, None), run(True, None), run(True, "aot_eager")
    assert (yc - ye).abs().max() <= (ye - y32).abs().max() + 1e-6
    for name in g32:
        dtype_err = (ge[name] - g32[name]).abs().max()
        assert (gc[name] - ge[name]).abs().max() <= dtype_err + 1e-6, name


def _block(kind: str, channels_last: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """One bottleneck block (16 -> 32 channels, a projection shortcut) with attention ``kind``, and a
    (2, 16, 4, 4) input, in the memory format asked for (same weights on every call)."""
    torch.manual_seed(0)
    cfg = AttentionConfig(kind=kind, input_size=32, gsop_dim=8)
    down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, bias=False), torch.nn.BatchNorm2d(32))
    block = Bottleneck(16, 8, 1, down, cfg.build(32, 1))
    mf = torch.channels_last if channels_last else torch.contiguous_format
    return block.to(memory_format=mf), torch.randn(2, 16, 4, 4).contiguous(memory_format=mf)


@pytest.mark.slow
def test_compile_matches_eager_inductor_fca_block():
    """Code generation too (C++ kernels on CPU), channels_last: the reported failure. One FCA bottleneck block
    (attention, fused residual add, convolutions, batch norm), training forward + backward and evaluation.
    Inductor reorders and fuses fp32 reductions: a slightly looser tolerance than aot_eager."""
    eager, x = _block("fca", channels_last=True)
    compiled_src, _ = _block("fca", channels_last=True)
    compiled = _fresh_compile(compiled_src, "inductor")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-3, atol=1e-3)
    gy = torch.randn_like(ye)
    ye.backward(gy)
    yc.backward(gy)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-3)
    for (name, pe), pc in zip(eager.named_parameters(), compiled_src.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
    for (name, be), bc in zip(eager.named_buffers(), compiled_src.buffers(), strict=True):  # BN running statistics
        if be.is_floating_point():
            torch.testing.assert_close(bc, be, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
    eager.eval()
    compiled_src.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcanet50", "senet50", "ecanet50", "resnet50", "cbam50", "gcnet50", "gsopnet50"])
def test_registered_models_trace_without_graph_breaks(name):
    """Every family captures as one graph (no graph break in the attention), at full depth."""
    size = {"input_size": 32} if "input_size" in model_options(name) else {}
    model = create_model(name, num_classes=5, widths=(16, 16, 16, 16), **size)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("kind,channels_last", [
    (kind, cl) for kind in ("fca", "se", "eca") for cl in (False, True)] + [
    ("cbam", False), ("gsop", False), ("gc", False), ("gc", True)])  # GC reads channels_last maps differently
def test_compile_block_matches_eager(kind, channels_last):
    """The fast guard: one bottleneck block (attention, fused residual add, in-place ReLU) compiled with
    ``aot_eager``, training forward + backward, equals eager."""
    block, x = _block(kind, channels_last)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = block(xe)
    ye.backward(torch.ones_like(ye))
    ge = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    yc = _fresh_compile(block, "aot_eager")(xc)
    yc.backward(torch.ones_like(yc))
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip((p.grad for p in block.parameters()), ge, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["fixed", "learnable"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dct_pooling_formulations_agree(shared, channels_last, monkeypatch):
    """The CPU matmul path and the Fig. 3 expression (used on CUDA and under compile) give the same
    outputs and input gradients."""
    pool = DCTPooling(32, 7, 7, [(0, 0), (0, 1), (1, 0), (2, 3)], weights="fixed" if shared else "learnable")
    x = torch.randn(3, 32, 7, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(3, 32)
    xa = x.clone().requires_grad_()
    pool(xa).backward(gy)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # take the Fig. 3 branch in eager
    xb = x.clone().requires_grad_()
    yb = pool(xb)
    yb.backward(gy)
    monkeypatch.undo()
    torch.testing.assert_close(yb, pool(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
    assert xb.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("att", [lambda: FCA(32, 7, 7, [(0, 0), (0, 1)]), lambda: SE(32), lambda: ECA(32)],
                         ids=["fca", "se", "eca"])
def test_fused_residual_equals_scale_then_add(att):
    """``attend_add`` (one addcmul) == attention output + shortcut, values and gradients."""
    torch.manual_seed(0)
    module = att()
    out, identity = torch.randn(2, 32, 7, 7, requires_grad=True), torch.randn(2, 32, 7, 7, requires_grad=True)
    fused = attend_add(module, out, identity)
    g = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, [out, identity, *module.parameters()], g)
    plain = module(out) + identity
    grads_plain = torch.autograd.grad(plain, [out, identity, *module.parameters()], g)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
