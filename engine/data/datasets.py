"""Data sets, samplers and loaders.

Determinism (for bitwise-exact resume): the training data order and every sample's augmentation are
pure functions of ``(seed, epoch, position in the epoch)``: the sampler draws a permutation from
``(seed, epoch)`` and hands each index out together with its own augmentation seed, and the data set
runs the random transform under that seed (in a forked RNG, so neither the worker count nor the global
RNG matters). A resumed run skips the batches already done and sees exactly the same samples.

Evaluation is exact for any world size: rank ``r`` of ``w`` takes indices ``r, r + w, r + 2w, ...``
with no padding, so every image is counted exactly once when the per-rank sums are all-reduced.

The ImageFolder scan (:func:`scan_image_folder`) follows directory symlinks but never twice into one
folder, and never lists one file twice: a symlink cycle (``train/a/loop -> ..``), two links to one folder
and two links (symbolic or hard) to one file are refused with a one-line :class:`DataError`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from engine.data import gpu_decode
from engine.data.errors import DECODE_ERRORS, CorruptImageError, DataError, UnsupportedImageError


def scan_image_folder(directory: str, class_to_idx: dict[str, int],
                      is_valid_file: Callable[[str], bool]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``directory/<class>/``, in torchvision's ``make_dataset``
    order (classes sorted; within a class, folders by path, then file names sorted), following directory
    symlinks as it does, but refusing what would silently repeat or mislabel images:

    * a folder reached twice: a symlink cycle (e.g. ``train/a/loop -> ..``, which torchvision's ``os.walk``
      follows ~40 levels deep, listing other classes' images under ``a``) or two links to one folder;
    * a file reached twice (two symbolic or hard links to one file).

    Folders and files are identified by ``(st_dev, st_ino)``; a regular file's inode comes free with the
    directory listing, so only symlinks cost an extra ``stat``. Raises :class:`DataError` (one line).
    """
    root_st = os.stat(directory)
    root_key = (root_st.st_dev, root_st.st_ino)
    seen_dirs: dict[tuple[int, int], str] = {root_key: directory}
    seen_files: dict[tuple[int, int], str] = {}
    instances: list[tuple[str, int]] = []
    for target_class in sorted(class_to_idx):
        class_dir = os.path.join(directory, target_class)
        if not os.path.isdir(class_dir):
            continue
        folders: list[tuple[str, int, list[os.DirEntry]]] = []  # (path, st_dev, non-folder entries)
        stack: list[tuple[str, frozenset]] = [(class_dir, frozenset({root_key}))]  # (folder, its ancestors)
        while stack:
            path, ancestors = stack.pop()
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                first = seen_dirs[key]
                if key in ancestors:
                    raise DataError(f"data.root: symlink cycle: {path} leads back to its ancestor {first}; "
                                    "remove the link")
                raise DataError(f"data.root: {path} and {first} are the same folder (a directory symlink); "
                                "every image must be listed once")
            seen_dirs[key] = path
            entries = []
            with os.scandir(path) as it:
                for e in it:
                    if e.is_dir():  # follows symlinks, as os.walk(followlinks=True) does
                        stack.append((e.path, ancestors | {key}))
                    else:
                        entries.append(e)
            folders.append((path, st.st_dev, entries))
        for path, dev, entries in sorted(folders, key=lambda f: f[0]):
            for e in sorted(entries, key=lambda e: e.name):
                file = os.path.join(path, e.name)
                if not is_valid_file(file):
                    continue
                fkey: tuple[int, int] | None = (dev, e.inode())
                if e.is_symlink():
                    try:
                        st = os.stat(file)
                        fkey = (st.st_dev, st.st_ino)
                    except OSError:  # a dangling link: fails (or is skipped) as unreadable when loaded
                        fkey = None
                if fkey is not None:
                    if fkey in seen_files:
                        raise DataError(f"data.root: {file} and {seen_files[fkey]} are the same file (a symbolic "
                                        "or hard link); every image must be listed once")
                    seen_files[fkey] = file
                instances.append((file, class_to_idx[target_class]))
    return instances


def _split_item(item: Any) -> tuple[int, int | None]:
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def _seeded(fn: Callable[[], Any], seed: int | None) -> Any:
    """Run ``fn`` with torch's RNG seeded by ``seed`` and restore the RNG afterwards."""
    if seed is None:
        return fn()
    # Only the CPU generator drives augmentation; torch.manual_seed would also (re)seed CUDA and costs
    # ~100 us per call, 25x more than this.
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        return fn()
    finally:
        gen.set_state(saved)


class RobustImageFolder(ImageFolder):
    """``ImageFolder`` whose items may carry their own augmentation seed, and which turns any failure
    to read or decode a file into a :class:`CorruptImageError` naming the file (or, with
    ``skip_corrupt``, yields ``None`` for it; :func:`collate` drops and counts those)."""

    def __init__(self, root: str, transform: Callable, loader: Callable, skip_corrupt: bool = False):
        super().__init__(root, transform=transform, loader=loader)
        self.skip_corrupt = skip_corrupt

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's scan with cycle and duplicate detection (:func:`scan_image_folder`)."""
        if is_valid_file is None:
            def is_valid_file(path: str) -> bool:
                return has_file_allowed_extension(path, extensions)
        instances = scan_image_folder(directory, class_to_idx, is_valid_file)
        found = {t for _, t in instances}
        empty = [c for c, i in class_to_idx.items() if i not in found]
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                    f"Supported extensions are: {', '.join(extensions or ())}")
        return instances

    def __getitem__(self, item: Any) -> Any:
        index, seed = _split_item(item)
        path, target = self.samples[index]
        try:
            sample = _seeded(lambda: self.transform(self.loader(path)), seed)
        except DECODE_ERRORS as e:  # the file is unusable (a bug elsewhere, e.g. TypeError, stays loud)
            if self.skip_corrupt:
                return None
            if isinstance(e, UnsupportedImageError):
                raise CorruptImageError(f"unsupported image {path}: {e}") from None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptImageError(f"corrupt or unreadable image {path}: {reason}") from None
        return sample, target


class SyntheticDataset(Dataset):
    """Random uint8 images for benchmarking the training step without touching disk.

    A small pool of fixed random images is reused so that producing a sample costs almost nothing;
    labels are ``index % num_classes``.
    """

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int = 0, pool: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.size, self.num_classes = size, num_classes
        self.pool = torch.randint(0, 256, (pool, 3, image_size, image_size), dtype=torch.uint8, generator=g)
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, int]:
        index, _ = _split_item(item)
        return self.pool[index % len(self.pool)], index % self.num_classes


def collate(batch: list) -> tuple[Any, torch.Tensor | None, int]:
    """Stack the readable samples; return ``(images, targets, number of skipped corrupt files)``.

    ``images`` is a tensor, or for the ``gpu`` pipeline an :class:`engine.data.gpu_decode.EncodedBatch` that
    :func:`engine.data.transforms.to_model_input` decodes on the device."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    if gpu_decode.is_pending(good[0][0]):
        images = gpu_decode.collate_samples([s for s, _ in good])
        return images, torch.tensor([t for _, t in good], dtype=torch.int64), skipped
    images, targets = default_collate(good)
    return images, targets, skipped


class TrainBatchSampler(Sampler):
    """Deterministic sharded batches of ``(index, augmentation seed)``.

    Epoch ``e``: permutation from ``(seed, e)``; rank ``r`` of ``w`` takes positions ``r, r + w, ...``
    of the first ``(n // w) * w`` (equal shares, so every rank runs the same number of steps), cut into
    full batches (the remainder is dropped, a different one each epoch). ``set_epoch(e, start_step)``
    resumes mid-epoch by skipping the first ``start_step`` batches.
    """

    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 max_steps: int | None = None):
        per_rank = size // world_size
        if per_rank < batch_size:
            raise DataError(f"training set of {size} images is too small for {world_size} process(es) "
                            f"x batch {batch_size} (need at least one full batch per process)")
        self.size, self.batch_size, self.world_size, self.rank, self.seed = size, batch_size, world_size, rank, seed
        self.steps = per_rank // batch_size if max_steps is None else min(per_rank // batch_size, max_steps)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's indices and augmentation seeds for ``epoch`` (pure function of seed/epoch/rank)."""
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(self.size)
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**62, self.size)
        used = (self.size // self.world_size) * self.world_size
        return perm[self.rank:used:self.world_size], seeds[self.rank:used:self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx, seeds = self.epoch_plan(self.epoch)
        b = self.batch_size
        for step in range(self.start_step, self.steps):
            yield [(int(i), int(s)) for i, s in zip(idx[step * b:(step + 1) * b], seeds[step * b:(step + 1) * b])]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


class ExactEvalBatchSampler(Sampler):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, ...``: no padding, no duplicates, shares differ by <= 1."""

    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0):
        self.indices = list(range(rank, size, world_size))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size


# ----------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------
# Built-in demo data: scikit-learn's digits as an ImageFolder of PNGs.

DIGITS_MARKER = ".fcanet_digits_complete"


def write_digits_imagefolder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write ``sklearn.datasets.load_digits`` (1797 8x8 grey images, 10 classes) to
    ``root/{train,val}/<digit>/<n>.png`` with a deterministic stratified split. Done once: a complete
    tree (marker file) is left alone; the tree is built in a temp folder and renamed into place."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    marker = f"val_fraction={val_fraction} seed={seed}\n"

    def complete() -> bool:
        if not (root / DIGITS_MARKER).is_file():
            return False
        if (root / DIGITS_MARKER).read_text() != marker:
            raise DataError(f"data.root: {root} holds a digits tree written with other settings; delete it first")
        return True

    if complete():
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"data.root: {root} exists and is not a digits tree written by this project; "
                        "choose an empty or new folder")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in sorted(ids):
            folder = tmp / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    (tmp / DIGITS_MARKER).write_text(marker)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Atomic publish; never delete a tree another process may be reading (two trainers racing).
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not complete():
            raise DataError(f"data.root: could not create {root}") from None
    return root
