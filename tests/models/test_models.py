"""Model zoo: DCT maths, frequency selection, attention layers, ResNet variants, sizes, interop."""
import csv
import math
from pathlib import Path

import pytest
import torch
import torchvision

import models
from models import create_model, list_models, load_weights, model_options
from models.attention import FCA, DCTPooling, eca_kernel_size
from models.dct import (PUBLISHED_ORDERS, dct_1d, dct_2d, parse_frequencies, rank_frequencies,
                        scale_frequencies, two_step_criterion)

PAPER = Path(__file__).resolve().parents[2] / "results" / "paper"
TINY = dict(widths=(16, 32, 64, 128), input_size=64)


def paper_grid():
    with open(PAPER / "fig4_single_frequency.csv", newline="") as f:
        return {(int(r["u"]), int(r["v"])): float(r["top1_unrounded"]) for r in csv.DictReader(f)}


def published(method):
    with open(PAPER / "published_frequency_orders.csv", newline="") as f:
        return [(int(r["u"]), int(r["v"])) for r in csv.DictReader(f) if r["method"] == method]


# ---------------------------------------------------------------- DCT and frequency selection
@pytest.mark.parametrize("length", [7, 14, 56])
def test_dct_basis_is_orthonormal(length):
    basis = torch.stack([dct_1d(length, f) for f in range(length)])
    assert torch.allclose(basis @ basis.T, torch.eye(length, dtype=torch.float64), atol=1e-12)
    b2 = torch.stack([dct_2d(7, 7, u, v).flatten() for u in range(7) for v in range(7)])
    assert torch.allclose(b2 @ b2.T, torch.eye(49, dtype=torch.float64), atol=1e-12)


def test_theorem1_lowest_frequency_is_gap():
    """Paper Theorem 1: the (0, 0) DCT component equals GAP times sqrt(HW)."""
    x = torch.randn(3, 32, 14, 14)
    pool = DCTPooling(32, 14, 14, [(0, 0)])
    assert torch.allclose(pool(x), x.mean((2, 3)) * math.sqrt(14 * 14), atol=1e-5)


def test_published_orders_match_shipped_csv():
    for method in ("top", "low", "bot"):
        assert list(PUBLISHED_ORDERS[method]) == published(method)


def test_two_step_criterion_reproduces_published_orders():
    sel = two_step_criterion(paper_grid())
    for k in (1, 2, 4, 8, 16, 32):
        assert sel["top"][k] == published("top")[:k]
        assert sel["bot"][k] == published("bot")[:k]
    # also from a 7x7 list-of-lists grid
    grid = paper_grid()
    rows = [[grid[(u, v)] for v in range(7)] for u in range(7)]
    assert rank_frequencies(rows)[:32] == published("top")


def test_frequency_specs_and_scaling():
    assert parse_frequencies("top16") == published("top")[:16]
    assert parse_frequencies("LOW4") == published("low")[:4]
    assert parse_frequencies([[1, 2], (3, 4)]) == [(1, 2), (3, 4)]
    assert scale_frequencies([(1, 1), (6, 3)], 14, 14) == [(2, 2), (12, 6)]
    assert scale_frequencies([(1, 1)], 56, 28) == [(8, 4)]
    for bad in ("top0", "top33", "mid4", "top", [(7, 0)], [(0, -1)], [], [(1, 2, 3)]):
        with pytest.raises(ValueError):
            parse_frequencies(bad)


def test_fca_filters_follow_the_authors_layout():
    """Channels split into k consecutive groups; group i uses frequency i scaled to the DCT size."""
    fca = FCA(64, 14, 14, [(0, 0), (1, 1), (0, 3), (6, 6)])
    w = fca.dct_layer.weight
    assert w.shape == (64, 14, 14)
    for i, (u, v) in enumerate([(0, 0), (2, 2), (0, 6), (12, 12)]):
        expect = dct_2d(14, 14, u, v).float()
        assert all(torch.allclose(w[c], expect) for c in range(16 * i, 16 * (i + 1)))


# ---------------------------------------------------------------- attention layers
def _fig3_reference(pool: DCTPooling, x):
    """The paper's Fig. 3 formulation: sum(x * w) over the spatial dims."""
    if x.shape[-2:] != pool.weight.shape[-2:]:
        x = torch.nn.functional.adaptive_avg_pool2d(x, pool.weight.shape[-2:])
    return (x.float() * pool.weight).sum((2, 3))


@pytest.mark.parametrize("weights,init", [("fixed", "dct"), ("fixed", "random"), ("learnable", "dct")])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dct_pooling_matches_fig3_formulation(weights, init, layout):
    torch.manual_seed(0)
    pool = DCTPooling(64, 7, 7, parse_frequencies("top16"), weights, init)
    x = torch.randn(4, 64, 7, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(4, 64)
    (pool(x) * grad_out).sum().backward()
    ours, x.grad = x.grad, None
    (_fig3_reference(pool, x) * grad_out).sum().backward()
    assert torch.allclose(ours, x.grad, atol=1e-5)  # same input gradient, in the input's layout
    assert ours.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert torch.allclose(pool(x), _fig3_reference(pool, x), atol=1e-5)
    # non-contiguous input and a size that needs adaptive pooling
    y = torch.randn(4, 64, 20, 13).transpose(2, 3)
    assert torch.allclose(pool(y), _fig3_reference(pool, y), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dct_pooling_under_autocast(dtype):
    torch.manual_seed(0)
    pool = DCTPooling(128, 14, 14, parse_frequencies("top16"))
    x = torch.randn(2, 128, 14, 14)
    ref = _fig3_reference(pool, x)
    with torch.autocast("cpu", dtype=dtype):
        out = pool(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_fca_rejects_k_not_dividing_channels():
    with pytest.raises(ValueError, match="cannot be split into k=16"):
        FCA(24, 7, 7, parse_frequencies("top16"))
    with pytest.raises(ValueError, match="k must divide"):
        create_model("fcanet18", freq="top32", widths=(16, 32, 64, 128))


def test_eca_adaptive_kernel_sizes():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]
    m = create_model("ecanet50")
    assert [m.layer1[0].att.conv.kernel_size[0], m.layer4[0].att.conv.kernel_size[0]] == [3, 7]
    m = create_model("ecanet50", eca_kernel="adaptive")
    assert m.layer1[0].att.conv.kernel_size[0] == 5
    with pytest.raises(ValueError):
        create_model("ecanet50", eca_kernel=(3, 4, 5, 7))


# ---------------------------------------------------------------- whole models
def tiny_kwargs(name, **extra):
    """TINY plus small attention options, each only where the model takes it (others are refused)."""
    # reduction 4 so the tiny excitation heads have several hidden units (one can be a dead ReLU)
    options = dict(TINY, reduction=4, gsop_dim=8, **extra)
    return {k: v for k, v in options.items() if k in model_options(name)}


# The families added after the paper's own rows run at the depths whose code paths differ (basic/bottleneck blocks,
# one or several blocks per stage); their deeper variants are built by tests/models/test_attention_plugins.py.
NEW_FAMILIES = ("cbam", "gcnet", "gsopnet")
FAST_MODELS = [n for n in list_models() if not n.startswith(NEW_FAMILIES) or n[len(n.rstrip("0123456789")):] in
               ("10", "18", "50")]


@pytest.mark.parametrize("name", FAST_MODELS)
def test_every_model_runs_and_backprops(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **tiny_kwargs(name))
    with torch.no_grad():  # layers initialised at zero (GC's last conv, CBAM's spatial BN scale) block the
        for p in model.parameters():  # gradient of what precedes them at step 0: give them values
            if p.dim() and not p.any():
                p.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        # every attention parameter must learn, but for GC's attention-pooling bias: softmax over the positions
        # is invariant to it, so its gradient is zero up to rounding (exactly zero with some thread counts)
        if ".att." in pname and not pname.endswith("conv_mask.bias"):
            assert p.grad.abs().sum() > 0, pname


def test_learnable_dct_weights_get_gradients():
    torch.manual_seed(0)
    model = create_model("fcanet18", num_classes=10, dct_weights="learnable", reduction=4, **TINY)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("dct_layer.weight")]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)
    fixed = create_model("fcanet18", num_classes=10, **TINY)
    assert not any(n.endswith("dct_layer.weight") for n, _ in fixed.named_parameters())
    assert any(n.endswith("dct_layer.weight") for n in fixed.state_dict())


PAPER_PARAMS = {  # Table 2, millions
    "resnet": {34: 21.80, 50: 25.56, 101: 44.55, 152: 60.19},
    "senet": {34: 21.95, 50: 28.07, 101: 49.29, 152: 66.77},
    "ecanet": {34: 21.80, 50: 25.56, 101: 44.55, 152: 60.19},
    "fcanet": {34: 21.95, 50: 28.07, 101: 49.29, 152: 66.77},
}


@pytest.mark.slow
def test_table2_parameter_counts_exact():
    with open(PAPER / "table2_imagenet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from_csv = {(r["method"].lower(), int(r["backbone"].split("-")[1])): float(r["params_M"]) for r in rows}
    for family, depths in PAPER_PARAMS.items():
        for depth, expect in depths.items():
            assert from_csv[(family, depth)] == expect
            n = models.count_params(create_model(f"{family}{depth}"))
            assert round(n / 1e6, 2) == expect, (family, depth, n)


@pytest.mark.parametrize("size", [(128, 128), (160, 160), (256, 256), (320, 480), (200, 333)])
def test_arbitrary_input_sizes(size):
    model = create_model("fcanet50", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_channels_last_and_autocast_agree_with_fp32():
    torch.manual_seed(0)
    model = create_model("fcanet18", num_classes=10, **TINY).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(cl, ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.allclose(low.float(), ref, atol=0.1 * ref.abs().max().item())
    assert (low.float().argmax(1) == ref.argmax(1)).float().mean() >= 0.75


# ---------------------------------------------------------------- checkpoint interop
@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_round_trip(depth, tmp_path):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"resnet{depth}")(num_classes=7).eval()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    ours = create_model(f"resnet{depth}", num_classes=7).eval()
    report = load_weights(ours, path)
    assert report.new == [] and report.unexpected == [] and len(report.loaded) == len(tv.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    # and back: our state dict loads strictly into torchvision
    tv2 = getattr(torchvision.models, f"resnet{depth}")(num_classes=7).eval()
    tv2.load_state_dict(ours.state_dict(), strict=True)


def _authors_layout(model, prefix="module."):
    """A state dict as the authors' released checkpoints store it."""
    return {"epoch": 100, "best_prec1": 78.5, "state_dict": {prefix + k: v for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("prefix,wrapped", [("module.", True), ("", True), ("module.", False)])
def test_loads_authors_checkpoint_layout(prefix, wrapped, tmp_path):
    torch.manual_seed(1)
    src = create_model("fcanet50", num_classes=10).eval()
    keys = src.state_dict().keys()
    assert "layer1.0.att.fc.0.weight" in keys and "layer4.2.att.dct_layer.weight" in keys
    assert src.state_dict()["layer3.0.att.dct_layer.weight"].shape == (1024, 14, 14)
    assert src.state_dict()["layer1.0.att.fc.0.weight"].shape == (16, 256)
    ckpt = _authors_layout(src, prefix)
    if not wrapped:
        ckpt = ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "fca.pth")
    torch.manual_seed(2)
    dst = create_model("fcanet50", num_classes=10).eval()
    report = load_weights(dst, tmp_path / "fca.pth")
    assert report.new == [] and report.unexpected == []
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_attention_model_from_plain_resnet_reports_new_keys():
    plain = create_model("resnet18", num_classes=10, widths=TINY["widths"])
    for name in ("senet18", "ecanet18", "fcanet18", "cbam18", "gcnet18", "gsopnet18"):
        model = create_model(name, num_classes=10, **tiny_kwargs(name))
        report = load_weights(model, plain.state_dict())
        att_keys = sorted(k for k in model.state_dict() if ".att." in k)
        assert sorted(report.new) == att_keys and att_keys
        assert len(report.loaded) == len(plain.state_dict())
        assert torch.equal(model.conv1.weight, plain.conv1.weight)


def test_load_errors_are_clear(tmp_path):
    model = create_model("resnet18", num_classes=10, widths=TINY["widths"])
    other = create_model("resnet18", num_classes=5, widths=TINY["widths"])
    with pytest.raises(ValueError, match=r"shape mismatch for fc.weight"):
        load_weights(model, other.state_dict())
    report = load_weights(model, other.state_dict(), ignore=("fc.",))
    assert report.ignored == ["fc.weight", "fc.bias"]
    fca = create_model("fcanet18", num_classes=10, **TINY)
    with pytest.raises(ValueError, match="lacks"):
        load_weights(model, fca.state_dict())
    assert load_weights(model, fca.state_dict(), strict=False).unexpected
    low = create_model("fcanet18", num_classes=10, freq="low16", **TINY)
    with pytest.raises(ValueError, match="frequency selection"):
        load_weights(low, fca.state_dict())
    broken = tmp_path / "broken.pth"
    torch.save(model.state_dict(), broken)
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"broken\.pth is truncated or corrupt"):
        load_weights(model, broken)
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "missing.pth")


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="did you mean 'fcanet50'"):
        create_model("fcanet5O")
    with pytest.raises(ValueError, match="unknown model argument"):
        create_model("fcanet50", frq="top16")
    with pytest.raises(ValueError, match="out of range"):
        create_model("fcanet50", freq=[(0, 7)])
    assert create_model("fca_resnet18", **TINY).attention.kind == "fca"


def test_timm_and_hub_entrypoints():
    import timm
    models.register_timm()
    model = timm.create_model("fcanet18", num_classes=3, widths=(16, 32, 64, 128), input_size=64)
    assert isinstance(model, models.ResNet) and model.fc.out_features == 3
    for name in ("cbam50", "gcnet101", "gsopnet50"):
        assert timm.is_model(name)
    gsop = timm.create_model("gsopnet18", num_classes=3, widths=(16, 32, 64, 128), gsop_dim=8)
    assert gsop.attention.kind == "gsop" and gsop.strides == (1, 2, 2, 1)
    hub = torch.hub.load(str(Path(__file__).resolve().parents[2]), "fcanet18", source="local", num_classes=3,
                         widths=(16, 32, 64, 128))
    assert isinstance(hub, models.ResNet) and hub.attention.kind == "fca"


def test_loads_released_eca_layout_old_bn_and_half_precision_checkpoints():
    torch.manual_seed(0)
    src = create_model("ecanet18", num_classes=10, widths=TINY["widths"]).eval()
    # BangguWu/ECANet names the attention module `eca`; pre-0.4.1 checkpoints lack num_batches_tracked
    eca_layout = {k.replace(".att.", ".eca."): v for k, v in src.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    dst = create_model("ecanet18", num_classes=10, widths=TINY["widths"]).eval()
    report = load_weights(dst, {"state_dict": eca_layout})
    assert report.unexpected == [] and all(k.endswith("num_batches_tracked") for k in report.new)
    assert torch.equal(dst.layer1[0].att.conv.weight, src.layer1[0].att.conv.weight)
    fca = create_model("fcanet18", num_classes=10, **TINY)
    half = {k: v.half() if v.is_floating_point() else v for k, v in fca.state_dict().items()}
    assert load_weights(create_model("fcanet18", num_classes=10, **TINY), half).new == []


# ---------------------------------------------------------------- frequency grid S and the CIFAR stem
def test_cifar_stem_maps_and_grid4_scaling():
    """32x32 inputs with the CIFAR stem: stage maps 32/16/8/4, so a 4x4 grid fits every stage and the index
    (u, v) of the grid is (u * size // 4, v * size // 4) in each stage's DCT."""
    model = create_model("fcanet10", num_classes=10, widths=(16, 16, 32, 32), input_size=32, stem="cifar",
                         grid=4, freq=[(1, 3)], reduction=4)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    assert [layer[0].att.dct_layer.dct_h for layer in layers] == [32, 16, 8, 4]
    for layer in layers:
        pool = layer[0].att.dct_layer
        s = pool.dct_h // 4
        expect = dct_2d(pool.dct_h, pool.dct_w, 1 * s, 3 * s).float()
        assert torch.allclose(pool.weight[0], expect)
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 32, 4, 4)


def test_grid_larger_than_a_stage_map_is_refused():
    # ImageNet stem at 32x32: maps 8/4/2/1, smaller than a 4x4 grid from stage 3 on
    with pytest.raises(ValueError, match=r"stage 3 sees a 2x2 map.*smaller than the 4x4 frequency grid"):
        create_model("fcanet18", input_size=32, grid=4, freq=[(0, 0)])
    with pytest.raises(ValueError, match="smaller than the 7x7"):
        create_model("fcanet50", input_size=160, grid=7)  # last map 5x5
    # the published orders are defined on the 7x7 grid only
    with pytest.raises(ValueError, match="defined on the 7x7 grid"):
        create_model("fcanet18", input_size=32, stem="cifar", grid=4, freq="top4")
    with pytest.raises(ValueError, match=r"out of range.*4x4 grid"):
        create_model("fcanet18", input_size=32, stem="cifar", grid=4, freq=[(4, 0)])
    with pytest.raises(ValueError, match="unknown stem"):
        create_model("resnet18", stem="tiny")
    # default (no grid given): the authors' behaviour, a 7x7 DCT of a pooled-up small map
    assert create_model("fcanet18", input_size=32).layer4[0].att.dct_layer.dct_h == 7


def test_explicit_grid7_at_224_matches_the_default():
    a = create_model("fcanet50", freq="top16")
    b = create_model("fcanet50", freq="top16", grid=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if ka.endswith("dct_layer.weight"):
            assert ka == kb and torch.equal(va, vb)


def test_low_order_generalises_the_published_list():
    from models.dct import low_order
    assert low_order(7)[:32] == published("low")
    assert sorted(low_order(7)) == [(u, v) for u in range(7) for v in range(7)]
    four = low_order(4)
    assert four == [f for f in published("low") if max(f) < 4] and len(four) == 16
    assert sorted(low_order(9)) == [(u, v) for u in range(9) for v in range(9)]
    assert scale_frequencies([(1, 1)], 32, 32, grid=4) == [(8, 8)]
