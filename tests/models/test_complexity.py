"""scripts/complexity.py: exact parameter counts, the three FLOP conventions, and the Table 2 files it writes."""
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import complexity
from models.attention import SE

ROOT = Path(__file__).resolve().parents[2]


def test_conventions_on_a_network_counted_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    m = complexity.measure_model(net, size=8)
    conv, bias, bn, relu, maxpool, avgpool, fc, fc_bias = 4 * 64 * 27, 4 * 64, 2 * 256, 256, 256, 4 * 16, 8, 2
    assert round(m.macs * 1e9) == conv + fc  # FlopCounterMode: convolutions and matrix products only
    assert round(m.layers * 1e9) == conv + bias + bn + relu + maxpool + avgpool + fc + fc_bias
    assert round(m.all_ops * 1e9) == conv + fc + bn + relu + maxpool + avgpool  # aten: biases fused, no elementwise


class _Residual(nn.Module):
    """conv -> SE -> + shortcut: the squeeze is a pooling in the layer convention; the gating product and the
    residual add count in all ops only (fused into one addcmul: 2 ops per element)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1, bias=False)
        self.se = SE(8, reduction=4)

    def forward(self, x):
        y = self.conv(x)
        return self.se(y, y)


def test_attention_squeeze_and_residual_add_by_convention():
    m = complexity.measure_model(_Residual(), size=4)
    conv, gap, fc1, relu, fc2, gating = 8 * 16 * 3, 8 * 16, 8 * 2, 2, 2 * 8, 2 * 8 * 16
    assert round(m.layers * 1e9) == conv + gap + fc1 + relu + fc2
    sigmoid = 8
    assert round(m.all_ops * 1e9) == conv + gap + fc1 + relu + fc2 + sigmoid + gating


def test_table2_text_lists_every_row_and_says_where_numbers_come_from():
    rows = complexity.paper_rows()
    measured = {complexity.model_name(r): complexity.Measure(1_000_000, 1.0, 1.01, 1.02) for r in rows
                if complexity.model_name(r)}
    text = complexity.table2_text(rows, measured)
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(table) == len(rows) == 23
    assert "numbers for every method other than FcaNet are quoted from other work" in text
    for row, line in zip(rows, table, strict=True):
        name = complexity.model_name(row)
        if name is None:
            assert line.startswith("| AANet |") and "not built" in line
        else:
            config = f"configs/imagenet/{name}.yaml"
            assert f"`{config}`" in line and (ROOT / config).is_file()
            assert ("other recipe" in line) == (row["method"] != "FcaNet")
            assert "100 ep, 8x" in line and line.rstrip().endswith("| |")  # our top-1: empty until run


def test_only_rejects_names_outside_table2(capsys):
    assert complexity.main(["--only", "resnet18", "--output", "/nonexistent/x.md"]) == 2
    assert "resnet18 not in Table 2" in capsys.readouterr().err


@pytest.mark.slow
def test_complexity_table(tmp_path):
    out, table2 = tmp_path / "complexity.md", tmp_path / "table2.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "complexity.py"), "--output", str(out),
                           "--table2", str(table2), "--only", "resnet34", "fcanet34", "gcnet50"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| resnet34 | 21.80 (21,797,672) | 21.80 | yes | 3.664 | 3.676 | 3.677 | 3.68 | yes |" in text
    assert "| fcanet34 | 21.95 (21,954,856) | 21.95 | yes |" in text
    assert "| gcnet50 | 28.11 (28,105,032) | 28.11 | yes | 4.103 | 4.130 | 4.147 | 4.13 | yes |" in text
    assert "**layers: every measured row equals the paper's figure" in text
    assert "senet50" not in text
    assert "| GCNet | ResNet-50 | 77.70 / 93.66 |" in table2.read_text()
