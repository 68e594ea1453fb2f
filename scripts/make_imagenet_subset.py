#!/usr/bin/env python
"""Build a class subset of an ImageNet ImageFolder (default: ImageNet-100 of CMC) with symlinks, no copy.

    python scripts/make_imagenet_subset.py --src data/imagenet --dst data/imagenet100

For every split (``train``, ``val``) and every class listed in ``--classes`` (default
``configs/ablation/imagenet100_classes.txt``, whose header gives its provenance) this makes
``DST/<split>/<wnid>`` a symlink to the absolute path of ``SRC/<split>/<wnid>``; the images are not copied, so
the subset costs a few kilobytes. Checks before anything is written: the list holds unique WordNet ids and every
listed class exists as a non-empty folder in every split of SRC. Idempotent: links already pointing at the
right folder are kept, so rerunning (or resuming an interrupted run) is safe; anything else already at a link's
place, or a class folder in DST that the list does not hold, is refused (never overwritten or deleted), since
the trainer's ImageFolder would pick it up as an extra class. Names from the list become paths only once checked:
every entry must be a WordNet id (``n`` + 8 digits; ``../x`` or an absolute path is refused), and every split a
plain folder name. Errors: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLASSES = REPO / "configs" / "ablation" / "imagenet100_classes.txt"
WNID = re.compile(r"^n\d{8}$")


class SubsetError(Exception):
    """A user-facing error: one line, exit status 2."""


def read_classes(path: Path) -> list[str]:
    """WordNet ids, one per line; ``#`` comments and blank lines ignored. Refuses malformed or repeated ids."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SubsetError(f"cannot read class list {path}: {exc.strerror or exc}") from None
    wnids: list[str] = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not WNID.match(text):
            raise SubsetError(f"class list {path}, line {number}: {text!r} is not a WordNet id (n + 8 digits)")
        if text in wnids:
            raise SubsetError(f"class list {path}, line {number}: {text} is listed twice")
        wnids.append(text)
    if not wnids:
        raise SubsetError(f"class list {path} holds no WordNet ids")
    return wnids


def _has_files(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(entry.is_file() for entry in it)


def check_source(src: Path, splits: list[str], wnids: list[str]) -> None:
    """Every listed class must be a non-empty folder in every split of ``src``."""
    for split in splits:
        root = src / split
        if not root.is_dir():
            raise SubsetError(f"--src {src}: no {split}/ folder (expected an ImageFolder root with "
                              f"{'/ and '.join(splits)}/)")
        missing = [w for w in wnids if not (root / w).is_dir()]
        if missing:
            raise SubsetError(f"--src {root}: {len(missing)} of the {len(wnids)} listed classes are missing "
                              f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
        empty = [w for w in wnids if not _has_files(root / w)]
        if empty:
            raise SubsetError(f"--src {root}: {len(empty)} listed class folders hold no files "
                              f"({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})")


def plan_links(src: Path, dst: Path, splits: list[str], wnids: list[str]) -> list[tuple[Path, Path]]:
    """The (link, target) pairs still to create; refuses anything in ``dst`` that is not ours."""
    todo = []
    wanted = set(wnids)
    for split in splits:
        out = dst / split
        if out.exists() and not out.is_dir():
            raise SubsetError(f"--dst: {out} exists and is not a folder")
        if out.is_dir():
            extra = sorted(p.name for p in out.iterdir() if p.name not in wanted)
            if extra:
                raise SubsetError(f"--dst: {out} holds {len(extra)} entries not in the class list "
                                  f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}); choose an empty "
                                  f"or new --dst")
        for wnid in wnids:
            link, target = out / wnid, (src / split / wnid).absolute()
            if link.is_symlink():
                if Path(os.readlink(link)) != target:
                    raise SubsetError(f"--dst: {link} links to {os.readlink(link)}, not {target}; remove it or "
                                      f"choose another --dst")
                continue
            if link.exists():
                raise SubsetError(f"--dst: {link} exists and is not a symlink; remove it or choose another --dst")
            todo.append((link, target))
    return todo


def count_images(dst: Path, splits: list[str]) -> dict[str, int]:
    counts = {}
    for split in splits:
        total = 0
        for link in (dst / split).iterdir():
            with os.scandir(link) as it:
                total += sum(1 for entry in it if entry.is_file())
        counts[split] = total
    return counts


def make_subset(src: Path, dst: Path, classes: Path = DEFAULT_CLASSES, splits: tuple[str, ...] = ("train", "val"),
                ) -> tuple[int, dict[str, int]]:
    """Create the symlink tree. Returns (links created now, images per split reachable through the subset)."""
    wnids = read_classes(classes)
    splits = list(splits)
    check_source(src, splits, wnids)
    if dst.resolve() == src.resolve():
        raise SubsetError("--dst must differ from --src")
    todo = plan_links(src, dst, splits, wnids)
    for link, target in todo:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link, target_is_directory=True)
    return len(todo), count_images(dst, splits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="ImageNet ImageFolder root (holds train/ and val/)")
    parser.add_argument("--dst", type=Path, required=True, help="subset root to create (e.g. data/imagenet100)")
    parser.add_argument("--classes", type=Path, default=DEFAULT_CLASSES,
                        help=f"WordNet ids, one per line (default: {DEFAULT_CLASSES.relative_to(REPO)})")
    parser.add_argument("--splits", default="train,val", help="comma-separated split folders (default train,val)")
    args = parser.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    try:
        if not splits:
            raise SubsetError("--splits is empty")
        for split in splits:  # each is one folder name under --src and --dst, never a path out of them
            if split == ".." or Path(split).name != split:
                raise SubsetError(f"--splits: {split!r} is not a plain folder name (e.g. train, val)")
        made, counts = make_subset(args.src, args.dst, args.classes, splits)
    except SubsetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, disk, a file system without symlinks
        print(f"error: {exc.filename or args.dst}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    n = len(read_classes(args.classes))
    print(f"{args.dst}: {n} classes x {len(splits)} splits ({made} links created, {n * len(splits) - made} already "
          f"there); images: " + ", ".join(f"{s} {c:,}" for s, c in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
