"""The built-in demo (configs/demo/fcanet_digits.yaml) learns: >= 90% val top-1, seeded, on CPU."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT
from engine.entrypoints import train_main as main


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 2 min on an idle 2-core machine; shared CI cores have run it 5x slower
def test_digits_demo_reaches_90_percent(tmp_path, capsys):
    # Exactly the README command, only redirected into a temp folder (data tree and run directory).
    rc = main(["--config", str(ROOT / "configs/demo/fcanet_digits.yaml"), f"data.root={tmp_path}/digits",
               f"output_dir={tmp_path}/run", "train.progress=false"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["final_top1"] >= 90.0, summary
    assert summary["val_count"] == 360 and summary["epochs"] == 18 and summary["model"] == "fcanet18"
