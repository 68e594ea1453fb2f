"""Model options are checked by the config layer, once, without importing torch: the name, unknown options,
and options the chosen model would ignore."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import BASE_CONFIG, ROOT, subprocess_env
from engine.config import ConfigError, ignored_model_options, load_config


@pytest.mark.parametrize("overrides, message", [
    (["model.name=resnet18", "model.kwargs={reduction: 4}"],
     "config key 'model.kwargs.reduction': resnet18 has no SE, frequency channel, CBAM or GC attention, so "
     "reduction would be ignored; remove it or choose a model that has it (senet*, fcanet*, cbam*, gcnet*)"),
    (["model.name=resnet18", "model.kwargs={grid: 4}"],
     "config key 'model.kwargs.grid': resnet18 has no frequency channel attention, so grid would be ignored; "
     "remove it or choose a model that has it (fcanet*)"),
    (["model.name=fcanet18", "model.kwargs={eca_kernel: [3, 3, 3, 3]}"],
     "config key 'model.kwargs.eca_kernel': fcanet18 has no ECA attention, so eca_kernel would be ignored; "
     "remove it or choose a model that has it (ecanet*)"),
    (["model.name=ecanet50", "model.kwargs={reduction: 8}"], "config key 'model.kwargs.reduction': ecanet50 has no"),
    (["model.name=senet50", "model.freq=low4"], "config key 'model.freq': senet50 has no frequency channel"),
    (["model.name=senet50", "model.kwargs={dct_weights: learnable}"], "config key 'model.kwargs.dct_weights'"),
    (["model.name=fcanet18", "model.kwargs={widht: [8, 8, 8, 8]}"],
     "config key 'model.kwargs.widht': not an option of fcanet18 (did you mean 'widths'?)"),
    (["model.name=fcanet18", "model.kwargs={freq: low4}"],
     "config key 'model.kwargs.freq': set the frequency selection with model.freq"),
    (["model.name=fcanet17"], "config key 'model.name': unknown model 'fcanet17' (did you mean"),
])
def test_options_a_model_ignores_or_lacks_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(BASE_CONFIG, overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["model.name=senet18", "model.kwargs={reduction: 8}"],
    ["model.name=ecanet18", "model.kwargs={eca_kernel: adaptive}"],
    ["model.name=fcanet18", "model.freq=low4", "model.kwargs={reduction: 8, grid: 7, dct_weights: learnable}"],
    ["model.name=resnet18", "model.kwargs={widths: [8, 8, 16, 16], stem: cifar, input_size: 32}"],
])
def test_options_a_model_uses_are_accepted(overrides):
    load_config(BASE_CONFIG, overrides)


def test_ignored_options_follow_the_registry():
    assert ignored_model_options("resnet18", {"reduction": 4, "grid": 4, "widths": [1, 1, 1, 1], "input_size": 32}) \
        == ["reduction", "grid"]
    assert ignored_model_options("se_resnet50", {"reduction": 4, "eca_kernel": [3, 3, 3, 3]}) == ["eca_kernel"]
    assert ignored_model_options("fcanet50", {"reduction": 4, "grid": 7, "freq": "top16"}) == []


def test_a_value_the_constructor_refuses_is_one_config_line():
    from engine.builders import build_model
    cfg = load_config(BASE_CONFIG, ["model.name=fcanet18", "model.kwargs={widths: [15, 16, 32, 32]}"])
    with pytest.raises(ConfigError, match=r"^config key 'model.kwargs': cannot build 'fcanet18': FCA: 15 channels "
                                          r"cannot be split into k=16"):
        build_model(cfg)


def test_loading_and_checking_a_config_does_not_import_torch():
    base = str(BASE_CONFIG)
    code = "\n".join([
        "import sys",
        "from engine.config import load_config",
        f"load_config({base!r}, ['model.name=fcanet18', 'model.freq=low4', 'model.kwargs={{grid: 7}}'])",
        "try:",
        f"    load_config({base!r}, ['model.name=resnet18', 'model.freq=low4'])",
        "except ValueError:",
        "    pass",
        "print(sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
