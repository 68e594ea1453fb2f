#!/usr/bin/env python
"""Turn the official ILSVRC2012 tarballs into the ImageFolder layout the trainer reads (``data.root``).

    python scripts/prepare_imagenet.py --out /data/imagenet \
        --train-tar ILSVRC2012_img_train.tar \
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz

writes ``OUT/train/<wnid>/<wnid>_N.JPEG`` and ``OUT/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``; either split
can be prepared alone. Contract:

* restartable: a train class appears in ``OUT/train/`` only when complete (via ``train.partial/``), val files
  are written to a temp name and renamed; a rerun skips what is complete (``--verify`` re-checks sizes);
* nothing from an archive becomes a path unchecked (WordNet ids only, last path component only, unique
  names), so no archive writes outside ``--out``; one run at a time per ``--out`` (``.prepare_imagenet.lock``);
* the counts are checked (1,281,167 / 50,000 images, 1,000 classes; ``--expect-*`` to change);
* bad input stops with one ``error:`` line and exit status 2.

How each split is read and why: docs/data.md#imagenet-from-the-official-tarballs.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path
from collections.abc import Callable

TRAIN_IMAGES, VAL_IMAGES, CLASSES = 1_281_167, 50_000, 1_000
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
WNID = re.compile(r"^n\d{8}$")


class PrepareError(Exception):
    """Bad input: reported as one ``error:`` line."""


# ----------------------------------------------------------------------------------------------------- train
def list_class_tars(train_tar: str | Path) -> list[tuple[str, int, int]]:
    """``(wnid, offset of the inner tar's data, size)`` of every class tar in the official train tarball.

    Reads only the 1,000 outer headers (one seek each), not the data. Every member must be named
    ``nXXXXXXXX.tar`` (so the class folder names are WordNet ids, never a path), each class once.
    """
    classes, seen = [], {}
    try:
        with tarfile.open(train_tar, mode="r:") as tar:  # the official tarball is uncompressed: random access
            for m in tar:
                if not m.isfile():
                    continue
                wnid = os.path.basename(m.name)[:-len(".tar")] if m.name.endswith(".tar") else ""
                if not WNID.match(wnid):
                    raise PrepareError(f"{train_tar}: unexpected member {m.name!r} (expected one nXXXXXXXX.tar "
                                       "per class: is this ILSVRC2012_img_train.tar?)")
                if wnid in seen:
                    raise PrepareError(f"{train_tar}: two class tars for {wnid} ({seen[wnid]!r} and {m.name!r}): a "
                                       "damaged or repacked tarball; download ILSVRC2012_img_train.tar again")
                seen[wnid] = m.name
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
    seen: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as inner:  # leaves f open: tarfile never closes a given fileobj
            for m in inner:
                if m.offset_data + m.size > offset + size:
                    raise PrepareError(f"{train_tar}: {wnid}.tar is truncated or corrupt (member {m.name!r} runs "
                                       "past its end)")
                if not m.isfile():  # links, folders, devices: never extracted
                    continue
                # Only the member's last path component is used: "../../x.JPEG" or "/etc/x.JPEG" cannot leave the
                # class folder. Hidden names and two members with one file name (one would overwrite the other)
                # are refused.
                name = os.path.basename(m.name)
                if not name or name.startswith("."):
                    raise PrepareError(f"{train_tar}: {wnid}.tar: unexpected member name {m.name!r}")
                if name in seen:
                    raise PrepareError(f"{train_tar}: {wnid}.tar: members {seen[name]!r} and {m.name!r} share the file "
                                       f"name {name!r}")
                seen[name] = m.name
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
                  log=print, expect_classes: int | None = None) -> dict:
    """Extract every class of the official train tarball into ``out/<wnid>/`` (resumable, parallel).

    Args:
        train_tar: ``ILSVRC2012_img_train.tar`` (1,000 inner ``nXXXXXXXX.tar``, one per class).
        out: the train split folder, e.g. ``/data/imagenet/train``.
        workers: extraction processes (each handles whole classes).
        verify: re-check complete class folders against the tarball instead of trusting them.
        log: progress callback taking one line.
        expect_classes: if given, a tarball with another number of class tars is refused before anything is
            written.
    Returns counts: ``images``, ``classes``, ``written`` / ``present`` (classes), ``seconds``.
    Raises PrepareError naming the first bad class tar if any class failed (all others are extracted).
    """
    out = Path(out)
    classes = list_class_tars(train_tar)
    if expect_classes is not None and len(classes) != expect_classes:
        raise PrepareError(f"{train_tar}: {len(classes):,} class tars, expected {expect_classes:,} "
                           "(--expect-classes); nothing written")
    out.mkdir(parents=True, exist_ok=True)
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
def _synset_table(synsets, devkit: str | Path) -> dict[int, str]:
    """``{ILSVRC2012_ID: WNID}`` of the leaf synsets (``num_children == 0``: the 1,000 classes) of meta.mat's
    ``synsets`` struct array, every field checked: an id is a positive integer, a WordNet id has the shape
    ``n`` + 8 digits (it becomes a folder name: ``../x`` or ``/abs`` must never reach the file system), and
    neither repeats."""
    def bad(what: str) -> PrepareError:
        return PrepareError(f"{devkit}: data/meta.mat has an unexpected structure ({what}); expected the "
                            "ILSVRC2012_devkit_t12 synsets table")

    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    missing = [k for k in ("ILSVRC2012_ID", "WNID", "num_children") if k not in names]
    if missing:
        raise bad(f"'synsets' lacks the field(s) {', '.join(missing)}")
    table: dict[int, str] = {}
    seen: dict[str, int] = {}
    for row in synsets.reshape(-1):
        try:
            ident, wnid, children = row["ILSVRC2012_ID"], row["WNID"], row["num_children"]
            ident, children = int(ident), int(children)
        except (TypeError, ValueError, IndexError) as e:
            raise bad(f"a synset row is not (int id, WNID, int num_children): {str(e).splitlines()[0][:80]}") from None
        if children != 0:
            continue  # an inner WordNet node, not a class
        if not isinstance(wnid, str) or not WNID.match(wnid):
            raise PrepareError(f"{devkit}: data/meta.mat: class id {ident} has the WordNet id {str(wnid)[:60]!r}, "
                               "not n + 8 digits; refusing to use it as a folder name")
        if ident < 1 or ident in table:
            raise PrepareError(f"{devkit}: data/meta.mat: class id {ident} is " +
                               ("repeated" if ident in table else "not a positive integer"))
        if wnid in seen:
            raise PrepareError(f"{devkit}: data/meta.mat: {wnid} is the WordNet id of class ids {seen[wnid]} and "
                               f"{ident}")
        table[ident], seen[wnid] = wnid, ident
    if not table:
        raise bad("no leaf synset (num_children 0)")
    return table


def read_devkit(devkit: str | Path) -> list[str]:
    """WordNet id of every validation image, in order (index 0 = ILSVRC2012_val_00000001). Every id is checked
    (:func:`_synset_table`) before anything is written; a malformed devkit is one :class:`PrepareError`."""
    from scipy.io import loadmat

    meta = truth = None
    try:
        with tarfile.open(devkit) as tar:
            for m in tar.getmembers():
                if m.name.endswith("data/meta.mat") and m.isfile():
                    meta = loadmat(io.BytesIO(tar.extractfile(m).read()), squeeze_me=True)
                elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt") and m.isfile():
                    text = tar.extractfile(m).read().decode("ascii", errors="replace").split()
                    try:
                        truth = [int(x) for x in text]
                    except ValueError as e:
                        raise PrepareError(f"{devkit}: data/ILSVRC2012_validation_ground_truth.txt holds a "
                                           f"non-integer ({str(e).split(': ')[-1][:40]})") from None
    except (tarfile.TarError, EOFError, OSError, ValueError, TypeError, NotImplementedError) as e:
        # loadmat raises ValueError/TypeError/NotImplementedError (e.g. a v7.3 HDF5 file) for what it cannot read
        raise PrepareError(f"{devkit}: not a readable devkit ({str(e).splitlines()[0][:120] or type(e).__name__})"
                           ) from None
    if meta is None or truth is None:
        raise PrepareError(f"{devkit}: no data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt inside "
                           "(expected ILSVRC2012_devkit_t12.tar.gz)")
    if "synsets" not in meta:
        raise PrepareError(f"{devkit}: data/meta.mat has an unexpected structure (no 'synsets' table); expected "
                           "the ILSVRC2012_devkit_t12 synsets table")
    id_to_wnid = _synset_table(meta["synsets"], devkit)
    unknown = sorted({i for i in truth if i not in id_to_wnid})
    if unknown:
        raise PrepareError(f"{devkit}: ground truth uses class id {unknown[0]} missing from meta.mat")
    return [id_to_wnid[i] for i in truth]


def list_val_members(val_tar: str | Path, labels: int) -> int:
    """Check the names of every member of the val tarball before anything is written (headers only: one seek
    per member in the official uncompressed tar); returns the number of images. Each must be a distinct
    ``ILSVRC2012_val_XXXXXXXX.JPEG`` with a label in the devkit."""
    seen: dict[str, str] = {}
    try:
        with tarfile.open(val_tar, mode="r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = os.path.basename(m.name)
                match = VAL_NAME.match(name)
                if not match:
                    raise PrepareError(f"{val_tar}: unexpected member {m.name!r} (not ILSVRC2012_val_XXXXXXXX.JPEG)")
                if not 1 <= int(match.group(1)) <= labels:
                    raise PrepareError(f"{val_tar}: {name} has no label in the devkit ({labels} labels)")
                if name in seen:
                    raise PrepareError(f"{val_tar}: members {seen[name]!r} and {m.name!r} are both {name}")
                seen[name] = m.name
    except tarfile.TarError as e:
        raise PrepareError(f"{val_tar}: not a readable tar ({e})") from None
    return len(seen)


def check_val(val_tar: str | Path, devkit: str | Path, expect_images: int | None = None,
              expect_classes: int | None = None) -> list[str]:
    """Everything about the val split that can be checked without writing: the devkit's ids
    (:func:`read_devkit`), the tarball's member names (:func:`list_val_members`), and the counts: the tarball's
    images against the devkit's labels, and those against ``expect_images`` / ``expect_classes`` when given.
    Returns the labels (:func:`read_devkit`)."""
    labels = read_devkit(devkit)
    per_class = collections.Counter(labels)
    members = list_val_members(val_tar, len(labels))
    if members != len(labels):
        raise PrepareError(f"{val_tar}: {members:,} images, but the devkit labels {len(labels):,}: an incomplete "
                           "download? nothing written")
    if expect_images is not None and len(labels) != expect_images:
        raise PrepareError(f"{devkit}: labels {len(labels):,} val images, expected {expect_images:,} "
                           "(--expect-val-images); nothing written")
    if expect_classes is not None and len(per_class) != expect_classes:
        raise PrepareError(f"{devkit}: labels val images of {len(per_class):,} classes, expected {expect_classes:,} "
                           "(--expect-classes); nothing written")
    return labels


def prepare_val(val_tar: str | Path, devkit: str | Path, out: str | Path, expect_images: int | None = None,
                expect_classes: int | None = None, labels: list[str] | None = None) -> dict:
    """Sort the validation tarball's images into ``out/<wnid>/`` by the devkit's labels (restartable), after
    :func:`check_val` (skipped when its ``labels`` are given).

    Returns counts: ``images``, ``written``, ``already_present``, ``classes``, ``expected_images`` (labels in
    the devkit) and ``per_class`` (images per class the devkit labels).
    """
    if labels is None:
        labels = check_val(val_tar, devkit, expect_images, expect_classes)
    per_class = collections.Counter(labels)
    out = Path(out)
    written = skipped = 0
    try:
        with tarfile.open(val_tar, mode="r|*") as tar:  # streaming: the 6.4 GB tar is read once more
            for m in tar:
                if not m.isfile():
                    continue
                name = os.path.basename(m.name)  # a checked ILSVRC2012_val_XXXXXXXX.JPEG (list_val_members)
                target = out / labels[int(VAL_NAME.match(name).group(1)) - 1] / name
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
            "expected_images": len(labels), "per_class": dict(per_class)}


# ---------------------------------------------------------------------------------------------------- checks
def class_image_counts(train_tar: str | Path) -> dict[str, int]:
    """Images per class in the train tarball (reads every inner tar's headers, not the images)."""
    counts = {}
    with open(train_tar, "rb") as f:
        for wnid, offset, size in list_class_tars(train_tar):
            counts[wnid] = sum(1 for _ in _inner_files(f, train_tar, wnid, offset, size))
    return counts


def count_split(folder: str | Path) -> tuple[int, int]:
    """``(images, classes)`` of an ImageFolder split: its class folders (every folder, as ImageFolder sees
    them) and the files in them."""
    dirs = [p for p in Path(folder).iterdir() if p.is_dir()]
    return sum(1 for d in dirs for p in d.iterdir() if p.is_file() and not p.name.endswith(".tmp")), len(dirs)


def _class_counts(folder: Path) -> dict[str, int]:
    return {d.name: sum(1 for p in d.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
            for d in folder.iterdir() if d.is_dir()}


def check_counts(split: str, folder: Path, images: int, classes: int,
                 per_class: dict[str, int] | Callable[[], dict[str, int]] | None = None) -> str:
    """Compare the split's image and class counts with the expected ones. On a mismatch, ``per_class`` (the
    expected images per class, or a function computing them) names the classes that differ."""
    got_images, got_classes = count_split(folder)
    if (got_images, got_classes) != (images, classes):
        detail = ""
        expected = per_class() if callable(per_class) else per_class
        if expected:
            have = _class_counts(folder)
            wrong = sorted(w for w in set(expected) | set(have) if have.get(w, 0) != expected.get(w, 0))
            if wrong:
                shown = ", ".join(f"{w} has {have.get(w, 0)} of {expected.get(w, 0)}" for w in wrong[:5])
                more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
                fix = "; rerun with --verify to re-extract them" if split == "train" else "; rerun to complete them"
                detail = f"; {len(wrong)} class(es) differ from the archive: {shown}{more}{fix}"
        raise PrepareError(f"{folder}: {got_images:,} images in {got_classes:,} class folders, expected "
                           f"{images:,} in {classes:,} for {split}{detail or ' (incomplete download or extraction?)'}")
    return f"{split}: {got_images:,} images in {got_classes:,} class folders under {folder}: counts as expected"


LOCK_NAME = ".prepare_imagenet.lock"


@contextlib.contextmanager
def lock_output(out: Path):
    """Hold an exclusive ``flock`` on ``out/.prepare_imagenet.lock`` (taken without waiting): two runs writing
    one data root would delete each other's half-extracted classes and rename incomplete ones into place. The
    kernel releases the lock when the process ends, however it ends; the file itself stays (harmless)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise PrepareError(f"--out {out}: another prepare_imagenet.py run is writing here (pid {holder}); "
                               "wait for it to finish, or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


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
        labels = None
        if a.val_tar:  # checked before anything is written (train included), the lock too
            labels = check_val(a.val_tar, a.devkit, a.expect_val_images, a.expect_classes)
        with lock_output(out):
            if a.train_tar:
                r = prepare_train(a.train_tar, out / "train", workers=a.workers, verify=a.verify,
                                  expect_classes=a.expect_classes)
                print(f"train: {r['classes']} classes ({r['written']} extracted, {r['present']} already complete) "
                      f"in {r['seconds']:.0f} s")
                print(check_counts("train", out / "train", a.expect_train_images, a.expect_classes,
                                   lambda: class_image_counts(a.train_tar)))
            if a.val_tar:
                r = prepare_val(a.val_tar, a.devkit, out / "val", labels=labels)
                print(f"val: {r['written']} images written, {r['already_present']} already present; the devkit "
                      f"labels {r['expected_images']:,}")
                print(check_counts("val", out / "val", a.expect_val_images, a.expect_classes, r["per_class"]))
    except (PrepareError, OSError, EOFError, tarfile.TarError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
