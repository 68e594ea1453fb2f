"""scripts/prepare_imagenet.py on generated miniatures of the official ILSVRC2012 archives.

train: an uncompressed tar of per-class tars (``nXXXXXXXX.tar`` holding ``nXXXXXXXX_N.JPEG``), as
``ILSVRC2012_img_train.tar``; val: a flat tar of ``ILSVRC2012_val_XXXXXXXX.JPEG`` plus a devkit tarball with
``data/meta.mat`` and ``data/ILSVRC2012_validation_ground_truth.txt``, as ``ILSVRC2012_devkit_t12.tar.gz``.
"""
from __future__ import annotations

import importlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

prep = importlib.import_module("prepare_imagenet")  # scripts/ is on the test path (pytest.ini)

WNIDS = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = [3, 5, 4]  # unequal, as in ImageNet (732..1300 per class)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


def make_train_tar(path: Path, per_class=PER_CLASS) -> dict[str, bytes]:
    """Write a miniature ILSVRC2012_img_train.tar; returns ``{"wnid/file": bytes}`` of every image."""
    images = {}
    with tarfile.open(path, "w") as outer:
        for c, (wnid, n) in enumerate(zip(WNIDS, per_class, strict=True)):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for i in range(n):
                    name = f"{wnid}_{1000 + i}.JPEG"
                    images[f"{wnid}/{name}"] = data = _jpeg(100 * c + i)
                    _add(inner, name, data)
            _add(outer, f"{wnid}.tar", inner_buf.getvalue())
    return images


def make_val_archives(tmp_path: Path, truth=(3, 1, 2, 3, 3)) -> tuple[Path, Path]:
    """Write a miniature val tarball and devkit: image i (1-based) has ILSVRC2012_ID truth[i-1]."""
    from scipy.io import savemat

    # meta.mat lists leaf synsets (num_children 0: the 1,000 classes) and inner WordNet nodes, which are ignored.
    synsets = np.array([(1, WNIDS[0], 0), (2, WNIDS[1], 0), (3, WNIDS[2], 0), (1001, "n99999999", 2)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    devkit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as t:
        _add(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
             "".join(f"{x}\n" for x in truth).encode())
    val_tar = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(val_tar, "w") as t:
        for i in range(1, len(truth) + 1):
            _add(t, f"ILSVRC2012_val_{i:08d}.JPEG", f"jpeg{i}".encode())
    return val_tar, devkit


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _expect(train: int = sum(PER_CLASS), val: int = 5, classes: int = 3) -> list[str]:
    return ["--expect-train-images", str(train), "--expect-val-images", str(val), "--expect-classes", str(classes)]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_both_splits_give_an_imagefolder_with_verified_counts(tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    images = make_train_tar(tmp_path / "train.tar")
    val_tar, devkit = make_val_archives(tmp_path)
    out = tmp_path / "imagenet"
    assert prep.main(["--out", str(out), "--train-tar", str(tmp_path / "train.tar"), "--val-tar", str(val_tar),
                      "--devkit", str(devkit), "--workers", "2", *_expect()]) == 0
    stdout = capsys.readouterr().out
    assert "train: 12 images in 3 class folders" in stdout and "val: 5 images in 3 class folders" in stdout
    assert _files(out / "train") == images  # every image, byte for byte, in its class folder
    assert sorted(_files(out / "val")) == [
        f"{WNIDS[0]}/ILSVRC2012_val_00000002.JPEG", f"{WNIDS[1]}/ILSVRC2012_val_00000003.JPEG",
        f"{WNIDS[2]}/ILSVRC2012_val_00000001.JPEG", f"{WNIDS[2]}/ILSVRC2012_val_00000004.JPEG",
        f"{WNIDS[2]}/ILSVRC2012_val_00000005.JPEG"]
    assert (out / "val" / WNIDS[2] / "ILSVRC2012_val_00000004.JPEG").read_bytes() == b"jpeg4"
    assert sorted(os.listdir(out)) == [prep.LOCK_NAME, "train", "val"]  # no staging folder left behind
    train = ImageFolder(str(out / "train"))  # what the trainer reads
    assert train.classes == WNIDS and len(train) == 12 and train[0][0].size == (7, 6)


def test_train_resumes_skipping_complete_classes_and_redoing_a_partial_one(tmp_path):
    images = make_train_tar(tmp_path / "train.tar")
    out = tmp_path / "train"
    r = prep.prepare_train(tmp_path / "train.tar", out, workers=1, log=lambda line: None)
    assert (r["images"], r["classes"], r["written"], r["present"]) == (12, 3, 3, 0)
    # Interrupted run: class 1 was being extracted (half-written files in the staging folder, none in train/).
    shutil.rmtree(out / WNIDS[1])
    (tmp_path / "train.partial" / WNIDS[1]).mkdir(parents=True)
    (tmp_path / "train.partial" / WNIDS[1] / f"{WNIDS[1]}_1000.JPEG").write_bytes(b"trunc")
    kept = out / WNIDS[0] / f"{WNIDS[0]}_1000.JPEG"
    before = kept.stat().st_mtime_ns
    r = prep.prepare_train(tmp_path / "train.tar", out, workers=1, log=lambda line: None)
    assert (r["images"], r["written"], r["present"]) == (12, 1, 2)
    assert _files(out) == images and kept.stat().st_mtime_ns == before  # complete classes untouched
    assert not (tmp_path / "train.partial").exists()


def test_counts_are_checked_and_verify_repairs_a_damaged_class(tmp_path, capsys):
    images = make_train_tar(tmp_path / "train.tar")
    out = tmp_path / "imagenet"
    args = ["--out", str(out), "--train-tar", str(tmp_path / "train.tar"), "--workers", "1"]
    # The real dataset's counts are the default: a miniature (or an incomplete download) fails the check,
    # before anything is written.
    assert prep.main(args) == 2
    _one_line_error(capsys, "3 class tars, expected 1,000", "nothing written")
    assert not (out / "train").exists()
    assert prep.main(args + _expect()) == 0
    capsys.readouterr()
    (out / "train" / WNIDS[2] / f"{WNIDS[2]}_1001.JPEG").unlink()  # a file lost after extraction
    assert prep.main(args + _expect()) == 2
    _one_line_error(capsys, "11 images", f"1 class(es) differ from the archive: {WNIDS[2]} has 3 of 4", "--verify")
    (out / "train" / WNIDS[0] / f"{WNIDS[0]}_1000.JPEG").write_bytes(b"\xff\xd8")  # a truncated file
    assert prep.main(args + _expect() + ["--verify"]) == 0  # re-reads the tarball and re-extracts both classes
    assert _files(out / "train") == images


def test_val_is_restartable_and_checks_counts(tmp_path, capsys):
    val_tar, devkit = make_val_archives(tmp_path)
    out = tmp_path / "val"
    r = prep.prepare_val(val_tar, devkit, out)
    assert (r["images"], r["written"], r["already_present"], r["classes"]) == (5, 5, 0, 3)
    (out / WNIDS[0] / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"jp")  # truncated by an interruption
    r = prep.prepare_val(val_tar, devkit, out)
    assert (r["written"], r["already_present"]) == (1, 4)
    assert (out / WNIDS[0] / "ILSVRC2012_val_00000002.JPEG").read_bytes() == b"jpeg2"
    assert prep.main(["--out", str(tmp_path), "--val-tar", str(val_tar), "--devkit", str(devkit),
                      *_expect(val=6)]) == 2
    _one_line_error(capsys, "labels 5 val images, expected 6", "nothing written")
    (out / WNIDS[2] / "ILSVRC2012_val_00000005.JPEG").unlink()  # lost after preparation: named on the rerun
    (out / WNIDS[2] / "ILSVRC2012_val_00000004.JPEG").rename(out / WNIDS[2] / "x.tmp")  # an unfinished write
    assert prep.main(["--out", str(tmp_path), "--val-tar", str(val_tar), "--devkit", str(devkit), *_expect()]) == 0
    capsys.readouterr()
    assert (out / WNIDS[2] / "ILSVRC2012_val_00000005.JPEG").is_file()  # the rerun completed the class
    (out / WNIDS[1] / "ILSVRC2012_val_00000003.JPEG").unlink()
    with pytest.raises(prep.PrepareError, match=f"1 class\\(es\\) differ from the archive: {WNIDS[1]} has 0 of 1"):
        prep.check_counts("val", out, 5, 3, {WNIDS[0]: 1, WNIDS[1]: 1, WNIDS[2]: 3})


@pytest.mark.parametrize("case", ["missing", "val_as_train", "not_a_tar", "truncated_class", "bad_devkit",
                                  "unlabelled_val"])
def test_bad_archives_give_one_line_errors(tmp_path, capsys, case):
    train_tar = tmp_path / "train.tar"
    val_tar, devkit = make_val_archives(tmp_path)
    args = ["--out", str(tmp_path / "out"), *_expect()]
    if case == "missing":
        args += ["--train-tar", str(tmp_path / "nope.tar")]
        needle = "file not found"
    elif case == "val_as_train":
        args += ["--train-tar", str(val_tar)]
        needle = "ILSVRC2012_val_00000001.JPEG"
    elif case == "not_a_tar":
        train_tar.write_bytes(b"<html>quota exceeded</html>" * 40)
        args += ["--train-tar", str(train_tar)]
        needle = str(train_tar)
    elif case == "truncated_class":  # a class tar cut short inside the (otherwise valid) outer tar
        make_train_tar(train_tar)
        with tarfile.open(train_tar) as t:
            members = [(m, t.extractfile(m).read()) for m in t]
        with tarfile.open(train_tar, "w") as t:
            for m, data in members:
                _add(t, m.name, data[:700] if m.name.startswith(WNIDS[1]) else data)
        args += ["--train-tar", str(train_tar), "--workers", "1"]
        needle = f"{WNIDS[1]}.tar"
    elif case == "bad_devkit":
        args += ["--val-tar", str(val_tar), "--devkit", str(val_tar)]
        needle = "no data/meta.mat"
    else:  # the devkit labels fewer images than the tarball holds
        (tmp_path / "short").mkdir()
        _, devkit = make_val_archives(tmp_path / "short", truth=(3, 1))
        args += ["--val-tar", str(val_tar), "--devkit", str(devkit)]
        needle = "has no label"
    assert prep.main(args) == 2
    _one_line_error(capsys, needle)
    if case == "truncated_class":  # the two intact classes are complete, the broken one is not in train/
        assert sorted(os.listdir(tmp_path / "out" / "train")) == sorted([WNIDS[0], WNIDS[2]])
