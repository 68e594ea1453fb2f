"""eval_imagenet.py's checks: labels follow the checkpoint's classes (a val root lacking a class folder does not
shift them), non-finite weights or outputs are refused with one line and never reach --output as bare NaN,
an --output that cannot be a file is refused before evaluating, and KEY=VALUE overrides stand anywhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from engine.config import load_config
from engine.entrypoints import eval_main
from engine.trainer import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("evalchecks")
    data = write_tiny_imagefolder(tmp / "data", val_per_class=6)
    out = tmp / "run"
    fit(load_config(BASE_CONFIG, tiny_overrides(data, out, **{"train.epochs": 2})))
    return data, out


def run_eval(capsys, data: Path, checkpoint: Path, output: Path, *extra: str) -> tuple[int, dict | None, list[str]]:
    args = ["--config", str(BASE_CONFIG), "--checkpoint", str(checkpoint), "--output", str(output)]
    rc = eval_main(args + tiny_overrides(data, output.parent / "o") + list(extra))
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rc, (rows[0] if rows else None), [ln for ln in (out + err).splitlines() if ln.strip()]


def val_only(src: Path, dst: Path, keep: list[str]) -> Path:
    for c in keep:
        shutil.copytree(src / "val" / c, dst / "val" / c)
    return dst


def test_a_val_root_lacking_a_class_keeps_the_checkpoints_labels(trained, tmp_path, capsys):
    data, run = trained
    ckpt = run / "checkpoints" / "best.pth"
    rc, full, _ = run_eval(capsys, data, ckpt, tmp_path / "full.json")
    assert rc == 0 and full["count"] == 18
    rc, rest, lines = run_eval(capsys, val_only(data, tmp_path / "v02", ["class0", "class2"]), ckpt,
                               tmp_path / "rest.json")
    assert rc == 0
    assert any(ln.startswith("note: ") and "lacks 1 of the checkpoint's 3 classes (e.g. class1)" in ln for ln in lines)
    rc, one, _ = run_eval(capsys, val_only(data, tmp_path / "v1", ["class1"]), ckpt, tmp_path / "one.json")
    assert rc == 0
    # every image keeps its true label: the subsets' correct counts add up to the full set's
    assert rest["count"] + one["count"] == full["count"]
    assert rest["correct1"] + one["correct1"] == full["correct1"] and full["correct1"] > 0
    assert rest["correct5"] + one["correct5"] == full["correct5"]


def test_a_val_class_the_checkpoint_does_not_know_is_refused(trained, tmp_path, capsys):
    data, run = trained
    root = val_only(data, tmp_path / "v", ["class0", "class1"])
    shutil.copytree(data / "val" / "class2", root / "val" / "zebra")
    rc, row, lines = run_eval(capsys, root, run / "checkpoints/last.pth", tmp_path / "e.json")
    assert rc == 2 and row is None and not (tmp_path / "e.json").exists()
    assert lines == [f"error: data.root: {root}/val has class folders the checkpoint was not trained on: zebra (it "
                     "knows 3 classes, e.g. class0, class1)"]


@pytest.mark.parametrize("damage, needle", [
    ("nan", "weight conv1.weight holds NaN/inf values; refusing to evaluate it"),
    ("overflow", "the model's outputs are NaN/inf for 18 of 18 validation images"),
])
def test_non_finite_weights_or_outputs_are_refused_and_output_keeps_its_json(trained, tmp_path, capsys, damage,
                                                                               needle):
    data, run = trained
    ckpt = torch.load(run / "checkpoints/best.pth", weights_only=True)
    if damage == "nan":
        ckpt["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    else:  # finite weights whose logits overflow float32 (|x| > 3.4e38)
        ckpt["model"]["fc.weight"].fill_(3e38)
    torch.save(ckpt, tmp_path / "bad.pth")
    output = tmp_path / "eval.json"
    output.write_text('{"top1": 50.0}\n')  # an earlier result stays as it was
    rc, row, lines = run_eval(capsys, data, tmp_path / "bad.pth", output)
    assert rc == 2 and row is None
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --checkpoint {tmp_path / 'bad.pth'}: ") and \
        needle in errors[0], lines
    assert json.loads(output.read_text()) == {"top1": 50.0}


@pytest.mark.parametrize("where", ["file/eval.json", "file/sub/eval.json", "folder"])
def test_an_output_that_cannot_be_a_file_is_one_line_before_evaluating(trained, tmp_path, capsys, monkeypatch,
                                                                       where):
    data, run = trained
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    import engine.evaluation
    monkeypatch.setattr(engine.evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated"))
    rc, _, lines = run_eval(capsys, data, run / "checkpoints/best.pth", tmp_path / where)
    assert rc == 2
    expected = ("is a directory; give a file path" if where == "folder" else f"{tmp_path / 'file'} is a file, "
                "not a directory")
    assert lines == [f"error: --output {tmp_path / where}: {expected}" + (f" (e.g. {tmp_path / where / 'eval.json'})"
                                                                          if where == "folder" else "")]


def test_overrides_are_accepted_anywhere_on_the_line(trained, tmp_path, capsys):
    data, run = trained
    ov = tiny_overrides(data, tmp_path / "o")
    args = [ov[0], "--config", str(BASE_CONFIG), *ov[1:5], "--checkpoint", str(run / "checkpoints/best.pth"),
            *ov[5:], "--output", str(tmp_path / "e.json"), "data.val_batch_size=5"]
    assert eval_main(args) == 0
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["count"] == 18
