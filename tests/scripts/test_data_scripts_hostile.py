"""Hostile or damaged archives and lists against scripts/prepare_imagenet.py and scripts/make_imagenet_subset.py:
nothing may be written outside ``--out`` / ``--dst``, every refusal is one ``error:`` line (exit status 2) given
before anything is written, and two preparation runs never write one data root at once."""
from __future__ import annotations

import importlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from test_prepare_imagenet import WNIDS, _add, _expect, _jpeg, _one_line_error, make_train_tar

prep = importlib.import_module("prepare_imagenet")
subset = importlib.import_module("make_imagenet_subset")


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _devkit(path: Path, synsets, truth=(1, 2, 3), meta: bytes | None = None) -> Path:
    """A devkit tarball whose meta.mat holds ``synsets`` (any savemat-able value), or the raw bytes ``meta``."""
    from scipy.io import savemat

    if meta is None:
        buf = io.BytesIO()
        savemat(buf, {"synsets": synsets} if synsets is not None else {"other": np.arange(3)})
        meta = buf.getvalue()
    with tarfile.open(path, "w:gz") as t:
        _add(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta)
        _add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
             "".join(f"{x}\n" for x in truth).encode())
    return path


def _synsets(wnids) -> np.ndarray:
    return np.array([(i + 1, w, 0) for i, w in enumerate(wnids)],
                    dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])


def _val_tar(path: Path, n: int = 3, names=None) -> Path:
    with tarfile.open(path, "w") as t:
        for name in names or [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, n + 1)]:
            _add(t, name, b"jpeg")
    return path


# ------------------------------------------------------------------------------------------- hostile devkit
@pytest.mark.parametrize("bad", ["../../escaped", "/tmp/fcanet_escaped_abs", "n0144076", "n01440764/../../x",
                                 "n01440764\nn01443537"])
def test_a_devkit_with_hostile_class_ids_writes_nothing(tmp_path, capsys, bad):
    work = tmp_path / "work"
    work.mkdir()
    devkit = _devkit(work / "devkit.tar.gz", _synsets([WNIDS[0], bad, WNIDS[2]]))
    val_tar = _val_tar(work / "val.tar")
    before = _listing(tmp_path)
    assert prep.main(["--out", str(work / "out"), "--val-tar", str(val_tar), "--devkit", str(devkit),
                      *_expect(val=3)]) == 2
    err = _one_line_error(capsys, "class id 2", "not n + 8 digits")
    assert repr(bad)[:20] in err or bad[:20] in err
    assert _listing(tmp_path) == before  # not even --out was created
    assert not Path("/tmp/fcanet_escaped_abs").exists()


@pytest.mark.parametrize("case,needle", [
    ("no_synsets", "no 'synsets' table"),
    ("missing_field", "lacks the field(s) WNID"),
    ("text_id", "not (int id, WNID, int num_children)"),
    ("plain_array", "lacks the field(s)"),
    ("no_leaf", "no leaf synset"),
    ("duplicate_wnid", "is the WordNet id of class ids 1 and 2"),
    ("duplicate_id", "class id 1 is repeated"),
    ("junk_bytes", "not a readable devkit"),
    ("text_truth", "non-integer"),
])
def test_a_meta_mat_of_unexpected_structure_is_one_line(tmp_path, capsys, case, needle):
    truth = (1, 2, 3)
    meta = None
    if case == "no_synsets":
        synsets = None
    elif case == "missing_field":
        synsets = np.array([(1, 0)], dtype=[("ILSVRC2012_ID", "O"), ("num_children", "O")])
    elif case == "text_id":
        synsets = np.array([("one", WNIDS[0], 0)], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"),
                                                          ("num_children", "O")])
    elif case == "plain_array":
        synsets = np.arange(12).reshape(3, 4)
    elif case == "no_leaf":
        synsets = np.array([(1, WNIDS[0], 3)], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    elif case == "duplicate_wnid":
        synsets = _synsets([WNIDS[0], WNIDS[0], WNIDS[2]])
    elif case == "duplicate_id":
        synsets = np.array([(1, WNIDS[0], 0), (1, WNIDS[1], 0)],
                           dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    elif case == "junk_bytes":
        synsets, meta = None, b"MATLAB 5.0 MAT-file" + b"\x00" * 200
    else:
        synsets, truth = _synsets(WNIDS), ("1", "two", "3")
    devkit = _devkit(tmp_path / "devkit.tar.gz", synsets, truth=truth, meta=meta)
    val_tar = _val_tar(tmp_path / "val.tar")
    assert prep.main(["--out", str(tmp_path / "out"), "--val-tar", str(val_tar), "--devkit", str(devkit),
                      *_expect(val=3)]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- counts first
@pytest.mark.parametrize("case,needle", [
    ("short_tar", "2 images, but the devkit labels 3"),
    ("expect_images", "labels 3 val images, expected 4"),
    ("expect_classes", "of 3 classes, expected 5"),
    ("duplicate_member", "are both ILSVRC2012_val_00000002.JPEG"),
])
def test_val_counts_and_names_are_checked_before_writing(tmp_path, capsys, case, needle):
    devkit = _devkit(tmp_path / "devkit.tar.gz", _synsets(WNIDS))
    names = None
    if case == "short_tar":
        names = ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    elif case == "duplicate_member":
        names = ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "sub/ILSVRC2012_val_00000002.JPEG",
                 "ILSVRC2012_val_00000003.JPEG"]
    val_tar = _val_tar(tmp_path / "val.tar", names=names)
    expect = {"expect_images": _expect(val=4), "expect_classes": _expect(val=3, classes=5)}.get(case, _expect(val=3))
    assert prep.main(["--out", str(tmp_path / "out"), "--val-tar", str(val_tar), "--devkit", str(devkit),
                      *expect]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "out" / "val").exists()


def test_a_val_problem_stops_before_the_train_split_is_extracted(tmp_path, capsys):
    make_train_tar(tmp_path / "train.tar")
    devkit = _devkit(tmp_path / "devkit.tar.gz", _synsets(WNIDS))
    val_tar = _val_tar(tmp_path / "val.tar", n=2)  # the devkit labels 3
    assert prep.main(["--out", str(tmp_path / "out"), "--train-tar", str(tmp_path / "train.tar"), "--val-tar",
                      str(val_tar), "--devkit", str(devkit), "--workers", "1", *_expect(val=3)]) == 2
    _one_line_error(capsys, "2 images, but the devkit labels 3")
    assert not (tmp_path / "out").exists()


def test_val_members_with_paths_land_in_their_class_folder_only(tmp_path, capsys):
    devkit = _devkit(tmp_path / "devkit.tar.gz", _synsets(WNIDS))
    val_tar = _val_tar(tmp_path / "val.tar", names=["../../ILSVRC2012_val_00000001.JPEG",
                                                     "/abs/ILSVRC2012_val_00000002.JPEG",
                                                     "ILSVRC2012_val_00000003.JPEG"])
    out = tmp_path / "w" / "out"
    assert prep.main(["--out", str(out), "--val-tar", str(val_tar), "--devkit", str(devkit), *_expect(val=3)]) == 0
    assert _listing(tmp_path / "w") == {"out", f"out/{prep.LOCK_NAME}", "out/val"} | {
        f"out/val/{w}" for w in WNIDS} | {f"out/val/{w}/ILSVRC2012_val_{i:08d}.JPEG" for i, w in enumerate(WNIDS, 1)}


# ------------------------------------------------------------------------------------------- train tarball
def test_a_duplicated_class_tar_is_one_line_and_writes_nothing(tmp_path, capsys):
    make_train_tar(tmp_path / "train.tar")
    with tarfile.open(tmp_path / "train.tar", "a") as t:  # a second copy of class 1, e.g. a bad repack
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as i:
            _add(i, f"{WNIDS[1]}_1.JPEG", _jpeg(1))
        _add(t, f"extra/{WNIDS[1]}.tar", inner.getvalue())
    assert prep.main(["--out", str(tmp_path / "out"), "--train-tar", str(tmp_path / "train.tar"),
                      "--workers", "2", *_expect()]) == 2
    _one_line_error(capsys, f"two class tars for {WNIDS[1]}", f"extra/{WNIDS[1]}.tar")
    assert not (tmp_path / "out" / "train").exists()


def _train_tar_with_inner(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """A one-class train tarball whose class tar holds ``members``: (name, data) files or (name, "->target")
    symlinks."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as t:
        for name, data in members:
            if isinstance(data, str):
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                t.addfile(info)
            else:
                _add(t, name, data)
    with tarfile.open(path, "w") as outer:
        _add(outer, f"{WNIDS[0]}.tar", inner.getvalue())
    return path


def test_class_tar_members_cannot_leave_their_class_folder(tmp_path, capsys):
    tar = _train_tar_with_inner(tmp_path / "train.tar", [
        ("../../../escaped.JPEG", _jpeg(1)), ("/tmp/fcanet_abs_escape.JPEG", _jpeg(2)),
        ("ok.JPEG", _jpeg(3)), ("link.JPEG", "->../../../../etc/passwd")])
    out = tmp_path / "w" / "out"
    assert prep.main(["--out", str(out), "--train-tar", str(tar), "--workers", "1",
                      *_expect(train=3, classes=1)]) == 0
    assert _listing(tmp_path / "w") == {"out", f"out/{prep.LOCK_NAME}", "out/train", f"out/train/{WNIDS[0]}"} | {
        f"out/train/{WNIDS[0]}/{n}" for n in ("escaped.JPEG", "fcanet_abs_escape.JPEG", "ok.JPEG")}
    assert not Path("/tmp/fcanet_abs_escape.JPEG").exists()


@pytest.mark.parametrize("members,needle", [
    ([("a/x.JPEG", b"1"), ("b/x.JPEG", b"2")], "share the file name 'x.JPEG'"),
    ([("..", b"1")], "unexpected member name '..'"),
    ([(".hidden", b"1")], "unexpected member name '.hidden'"),
])
def test_bad_class_tar_member_names_are_refused(tmp_path, capsys, members, needle):
    tar = _train_tar_with_inner(tmp_path / "train.tar", members)
    assert prep.main(["--out", str(tmp_path / "out"), "--train-tar", str(tar), "--workers", "1",
                      *_expect(train=len(members), classes=1)]) == 2
    _one_line_error(capsys, needle)
    assert list((tmp_path / "out" / "train").iterdir()) == []  # the class was not published


# ------------------------------------------------------------------------------------------------- locking
def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    make_train_tar(tmp_path / "train.tar")
    out = tmp_path / "out"
    args = ["--out", str(out), "--train-tar", str(tmp_path / "train.tar"), "--workers", "1", *_expect()]
    with prep.lock_output(out):  # a first run, in the middle of its work
        assert prep.main(args) == 2
        _one_line_error(capsys, "another prepare_imagenet.py run is writing here", f"pid {os.getpid()}")
        assert not (out / "train").exists()
    assert prep.main(args) == 0  # released: the next run proceeds
    assert "train: 12 images in 3 class folders" in capsys.readouterr().out


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    code = ("import sys, os; sys.path.insert(0, sys.argv[2]); import prepare_imagenet as p\n"
            "from pathlib import Path\nwith p.lock_output(Path(sys.argv[1])): os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(out), str(Path(prep.__file__).parent)], timeout=60)
    assert r.returncode == 9
    with prep.lock_output(out):  # a killed run leaves no stale lock
        pass


# ------------------------------------------------------------------------------------------- subset list
@pytest.mark.parametrize("entry", ["../../n01234567", "/abs/n01234567", "n01234567/../../x", ".."])
def test_subset_list_entries_cannot_be_paths(tmp_path, capsys, entry):
    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "n01234567").mkdir(parents=True)
        (src / split / "n01234567" / "a.JPEG").write_bytes(b"x")
    classes = tmp_path / "classes.txt"
    classes.write_text(f"n01234567\n{entry}\n")
    before = _listing(tmp_path)
    assert subset.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--classes", str(classes)]) == 2
    _one_line_error(capsys, "not a WordNet id", "line 2")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("splits", ["train,../escape", "/abs", "..", "train,.", "a/b"])
def test_subset_splits_must_be_plain_folder_names(tmp_path, capsys, splits):
    classes = tmp_path / "classes.txt"
    classes.write_text("n01234567\n")
    before = _listing(tmp_path)
    assert subset.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--classes", str(classes),
                        "--splits", splits]) == 2
    _one_line_error(capsys, "--splits", "not a plain folder name")
    assert _listing(tmp_path) == before
