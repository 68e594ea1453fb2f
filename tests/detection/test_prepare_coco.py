"""scripts/prepare_coco.py: a COCO tree is checked, problems are one line and exit 2."""
from __future__ import annotations

import json
import shutil

import prepare_coco
from PIL import Image


def test_good_tree_passes_with_a_note_on_counts(shapes_root, capsys):
    assert prepare_coco.main(["--root", str(shapes_root), "--sample", "5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("train2017: 12 images") and "all files present, 5 sampled sizes match" in out[0]
    assert "official COCO 2017 val2017 has 5000 images" in out[1]


def test_missing_image_and_wrong_size_are_errors(shapes_root, tmp_path, capsys):
    root = tmp_path / "coco"
    shutil.copytree(shapes_root, root)
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    first = root / "val2017" / data["images"][0]["file_name"]
    Image.new("RGB", (7, 5)).save(first)
    assert prepare_coco.main(["--root", str(root), "--splits", "val2017", "--sample", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is 7x5 px, its annotation entry says" in err[0]
    first.unlink()
    assert prepare_coco.main(["--root", str(root), "--splits", "val2017"]) == 2
    assert "1 of 7 listed images are missing" in capsys.readouterr().err
    assert prepare_coco.main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
