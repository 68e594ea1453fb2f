"""CBAM, the GC block and GSoP-Net1 in the zoo: Table 2 sizes, placement and strides as registry data, the
modules' arithmetic, their initialisation, refused options, and a tiny run of each through the trainer."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from models import count_params, create_model, model_options
from models.attention import CBAM, GSoP, GlobalContext, covariance
from models.registry import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
TABLE2 = ROOT / "results" / "paper" / "table2_imagenet.csv"
METHODS = {"ResNet": "resnet", "SENet": "senet", "ECANet": "ecanet", "FcaNet": "fcanet", "CBAM": "cbam",
           "GCNet": "gcnet", "GSoPNet1": "gsopnet"}
TINY = dict(widths=(16, 16, 32, 32))


def table2_rows():
    with open(TABLE2, newline="") as f:
        return list(csv.DictReader(f))


def on_meta(name, **kwargs):
    """The full-size model without allocating or initialising its weights (sizes only)."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


# ---------------------------------------------------------------- sizes
@pytest.mark.slow  # ~10 s on 2 busy cores: FCA's DCT bases are computed even on the meta device
def test_every_buildable_table2_row_has_the_papers_parameter_count():
    rows = table2_rows()
    built = [r for r in rows if r["method"] in METHODS]
    assert {r["method"] for r in rows} - set(METHODS) == {"AANet"}  # the one row that stays quoted
    assert len(built) == 20
    for row in built:
        name = f"{METHODS[row['method']]}{row['backbone'].split('-')[1]}"
        n = count_params(on_meta(name))
        assert f"{n / 1e6:.2f}" == row["params_M"], (name, n, row["params_M"])


def test_exact_counts_of_the_new_rows_and_the_official_biased_cbam():
    exact = {"cbam50": 28_073_576,  # SE-50 + 16 x (7x7x2 conv + BN(1))
             "cbam101": 49_295_628, "gcnet50": 28_105_032, "gsopnet50": 28_285_224}
    paper = {f"{METHODS[r['method']]}{r['backbone'].split('-')[1]}": r["params_M"] for r in table2_rows()
             if r["method"] in ("CBAM", "GCNet", "GSoPNet1")}
    assert set(paper) == set(exact)  # every Table 2 row of the three methods
    for name, n in exact.items():
        assert count_params(on_meta(name)) == n and f"{n / 1e6:.2f}" == paper[name], name
    # the official CBAM code's MLP biases: C/16 + C per block
    assert count_params(on_meta("cbam50", mlp_bias=True)) == 28_073_576 + 16_048
    assert f"{count_params(on_meta('cbam101', mlp_bias=True)) / 1e6:.2f}" == "49.33"


# ---------------------------------------------------------------- placement and strides (registry data)
def test_gsopnet_places_gsop_in_the_last_block_of_each_stage_and_keeps_layer4_at_stride_1():
    fam = FAMILIES["gsopnet"]
    assert (fam.attention_blocks, fam.strides) == ("last", (1, 2, 2, 1))
    model = create_model("gsopnet50", num_classes=5, gsop_dim=8, widths=(16, 16, 32, 64))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        kinds = [type(block.att) for block in layer]
        assert kinds == [nn.Identity] * (len(layer) - 1) + [GSoP]
    assert model.layer4[0].conv2.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    assert model.layer3[0].conv2.stride == (2, 2)
    # the first stage's reduction is strided (official rule), the others are not
    assert [layer[-1].att.reduce.stride for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        (2, 2), (1, 1), (1, 1), (1, 1)]
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)  # /16: last stage stride 1
    assert create_model("cbam50", num_classes=5, **TINY).forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 2


def test_every_block_of_cbam_and_gcnet_has_its_module():
    for name, cls in (("cbam34", CBAM), ("gcnet50", GlobalContext)):
        model = on_meta(name)
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        assert all(type(b.att) is cls for b in blocks), name


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{f}{d}" for f in ("cbam", "gcnet", "gsopnet") for d in (34, 101, 152)])
def test_deeper_variants_run(name):
    model = create_model(name, num_classes=3, **{k: v for k, v in dict(TINY, gsop_dim=8).items()
                                                   if k in model_options(name)}).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


# ---------------------------------------------------------------- the modules' arithmetic
def test_cbam_is_channel_gate_then_spatial_gate():
    torch.manual_seed(0)
    att = CBAM(32, reduction=4, mlp_bias=True).eval()
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.3)
        att.spatial.bn.running_mean.fill_(0.1)
        att.spatial.bn.running_var.fill_(2.0)
    x, r = torch.randn(2, 32, 6, 5), torch.randn(2, 32, 6, 5)
    fc0, fc2, bn = att.channel.fc[0], att.channel.fc[2], att.spatial.bn

    def mlp(v):
        return fc2(torch.relu(fc0(v)))
    ch = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[..., None, None]  # Eq. 2
    y = x * ch
    sp = torch.cat([y.amax(1, keepdim=True), y.mean(1, keepdim=True)], 1)  # official order: max, then mean
    sp = torch.nn.functional.conv2d(sp, att.spatial.conv.weight, padding=3)
    sp = (sp - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expect = y * torch.sigmoid(sp)
    with torch.no_grad():
        assert torch.allclose(att(x), expect, atol=1e-6)
        assert torch.allclose(att(x, r), expect + r, atol=1e-6)  # the fused residual add


def test_gc_block_adds_an_attention_pooled_context():
    torch.manual_seed(0)
    att = GlobalContext(32, reduction=4).eval()
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 32, 5, 7)
    w = torch.softmax(att.conv_mask(x).flatten(1), dim=1)  # (N, HW)
    context = (x.flatten(2) * w[:, None]).sum(2)[..., None, None]
    expect = x + att.channel_add_conv(context)
    with torch.no_grad():
        assert torch.allclose(att(x), expect, atol=1e-5)
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(att(xc), expect, atol=1e-5)  # the channels_last path reads x as (N, HW, C)
        assert torch.allclose(att(x, x), expect + x, atol=1e-5)


def test_gsop_covariance_is_the_official_centred_form():
    torch.manual_seed(0)
    z = torch.randn(3, 6, 4, 5)
    m = 20
    i_hat = (-1.0 / m / m) * torch.ones(m, m) + (1.0 / m) * torch.eye(m)  # the official X I_hat X^T
    x = z.reshape(3, 6, m)
    assert torch.allclose(covariance(z), x @ i_hat @ x.transpose(1, 2), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert covariance(z).dtype == torch.float32  # kept in fp32 under autocast


def test_gsop_rescales_channels_with_a_row_wise_conv_of_the_covariance():
    torch.manual_seed(0)
    att = GSoP(16, dim=4).eval()
    x = torch.randn(2, 16, 6, 6)
    z = torch.relu(att.reduce_bn(att.reduce(torch.relu(x))))
    cov = covariance(z)  # (N, 4, 4)
    rows = att.row_bn(cov.unsqueeze(3))  # BN over the 4 rows
    # row i of the covariance feeds outputs 4i..4i+3 only (grouped conv with a d x 1 kernel)
    w = att.row_conv.weight  # (16, 1, 4, 1)
    y = torch.stack([(rows[:, i // 4, :, 0] * w[i, 0, :, 0]).sum(1) + att.row_conv.bias[i] for i in range(16)], 1)
    scale = torch.sigmoid(att.fc(y[..., None, None]))
    with torch.no_grad():
        assert torch.allclose(att(x), x * scale, atol=1e-5)


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    model = create_model("gcnet18", num_classes=3, **TINY)
    gc = model.layer1[0].att
    assert not gc.channel_add_conv[3].weight.any() and not gc.channel_add_conv[3].bias.any()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(gc(x), x)  # every GC block starts as the identity of its branch
    cbam = create_model("cbam18", num_classes=3, **TINY).layer2[1].att
    assert not cbam.spatial.bn.weight.any()  # the spatial gate starts at sigmoid(0) = 0.5 everywhere
    with torch.no_grad():
        s = cbam.spatial.eval()(torch.randn(2, 32, 4, 4))
    assert torch.allclose(s, torch.full_like(s, 0.5))
    # the generic ResNet init (Kaiming fan_out) still applies to the other convolutions
    assert create_model("gsopnet18", num_classes=3, **TINY).layer1[1].att.reduce.weight.std() > 0


@pytest.mark.parametrize("name", ["cbam18", "gcnet18", "gsopnet18"])
def test_channels_last_and_bf16_autocast_agree_with_fp32(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **{k: v for k, v in dict(TINY, gsop_dim=8).items()
                                                  if k in model_options(name)}).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() and not p.any():
                p.normal_(0, 0.1)
        x = torch.randn(2, 3, 48, 48)
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.allclose(cl, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(low.float(), ref, atol=0.1 * ref.abs().max().item())


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("name,option,value,taker", [
    ("resnet18", "reduction", 8, "senet*"), ("resnet18", "grid", 4, "fcanet*"),
    ("resnet50", "input_size", 160, "fcanet*"), ("fcanet18", "eca_kernel", (3, 3, 5, 5), "ecanet*"),
    ("senet18", "freq", "low4", "fcanet*"), ("cbam18", "gsop_dim", 64, "gsopnet*"),
    ("gsopnet50", "mlp_bias", True, "cbam*"), ("gcnet50", "grid", 7, "fcanet*"),
    ("ecanet18", "reduction", 8, "cbam*"),
])
def test_options_a_model_would_ignore_are_refused(name, option, value, taker):
    with pytest.raises(ValueError) as e:
        create_model(name, **{option: value})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name} does not use option {option!r}") and taker in msg
    assert create_model(name, **{option: None}, **TINY)  # None means "the default": accepted


def test_each_family_declares_its_options():
    assert model_options("resnet50") == ("widths", "zero_init_residual", "in_chans", "stem")
    assert set(model_options("cbam50")) >= {"reduction", "mlp_bias"}
    assert "gsop_dim" in model_options("gsop_resnet50")
    assert create_model("cbam18", reduction=4, mlp_bias=True, **TINY).layer1[0].att.channel.fc[0].bias is not None
    assert create_model("gsopnet18", gsop_dim=8, **TINY).layer1[1].att.row_conv.out_channels == 32
    with pytest.raises(ValueError, match="mlp_bias must be true or false"):
        create_model("cbam18", mlp_bias="yes")


def test_registered_with_timm_and_hub():
    pytest.importorskip("timm")
    import timm
    models.register_timm()
    for name in ("cbam50", "gcnet101", "gsopnet50", "cbam152"):
        assert timm.is_model(name), name
    hub = torch.hub.load(str(ROOT), "gcnet18", source="local", num_classes=3, widths=(16, 16, 32, 32))
    assert hub.attention.kind == "gc"


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["cbam10", "gcnet10", "gsopnet10"])
def test_tiny_model_trains_through_the_trainer(name, tmp_path):
    from engine.config import load_config
    from engine.trainer import fit

    data = write_tiny_imagefolder(tmp_path / "data", train_per_class=4, val_per_class=2)
    out = tmp_path / "run"
    kwargs = "{widths: [8, 8, 16, 16], gsop_dim: 4}" if name.startswith("gsop") else "{widths: [8, 8, 16, 16]}"
    summary = fit(load_config(BASE_CONFIG, tiny_overrides(data, out, **{
        "model.name": name, "model.kwargs": kwargs, "train.epochs": 1, "train.warmup_epochs": 0})))
    assert summary["final_top1"] >= 0 and (out / "checkpoints" / "last.pth").is_file()
    saved = torch.load(out / "checkpoints" / "last.pth", weights_only=True)["model"]
    fresh = create_model(name, num_classes=3, widths=(8, 8, 16, 16),
                         **({"gsop_dim": 4} if name.startswith("gsop") else {}))
    assert any(".att." in k for k in saved) and saved.keys() == fresh.state_dict().keys()
    assert models.load_weights(fresh, saved).new == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"])


def test_trainer_refuses_an_option_the_model_ignores(tmp_path):
    from engine.config import ConfigError, load_config
    from engine.trainer import fit

    overrides = tiny_overrides(tmp_path / "data", tmp_path / "run", **{
        "model.name": "gcnet10", "model.kwargs": "{widths: [8, 8, 16, 16], mlp_bias: true}"})
    # refused as the config is loaded (the config layer reads the registry's option table), before any run dir
    with pytest.raises(ConfigError, match=r"model.kwargs.mlp_bias.*gcnet10 has no CBAM attention, so mlp_bias "
                                          r"would be ignored.*\(cbam\*\)"):
        fit(load_config(BASE_CONFIG, overrides))
    assert not (tmp_path / "run").exists()


def test_resnet_options_are_the_resnet_constructor_arguments_the_registry_does_not_set():
    import inspect

    from models.registry import RESNET_OPTIONS
    from models.resnet import ResNet
    set_by_registry = {"block", "layers", "attention", "num_classes", "strides", "attention_blocks"}
    assert set(RESNET_OPTIONS) == set(inspect.signature(ResNet).parameters) - set_by_registry
    with pytest.raises(ValueError, match="unknown model argument"):
        create_model("resnet18", strides=(1, 1, 1, 1))  # placement and strides are registry data


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 16, 1, 1)])
def test_pointwise_conv_equals_a_1x1_conv(shape, channels_last):
    from models.attention import PointwiseConv
    torch.manual_seed(0)
    ours, ref = PointwiseConv(shape[1], 3), nn.Conv2d(shape[1], 3, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
