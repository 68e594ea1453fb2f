"""Start-up cost: ``import models`` must not import timm, yet timm still finds the models afterwards."""
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
def test_timm_create_model_after_import_models(order):
    pytest.importorskip("timm")
    imports = "import models; import timm" if order == "models first" else "import timm; import models"
    out = _python(f"{imports}\n"
                  "m = timm.create_model('fcanet18', num_classes=3, widths=(16, 32, 64, 128), input_size=64)\n"
                  "print(type(m).__name__, m.fc.out_features, timm.is_model('senet152'), timm.is_model('ecanet34'))\n"
                  "from models import _timm; print(_timm.register())")
    assert out.split("\n")[:2] == ["ResNet 3 True True", "[]"]  # registered once; a second call adds nothing
