"""scripts/make_imagenet_subset.py: the ImageNet-100 class list, and the symlink subset on a generated tree."""
import os
import subprocess
import sys
from pathlib import Path

import make_imagenet_subset as mis  # scripts/ is on sys.path (pytest.ini pythonpath)
import pytest

REPO = Path(__file__).resolve().parents[2]

LIST = REPO / "configs" / "ablation" / "imagenet100_classes.txt"


def test_shipped_list_is_the_cmc_imagenet100():
    wnids = mis.read_classes(LIST)
    assert len(wnids) == 100 == len(set(wnids))
    # first and last ids of the CMC list, in its order; provenance in the header
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"
    header = LIST.read_text().split("\n\n")[0]
    assert "HobbitLong/CMC" in header and "Contrastive Multiview Coding" in header


def make_imagenet(root: Path, wnids, per_class=(3, 2), extra=("n09999999",)):
    """A fake ImageFolder: train/<wnid>/ with 3 files, val/<wnid>/ with 2 files, plus classes not listed."""
    for split, n in zip(("train", "val"), per_class, strict=True):
        for wnid in list(wnids) + list(extra):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{wnid}_{i}.JPEG").write_bytes(b"jpeg")


def run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_imagenet_subset.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def tree(root: Path):
    return sorted((str(p.relative_to(root)), os.readlink(p) if p.is_symlink() else None)
                  for p in root.rglob("*"))


def test_builds_symlinks_and_is_idempotent(tmp_path):
    wnids = mis.read_classes(LIST)
    src, dst = tmp_path / "imagenet", tmp_path / "imagenet100"
    make_imagenet(src, wnids)
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 0, p.stderr
    assert "100 classes x 2 splits (200 links created, 0 already there)" in p.stdout
    assert "train 300, val 200" in p.stdout
    for split in ("train", "val"):
        links = sorted((dst / split).iterdir())
        assert [link.name for link in links] == sorted(wnids)  # the unlisted class is left out
        assert all(link.is_symlink() and Path(os.readlink(link)).is_absolute() for link in links)
        assert (dst / split / wnids[0] / f"{wnids[0]}_0.JPEG").read_bytes() == b"jpeg"  # no copy, same file
        assert (dst / split / wnids[0] / f"{wnids[0]}_0.JPEG").resolve() == \
            (src / split / wnids[0] / f"{wnids[0]}_0.JPEG").resolve()
    before = tree(dst)
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 0 and "(0 links created, 200 already there)" in p.stdout
    assert tree(dst) == before
    # an interrupted run (some links missing) is completed by a rerun
    (dst / "val" / wnids[5]).unlink()
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 0 and "(1 links created, 199 already there)" in p.stdout and tree(dst) == before


def test_errors_are_one_line_and_write_nothing(tmp_path):
    wnids = mis.read_classes(LIST)
    src, dst = tmp_path / "imagenet", tmp_path / "sub"
    make_imagenet(src, wnids[:-2])  # two listed classes missing
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "2 of the 100 listed classes are missing" in p.stderr and wnids[-1] in p.stderr
    assert not dst.exists()
    make_imagenet(src, wnids)
    (src / "val" / wnids[0] / f"{wnids[0]}_0.JPEG").unlink()
    (src / "val" / wnids[0] / f"{wnids[0]}_1.JPEG").unlink()
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 2 and "hold no files" in p.stderr and not dst.exists()
    make_imagenet(src, wnids)
    # something else in the destination is never overwritten
    (dst / "train" / wnids[3]).mkdir(parents=True)
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 2 and "exists and is not a symlink" in p.stderr
    assert not any(x.is_symlink() for x in (dst / "train").iterdir())
    (dst / "train" / wnids[3]).rmdir()
    (dst / "train" / "n00000001").mkdir()
    p = run("--src", src, "--dst", dst)
    assert p.returncode == 2 and "not in the class list" in p.stderr


@pytest.mark.parametrize("text,needle", [("n0123\n", "not a WordNet id"), ("n01234567\nn01234567\n", "listed twice"),
                                         ("# only a comment\n", "holds no WordNet ids")])
def test_bad_class_lists(tmp_path, text, needle):
    bad = tmp_path / "list.txt"
    bad.write_text(text)
    (tmp_path / "src" / "train").mkdir(parents=True)
    p = run("--src", tmp_path / "src", "--dst", tmp_path / "dst", "--classes", bad)
    assert p.returncode == 2 and needle in p.stderr and p.stderr.count("\n") == 1
