"""Checkpoint layouts of other releases load strictly into CBAM/GC/GSoP models (or are refused with one line), and
unsafe pickles are refused without being unpickled.

Official layouts are written here from the key names of each release's model file (synthetic state dicts);
timm's are produced by timm itself."""
from __future__ import annotations

import functools
import io
import os
import pickle

import pytest
import torch

from models import create_model, load_weights, read_state_dict
from models.weights import _pickle_globals

TINY = dict(widths=(8, 8, 16, 16))


def randomised(model):
    """``model`` in eval mode with every parameter and BN statistic random (zero-initialised layers too), so
    that a wrong key, order or reshape changes the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def same_outputs(a, b, atol=1e-5) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=atol)


# ---------------------------------------------------------------- official CBAM (Jongchan/attention-module)
# MODELS/model_resnet.py: ``self.cbam = CBAM(planes * expansion, 16)``; MODELS/cbam.py: ChannelGate.mlp =
# Sequential(Flatten, Linear, ReLU, Linear) (biases), SpatialGate.spatial = BasicConv(conv 7x7, bn), ChannelPool =
# cat(max, mean). Their trainer saves {"epoch", "arch", "state_dict" (DataParallel: "module."), "best_prec1", ...}.
OFFICIAL_CBAM = {"att.channel.fc.0.": "cbam.ChannelGate.mlp.1.", "att.channel.fc.2.": "cbam.ChannelGate.mlp.3.",
                 "att.spatial.conv.": "cbam.SpatialGate.spatial.conv.",
                 "att.spatial.bn.": "cbam.SpatialGate.spatial.bn."}


def official_cbam_checkpoint(model) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in OFFICIAL_CBAM.items():
            key = key.replace(ours, theirs)
        assert ".att." not in key
        state["module." + key] = value
    return {"epoch": 90, "arch": "resnet", "best_prec1": 77.3, "state_dict": state}


def test_official_cbam_checkpoint_loads_strictly(tmp_path):
    src = randomised(create_model("cbam18", num_classes=10, mlp_bias=True, **TINY))
    ckpt = official_cbam_checkpoint(src)
    assert "module.layer2.1.cbam.ChannelGate.mlp.1.bias" in ckpt["state_dict"]
    assert ckpt["state_dict"]["module.layer2.1.cbam.SpatialGate.spatial.conv.weight"].shape == (1, 2, 7, 7)
    torch.save(ckpt, tmp_path / "RESNET18_CBAM.pth")
    dst = create_model("cbam18", num_classes=10, mlp_bias=True, **TINY)
    report = load_weights(dst, tmp_path / "RESNET18_CBAM.pth")
    assert report.new == [] and report.unexpected == []
    assert read_state_dict(tmp_path / "RESNET18_CBAM.pth").layout.kind == "cbam"
    assert same_outputs(src, dst.eval(), atol=0)


def test_official_cbam_refusals_are_one_line():
    src = create_model("cbam18", num_classes=10, mlp_bias=True, **TINY)
    ckpt = official_cbam_checkpoint(src)
    cases = [
        (create_model("cbam18", num_classes=10, **TINY), ckpt, "build the model with mlp_bias=True"),
        (create_model("senet18", num_classes=10, **TINY),
         ckpt, "official CBAM (Jongchan/attention-module) layout (cbam attention), but the model's attention is se: "
               "build a cbam* model"),
        (src, {"state_dict": {**ckpt["state_dict"], "module.layer1.0.cbam.ChannelGate.mlp.5.weight": torch.zeros(1)}},
         "key 'layer1.0.cbam.ChannelGate.mlp.5.weight', which no rule maps"),
        (src, {"state_dict": {**ckpt["state_dict"], "module.layer1.0.se.conv_attn.weight": torch.zeros(1)}},
         "mixes attention layouts"),
    ]
    for model, source, needle in cases:
        with pytest.raises(ValueError) as e:
            load_weights(model, source)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    # a bias-free checkpoint into a model with biases: the biases would stay random, so it is refused
    plain = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(("mlp.1.bias", "mlp.3.bias"))}
    with pytest.raises(ValueError, match="lacks 16 of the model's.*mlp_bias=False"):
        load_weights(create_model("cbam18", num_classes=10, mlp_bias=True, **TINY), plain)


def test_cbam_block_matches_the_official_forward():
    """Our attention loaded from the official keys computes what the official ChannelGate/SpatialGate compute:
    sigmoid(mlp(avg) + mlp(max)) with the biased MLP, then cat(max, mean) -> conv -> BN -> sigmoid."""
    model = randomised(create_model("cbam18", num_classes=10, mlp_bias=True, **TINY))
    sd = {k[len("module."):]: v for k, v in official_cbam_checkpoint(model)["state_dict"].items()}
    p = "layer3.0.cbam."
    x = torch.randn(2, 16, 5, 5)

    def mlp(v):
        h = torch.relu(v @ sd[p + "ChannelGate.mlp.1.weight"].T + sd[p + "ChannelGate.mlp.1.bias"])
        return h @ sd[p + "ChannelGate.mlp.3.weight"].T + sd[p + "ChannelGate.mlp.3.bias"]
    y = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[..., None, None]
    pooled = torch.cat((torch.max(y, 1)[0].unsqueeze(1), torch.mean(y, 1).unsqueeze(1)), dim=1)
    s = torch.nn.functional.conv2d(pooled, sd[p + "SpatialGate.spatial.conv.weight"], padding=3)
    s = torch.nn.functional.batch_norm(s, sd[p + "SpatialGate.spatial.bn.running_mean"],
                                       sd[p + "SpatialGate.spatial.bn.running_var"],
                                       sd[p + "SpatialGate.spatial.bn.weight"], sd[p + "SpatialGate.spatial.bn.bias"])
    dst = create_model("cbam18", num_classes=10, mlp_bias=True, **TINY).eval()
    load_weights(dst, {"state_dict": sd})
    with torch.no_grad():
        assert torch.allclose(dst.layer3[0].att(x), y * torch.sigmoid(s), atol=1e-6)


# ---------------------------------------------------------------- timm's CBAM and GC modules
def timm_resnet(attn_layer, block="basic"):
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    cls = BasicBlock if block == "basic" else Bottleneck
    assert timm.__version__
    return ResNet(cls, [1, 1, 1, 1], num_classes=10, block_args=dict(attn_layer=attn_layer))


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_timm_cbam_layout_loads_and_computes_the_same(mlp_bias):
    from timm.layers.cbam import CbamModule
    theirs = randomised(timm_resnet(functools.partial(CbamModule, mlp_bias=mlp_bias)))
    keys = theirs.state_dict().keys()
    assert "layer1.0.se.channel.fc1.weight" in keys and "layer1.0.se.spatial.conv.conv.weight" in keys
    ours = create_model("resnet10", num_classes=10)  # no attention: the CBAM keys are unexpected
    with pytest.raises(ValueError, match="build a cbam\\* model"):
        load_weights(ours, theirs.state_dict())
    ours = create_model("cbam10", num_classes=10, mlp_bias=mlp_bias)
    report = load_weights(ours, theirs.state_dict())
    assert report.new == [] and report.unexpected == []
    # timm's 1x1-conv MLP becomes our Linear; its (mean, max) spatial input becomes our (max, mean)
    assert torch.equal(ours.layer1[0].att.spatial.conv.weight[0, 0], theirs.layer1[0].se.spatial.conv.conv.weight[0, 1])
    assert same_outputs(ours.eval(), theirs)


def test_timm_global_context_add_fusion_loads_and_computes_the_same():
    from timm.layers.global_context import GlobalContext
    gca = functools.partial(GlobalContext, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)
    theirs = randomised(timm_resnet(gca, block="bottleneck"))
    assert theirs.state_dict()["layer1.0.se.mlp_add.norm.weight"].shape == (16,)
    from models.resnet import AttentionConfig, ResNet
    ours = ResNet("bottleneck", (1, 1, 1, 1), AttentionConfig("gc"), num_classes=10)
    report = load_weights(ours, theirs.state_dict())
    assert report.new == [] and report.unexpected == []
    assert ours.layer1[0].att.channel_add_conv[1].weight.shape == (16, 1, 1)
    for m in ours.modules():  # timm's LayerNorm2d uses eps 1e-6, the official block nn.LayerNorm's 1e-5
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    assert same_outputs(ours.eval(), theirs, atol=1e-5)


def test_timm_global_context_with_scale_fusion_is_refused():
    theirs = timm_resnet("gc", block="bottleneck")  # timm's default GC: scale fusion, ratio 1/8
    from models.resnet import AttentionConfig, ResNet
    with pytest.raises(ValueError, match=r"timm GlobalContext.*scale fusion \(attn_layer='gc'\)"):
        load_weights(ResNet("bottleneck", (1, 1, 1, 1), AttentionConfig("gc"), num_classes=10), theirs.state_dict())


# ---------------------------------------------------------------- official GC block and GSoP
def test_official_gc_block_layout(tmp_path):
    """xvjiarui/GCNet's mmdet ResNet stores the block at ``context_block`` with our module names."""
    src = randomised(create_model("gcnet18", num_classes=10, **TINY))
    state = {k.replace(".att.", ".context_block."): v for k, v in src.state_dict().items()}
    assert "layer1.0.context_block.channel_add_conv.1.weight" in state
    dst = create_model("gcnet18", num_classes=10, **TINY)
    assert load_weights(dst, state).new == []
    assert same_outputs(src, dst.eval(), atol=0)
    state["layer1.0.context_block.channel_mul_conv.0.weight"] = torch.zeros(1, 8, 1, 1)
    with pytest.raises(ValueError, match="channel_mul"):
        load_weights(dst, state)


# ZilinGao/Global-Second-order-Pooling-Convolutional-Networks, torchvision/models/resnet.py: the channel attention's
# layers are attributes of the Bottleneck itself.
OFFICIAL_GSOP = {"att.reduce.": "conv_for_DR.", "att.reduce_bn.": "bn_for_DR.", "att.row_bn.": "row_bn.",
                 "att.row_conv.": "row_conv_group.", "att.fc.": "fc_adapt_channels."}


def test_official_gsop_layout():
    src = randomised(create_model("gsopnet18", num_classes=10, gsop_dim=8, **TINY))
    state = {}
    for key, value in src.state_dict().items():
        for ours, theirs in OFFICIAL_GSOP.items():
            key = key.replace(ours, theirs)
        state[key] = value
    assert "layer4.1.row_conv_group.weight" in state and "layer4.0.conv_for_DR.weight" not in state
    dst = create_model("gsopnet18", num_classes=10, gsop_dim=8, **TINY)
    assert load_weights(dst, {"state_dict": state}).new == []
    assert same_outputs(src, dst.eval(), atol=0)
    state["layer1.1.conv_for_DR_spatial.weight"] = torch.zeros(8, 16, 1, 1)
    with pytest.raises(ValueError, match="position attention"):
        load_weights(dst, state)


# ---------------------------------------------------------------- unsafe pickles
class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickles_carrying_os_system_are_refused_as_unsafe(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _System(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ValueError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path} contains non-tensor Python objects (e.g. ")
    assert "system" in msg and "refused as unsafe" in msg and "not a PyTorch checkpoint" not in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert not marker.exists()


def test_globals_are_found_in_every_pickle_of_a_legacy_file(tmp_path):
    """torch's legacy format is several pickles in a row (magic number, protocol, system info, the object):
    the scan reads past the first ones, without executing anything."""
    buf = io.BytesIO()
    torch.save({"x": _System(tmp_path / "pwned")}, buf, _use_new_zipfile_serialization=False)
    found = _pickle_globals(buf.getvalue())
    assert any(g.endswith(".system") for g in found)
    assert _pickle_globals(pickle.dumps(1) + pickle.dumps(2)) == []
    assert not (tmp_path / "pwned").exists()
