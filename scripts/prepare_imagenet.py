#!/usr/bin/env python
"""Turn the official ILSVRC2012 tarballs into the ImageFolder layout the trainer reads (``data.root``).

    python scripts/prepare_imagenet.py --out /data/imagenet \
        --train-tar ILSVRC2012_img_train.tar \
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz

writes ``OUT/train/<wnid>/<wnid>_N.JPEG`` and ``OUT/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``; either split
can be prepared alone (give only its tarball). At the end the image and class counts are checked against
the full dataset (1,281,167 train / 50,000 val images, 1,000 classes; ``--expect-*`` to change).

* **train**: ``ILSVRC2012_img_train.tar`` holds one uncompressed tar per class (``n01440764.tar``, ...).
  Classes are extracted in parallel (``--workers``), each by a worker that seeks straight to its inner tar
  (the 138 GB tarball is never copied). A class is written to ``OUT/train.partial/<wnid>/`` and renamed
  to ``OUT/train/<wnid>/`` when complete, so an interrupted run is simply restarted: complete classes are
  skipped and partial ones extracted again (``train/`` never holds a partial class). ``--verify``
  re-checks the file names and sizes of every complete class against the tarball (reads the inner tars'
  headers) and re-extracts those that differ.
* **val**: the 50,000 images of ``ILSVRC2012_img_val.tar`` are sorted into class folders. The class of
  validation image ``i`` is line ``i`` of ``data/ILSVRC2012_validation_ground_truth.txt`` (an ILSVRC2012_ID
  in 1..1000), mapped to its WordNet id by ``data/meta.mat``, both in the devkit. The tarball is streamed;
  each file is written to a temp name and renamed, and complete files already present are skipped.

Bad input (missing or wrong tarball, wrong counts) stops with one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

TRAIN_IMAGES, VAL_IMAGES, CLASSES = 1_281_167, 50_000, 1_000
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
WNID = re.compile(r"^n\d{8}$")


class PrepareError(Exception):
    """Bad input: reported as one ``error:`` line."""


# ----------------------------------------------------------------------------------------------------- train
def list_class_tars(train_tar: str | Path) -> list[tuple[str, int, int]]:
    """``(wnid, offset of the inner tar's data, size)`` of every class tar in the official train tarball.

    Reads only the 1,000 outer headers (one seek each), not the data.
    """
    classes = []
    try:
        with tarfile.open(train_tar, mode="r:") as tar:  # the official tarball is uncompressed: random access
            for m in tar:
                if not m.isfile():
                    continue
                wnid = os.path.basename(m.name)[:-len(".tar")] if m.name.endswith(".tar") else ""
                if not WNID.match(wnid):
                    raise PrepareError(f"{train_tar}: unexpected member {m.name!r} (expected one nXXXXXXXX.tar "
                                       "per class: is this ILSVRC2012_img_train.tar?)")
                classes.append((wnid, m.offset_data, m.size))
    except tarfile.TarError as e:
        raise PrepareError(f"{train_tar}: not a readable uncompressed tar ({e}): expected "
                           "ILSVRC2012_img_train.tar") from None
    if not classes:
        raise PrepareError(f"{train_tar}: no class tars inside (expected ILSVRC2012_img_train.tar)")
    return classes


def _inner_files(f, train_tar: str | Path, wnid: str, offset: int, size: int):
    """Yield ``(inner TarFile, TarInfo, image file name)`` for the images of one class's inner tar, which starts
    at ``offset`` of the open file ``f`` (``tarfile`` takes the file's current position as the archive's start)."""
    f.seek(offset)
    try:
        inner = tarfile.open(fileobj=f, mode="r:")
        for m in inner:
            if m.offset_data + m.size > offset + size:
                raise PrepareError(f"{train_tar}: {wnid}.tar is truncated or corrupt (member {m.name!r} runs "
                                   "past its end)")
            if not m.isfile():
                continue
            name = os.path.basename(m.name)
            if not name or name.startswith("."):
                raise PrepareError(f"{train_tar}: {wnid}.tar: unexpected member name {m.name!r}")
            yield inner, m, name
    except tarfile.TarError as e:
        raise PrepareError(f"{train_tar}: {wnid}.tar is not a readable tar ({e})") from None


def _staging(out: Path) -> Path:
    """Where classes are extracted before being renamed into ``out``: a sibling, so on the same file system
    (the rename is atomic) and never seen by the trainer's ImageFolder, which takes every folder as a class."""
    return out.parent / f"{out.name}.partial"


def _extract_class(job: tuple) -> tuple[str, int, str, str]:
    """Worker: extract (or check) one class. Returns ``(wnid, images, "written"|"present"|"failed", error)``;
    a failed class leaves nothing behind and does not stop the others."""
    try:
        return (*_extract_class_or_raise(*job), "")
    except (PrepareError, OSError, EOFError, tarfile.TarError) as e:
        shutil.rmtree(_staging(Path(job[1])) / job[2], ignore_errors=True)
        return job[2], 0, "failed", str(e).splitlines()[0] if str(e) else type(e).__name__


def _extract_class_or_raise(train_tar: str, out: str | Path, wnid: str, offset: int, size: int,
                            verify: bool) -> tuple[str, int, str]:
    out = Path(out)
    final = out / wnid
    staging = _staging(out)
    with open(train_tar, "rb") as f:
        if final.is_dir():
            if not verify:
                return wnid, sum(1 for p in final.iterdir() if p.is_file()), "present"
            expected = {name: m.size for _, m, name in _inner_files(f, train_tar, wnid, offset, size)}
            if {p.name: p.stat().st_size for p in final.iterdir() if p.is_file()} == expected:
                return wnid, len(expected), "present"
        partial = staging / wnid
        if partial.exists():  # left by an interrupted run: start the class again
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        count = 0
        for inner, m, name in _inner_files(f, train_tar, wnid, offset, size):
            with inner.extractfile(m) as src, open(partial / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            count += 1
    if count == 0:
        shutil.rmtree(partial)
        raise PrepareError(f"{train_tar}: {wnid}.tar holds no images")
    if final.is_dir():  # --verify found a stale class folder: swap in the new one
        stale = staging / f"{wnid}.stale"
        if stale.exists():
            shutil.rmtree(stale)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale)
    else:
        partial.rename(final)  # atomic: a class folder exists only once it is complete
    return wnid, count, "written"


def prepare_train(train_tar: str | Path, out: str | Path, workers: int = 8, verify: bool = False,
                  log=print) -> dict:
    """Extract every class of the official train tarball into ``out/<wnid>/`` (resumable, parallel).

    Args:
        train_tar: ``ILSVRC2012_img_train.tar`` (1,000 inner ``nXXXXXXXX.tar``, one per class).
        out: the train split folder, e.g. ``/data/imagenet/train``.
        workers: extraction processes (each handles whole classes).
        verify: re-check complete class folders against the tarball instead of trusting them.
        log: progress callback taking one line.
    Returns counts: ``images``, ``classes``, ``written`` / ``present`` (classes), ``seconds``.
    Raises PrepareError naming the first bad class tar if any class failed (all others are extracted).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list_class_tars(train_tar)
    jobs = [(str(train_tar), str(out), wnid, offset, size, verify) for wnid, offset, size in classes]
    start = time.monotonic()
    images, status, errors = 0, {"written": 0, "present": 0, "failed": 0}, []
    every = max(1, len(jobs) // 20)
    _staging(out).mkdir(exist_ok=True)
    # spawn: workers start clean whatever threads the caller holds (e.g. torch's) and need only this module.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, min(workers, len(jobs)))) as pool:
        for done, (_, n, how, error) in enumerate(pool.imap_unordered(_extract_class, jobs), 1):
            images += n
            status[how] += 1
            if error:
                errors.append(error)
            if done % every == 0 or done == len(jobs):
                log(f"train: {done}/{len(jobs)} classes, {images:,} images ({status['written']} extracted, "
                    f"{status['present']} already complete), {time.monotonic() - start:.0f} s")
    shutil.rmtree(_staging(out), ignore_errors=True)  # leftovers of interrupted runs, now obsolete
    if errors:
        raise PrepareError(f"{len(errors)} of {len(jobs)} classes failed (the others are complete), "
                           f"e.g. {sorted(errors)[0]}")
    return {"images": images, "classes": len(classes), "seconds": time.monotonic() - start, **status}


# ------------------------------------------------------------------------------------------------------- val
def read_devkit(devkit: str | Path) -> list[str]:
    """WordNet id of every validation image, in order (index 0 = ILSVRC2012_val_00000001)."""
    from scipy.io import loadmat

    meta = truth = None
    try:
        with tarfile.open(devkit) as tar:
            for m in tar.getmembers():
                if m.name.endswith("data/meta.mat"):
                    meta = loadmat(io.BytesIO(tar.extractfile(m).read()), squeeze_me=True)["synsets"]
                elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    truth = [int(x) for x in tar.extractfile(m).read().decode().split()]
    except (tarfile.TarError, KeyError, ValueError) as e:
        raise PrepareError(f"{devkit}: not a readable devkit ({e})") from None
    if meta is None or truth is None:
        raise PrepareError(f"{devkit}: no data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt inside "
                           "(expected ILSVRC2012_devkit_t12.tar.gz)")
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    try:
        return [id_to_wnid[i] for i in truth]
    except KeyError as e:
        raise PrepareError(f"{devkit}: ground truth uses class id {e.args[0]} missing from meta.mat") from None


def prepare_val(val_tar: str | Path, devkit: str | Path, out: str | Path) -> dict:
    """Sort the validation tarball's images into ``out/<wnid>/`` by the devkit's labels (restartable).

    Returns counts: ``images``, ``written``, ``already_present``, ``classes``, ``expected_images`` (labels in
    the devkit).
    """
    labels = read_devkit(devkit)
    out = Path(out)
    written = skipped = 0
    try:
        with tarfile.open(val_tar, mode="r|*") as tar:  # streaming: the 6.4 GB tar is read once
            for m in tar:
                if not m.isfile():
                    continue
                name = os.path.basename(m.name)
                match = VAL_NAME.match(name)
                if not match:
                    raise PrepareError(f"{val_tar}: unexpected member {m.name!r} (not ILSVRC2012_val_XXXXXXXX.JPEG)")
                index = int(match.group(1))
                if not 1 <= index <= len(labels):
                    raise PrepareError(f"{val_tar}: {name} has no label in the devkit ({len(labels)} labels)")
                target = out / labels[index - 1] / name
                if target.is_file() and target.stat().st_size == m.size:
                    skipped += 1
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                with tar.extractfile(m) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(target)
                written += 1
    except tarfile.TarError as e:
        raise PrepareError(f"{val_tar}: not a readable tar ({e})") from None
    classes = len({p.name for p in out.iterdir() if p.is_dir()}) if out.exists() else 0
    return {"images": written + skipped, "written": written, "already_present": skipped, "classes": classes,
            "expected_images": len(labels)}


# ---------------------------------------------------------------------------------------------------- checks
def count_split(folder: str | Path) -> tuple[int, int]:
    """``(images, classes)`` of an ImageFolder split: its class folders (every folder, as ImageFolder sees
    them) and the files in them."""
    dirs = [p for p in Path(folder).iterdir() if p.is_dir()]
    return sum(1 for d in dirs for p in d.iterdir() if p.is_file() and not p.name.endswith(".tmp")), len(dirs)


def check_counts(split: str, folder: Path, images: int, classes: int) -> str:
    got_images, got_classes = count_split(folder)
    if (got_images, got_classes) != (images, classes):
        raise PrepareError(f"{folder}: {got_images:,} images in {got_classes:,} class folders, expected "
                           f"{images:,} in {classes:,} for {split} (incomplete download or extraction?)")
    return f"{split}: {got_images:,} images in {got_classes:,} class folders under {folder}: counts as expected"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="data root to write train/ and val/ into (data.root)")
    p.add_argument("--train-tar", help="ILSVRC2012_img_train.tar (1,000 per-class tars)")
    p.add_argument("--val-tar", help="ILSVRC2012_img_val.tar")
    p.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz (labels of the val images)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=min(16, cpus),
                   help="train extraction processes (default: CPUs available, at most 16)")
    p.add_argument("--verify", action="store_true",
                   help="re-check complete train class folders against the tarball (re-extract if different)")
    p.add_argument("--expect-train-images", type=int, default=TRAIN_IMAGES, metavar="N")
    p.add_argument("--expect-val-images", type=int, default=VAL_IMAGES, metavar="N")
    p.add_argument("--expect-classes", type=int, default=CLASSES, metavar="N")
    a = p.parse_args(argv)
    if not a.train_tar and not a.val_tar:
        p.error("give --train-tar and/or --val-tar (with --devkit)")
    if a.val_tar and not a.devkit:
        p.error("--val-tar needs --devkit (ILSVRC2012_devkit_t12.tar.gz) for the labels")
    if a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    out = Path(a.out)
    try:
        for f in (a.train_tar, a.val_tar, a.devkit):
            if f is not None and not Path(f).is_file():
                raise PrepareError(f"file not found: {f}")
        if out.exists() and not out.is_dir():
            raise PrepareError(f"--out {out}: exists and is not a folder")
        if a.train_tar:
            r = prepare_train(a.train_tar, out / "train", workers=a.workers, verify=a.verify)
            print(f"train: {r['classes']} classes ({r['written']} extracted, {r['present']} already complete) "
                  f"in {r['seconds']:.0f} s")
            print(check_counts("train", out / "train", a.expect_train_images, a.expect_classes))
        if a.val_tar:
            r = prepare_val(a.val_tar, a.devkit, out / "val")
            print(f"val: {r['written']} images written, {r['already_present']} already present; the devkit "
                  f"labels {r['expected_images']:,}")
            print(check_counts("val", out / "val", a.expect_val_images, a.expect_classes))
    except (PrepareError, OSError, EOFError, tarfile.TarError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
