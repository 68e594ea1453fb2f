"""Start-up cost: ``import models`` must not import timm; timm finds the models after ``models.register_timm()``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_import_models_does_not_import_timm():
    assert _python("import sys, models; print('timm' in sys.modules)").strip() == "False"


@pytest.mark.parametrize("order", ["models first", "timm first"])
def test_timm_create_model_after_register_timm(order):
    """timm finds the models once ``models.register_timm()`` ran, whichever was imported first; importing
    ``models`` alone registers nothing (no import hook) and a second call adds nothing."""
    pytest.importorskip("timm")
    imports = "import models; import timm" if order == "models first" else "import timm; import models"
    out = _python(f"{imports}\n"
                  "print(timm.is_model('fcanet18'))\n"
                  "added = models.register_timm()\n"
                  "m = timm.create_model('fcanet18', num_classes=3, widths=(16, 32, 64, 128), input_size=64)\n"
                  "print(type(m).__name__, m.fc.out_features, timm.is_model('senet152'), timm.is_model('ecanet34'),"
                  " timm.is_model('cbam50'), timm.is_model('gcnet50'), timm.is_model('gsopnet101'),"
                  " timm.is_model('resnet50'), 'fcanet50' in added, len(added))\n"
                  "print(models.register_timm())")
    lines = out.split("\n")
    assert lines[0] == "False"  # nothing registered by the import
    assert lines[1] == "ResNet 3 True True True True True True True 36"  # 6 families x 6 depths
    assert lines[2] == "[]"  # idempotent
