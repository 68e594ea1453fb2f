"""Samplers (deterministic order, exact eval sharding), corrupt images, digits tree, folder scan."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from torchvision.datasets import ImageFolder

from engine.data.errors import CorruptImageError, DataError
from engine.data.datasets import (ExactEvalBatchSampler, RobustImageFolder, TrainBatchSampler, collate,
                                  write_digits_imagefolder)
from engine.data.pipeline import build_train_transform


def test_train_order_is_a_pure_function_of_seed_epoch_rank():
    a = TrainBatchSampler(103, 4, world_size=2, rank=1, seed=7)
    b = TrainBatchSampler(103, 4, world_size=2, rank=1, seed=7)
    a.set_epoch(3)
    torch.manual_seed(123)  # global RNG state must not matter
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(TrainBatchSampler(103, 4, seed=8)) != list(TrainBatchSampler(103, 4, seed=7))
    # resume mid-epoch: skipping k steps yields exactly the tail
    a.set_epoch(3)
    full = list(a)
    a.set_epoch(3, start_step=5)
    assert list(a) == full[5:] and len(a) == len(full) - 5


def test_train_shards_are_disjoint_and_equal():
    shards = []
    for rank in range(3):
        s = TrainBatchSampler(100, 5, world_size=3, rank=rank, seed=0)
        s.set_epoch(0)
        batches = list(s)
        assert len(batches) == 33 // 5 and all(len(b) == 5 for b in batches)
        shards.append({i for b in batches for i, _ in b})
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
    with pytest.raises(ValueError, match="too small"):
        TrainBatchSampler(5, 4, world_size=2)


@pytest.mark.parametrize("size", [1, 13, 97])
def test_exact_eval_counts_every_image_once(size):
    for world in (1, 2, 3, 4):
        seen = [i for r in range(world) for b in ExactEvalBatchSampler(size, 4, world, r) for i in b]
        assert sorted(seen) == list(range(size))


def test_augmentation_is_seeded_per_sample(tmp_path):
    root = write_tiny_imagefolder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    loader, tf = build_train_transform(8, crop="fcanet", pipeline="fast")
    ds = RobustImageFolder(str(root / "train"), transform=tf, loader=loader)
    torch.manual_seed(0)
    x1, _ = ds[(1, 42)]
    state = torch.get_rng_state()
    torch.manual_seed(999)
    x2, _ = ds[(1, 42)]
    assert torch.equal(x1, x2)
    torch.manual_seed(999)
    before = torch.get_rng_state()
    ds[(1, 42)]
    assert torch.equal(torch.get_rng_state(), before)  # the per-sample seed ran in a forked RNG
    assert not torch.equal(state, before)
    different = [ds[(1, s)][0] for s in range(6)]
    assert any(not torch.equal(different[0], d) for d in different[1:])


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00garbage"])
def test_corrupt_image_names_the_file_or_is_skipped(tmp_path, payload):
    root = write_tiny_imagefolder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    bad = root / "train" / "class1" / "zz_bad.png"
    bad.write_bytes(payload)
    loader, tf = build_train_transform(8, pipeline="fast")
    ds = RobustImageFolder(str(root / "train"), transform=tf, loader=loader)
    idx = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match=r"corrupt or unreadable image .*zz_bad\.png"):
        ds[idx]
    skip = RobustImageFolder(str(root / "train"), transform=tf, loader=loader, skip_corrupt=True)
    images, targets, skipped = collate([skip[i] for i in range(len(skip))])
    assert skipped == 1 and images.shape[0] == len(skip) - 1 == targets.shape[0]


def test_digits_tree_is_deterministic_and_written_once(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits")
    train = sorted(p.relative_to(root) for p in (root / "train").rglob("*.png"))
    val = sorted(p.relative_to(root) for p in (root / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(i) for i in range(10)]
    mtime = (root / "train" / "0").stat().st_mtime_ns
    write_digits_imagefolder(tmp_path / "digits")  # complete tree: left alone
    assert (root / "train" / "0").stat().st_mtime_ns == mtime
    again = write_digits_imagefolder(tmp_path / "digits2")
    assert sorted(p.relative_to(again) for p in (again / "val").rglob("*.png")) == val
    from PIL import Image
    from sklearn.datasets import load_digits
    name = val[0]
    img = np.asarray(Image.open(root / name))
    expected = np.round(load_digits().images[int(name.stem)] * 255 / 16).astype(np.uint8)
    assert img.shape == (8, 8) and np.array_equal(img, expected)
    assert int(name.parent.name) == load_digits().target[int(name.stem)]


def test_eval_only_detects_missing_val_class_folder(tmp_path):
    """A val/ without one of train/'s class folders would shift every later label: a clear error."""
    import shutil

    from engine.config import load_config
    from engine.data.errors import DataError
    from engine.data.pipeline import build_datasets
    root = write_tiny_imagefolder(tmp_path / "data")
    cfg = load_config(BASE_CONFIG, tiny_overrides(root, tmp_path / "out"))
    assert len(build_datasets(cfg, 3, need_train=False)[1]) == 12
    shutil.rmtree(root / "val" / sorted(p.name for p in (root / "val").iterdir())[0])
    with pytest.raises(DataError, match="val lacks"):
        build_datasets(cfg, 3, need_train=False)


# ------------------------------------------------------------------------------------ ImageFolder scan
def _folder(tmp_path):
    """A tiny tree with a nested sub-folder, and a class folder that is a symlink to a tree elsewhere."""
    root = write_tiny_imagefolder(tmp_path / "data", classes=2, train_per_class=3, val_per_class=1)
    train = root / "train"
    (train / "class0" / "sub").mkdir()
    (train / "class1" / "000.png").rename(train / "class0" / "sub" / "moved.png")
    outside = write_tiny_imagefolder(tmp_path / "elsewhere", classes=1, train_per_class=2, val_per_class=1)
    (train / "linked").symlink_to(outside / "train" / "class0", target_is_directory=True)
    return train


def _scan(folder) -> list:
    return RobustImageFolder(str(folder), transform=None, loader=None).samples


def test_scan_keeps_torchvision_order_and_follows_plain_symlinks(tmp_path):
    train = _folder(tmp_path)
    ours = _scan(train)
    assert ours == ImageFolder(str(train)).samples  # same order, same labels (the linked class included)
    assert {os.path.basename(os.path.dirname(p)) for p, _ in ours} == {"class0", "sub", "class1", "linked"}


@pytest.mark.parametrize("link", ["..", ".", "../..", "../class1"])
def test_directory_symlink_cycle_or_repeat_is_refused(tmp_path, link):
    """``train/class0/loop -> ..`` made torchvision's scan list 656 samples from 16 files, mislabelled."""
    train = _folder(tmp_path)
    (train / "class0" / "loop").symlink_to(link, target_is_directory=True)
    kind = "symlink cycle" if link in ("..", ".", "../..") else "same folder"
    if link == "../..":
        kind = "same folder|symlink cycle"  # leads above train/: back into train/ through data/
    with pytest.raises(DataError, match=kind) as e:
        _scan(train)
    assert "loop" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "symlink_other_class"])
def test_the_same_file_twice_is_refused(tmp_path, how):
    train = _folder(tmp_path)
    src = train / "class0" / "001.png"
    dst = train / ("class1" if how == "symlink_other_class" else "class0") / "zz_copy.png"
    if how == "hardlink":
        os.link(src, dst)
    else:
        dst.symlink_to(src)
    with pytest.raises(DataError, match="same file") as e:
        _scan(train)
    assert "001.png" in str(e.value) and "zz_copy.png" in str(e.value)


def test_dangling_symlink_is_listed_and_fails_as_unreadable(tmp_path):
    train = _folder(tmp_path)
    (train / "class1" / "zz_gone.png").symlink_to(tmp_path / "missing.png")
    loader, tf = build_train_transform(8, pipeline="fast")
    ds = RobustImageFolder(str(train), transform=tf, loader=loader)
    idx = [p for p, _ in ds.samples].index(str(train / "class1" / "zz_gone.png"))
    with pytest.raises(CorruptImageError, match="zz_gone.png"):
        ds[idx]
