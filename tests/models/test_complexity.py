"""scripts/complexity.py writes the Table 2 comparison with exact parameter counts."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_complexity_table(tmp_path):
    out = tmp_path / "complexity.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "complexity.py"), "--output", str(out),
                           "--only", "resnet34", "fcanet34"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| resnet34 | 21.80 (21,797,672) | 21.80 | yes |" in text
    assert "| fcanet34 | 21.95 (21,954,856) | 21.95 | yes |" in text
    assert "senet50" not in text
