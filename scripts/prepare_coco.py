#!/usr/bin/env python
"""Check a downloaded COCO 2017 tree before training on it (nothing is downloaded or written).

    python scripts/prepare_coco.py --root /data/coco

Expected layout (the official archives train2017.zip, val2017.zip and annotations_trainval2017.zip unpacked
into one folder)::

    /data/coco/annotations/instances_train2017.json   /data/coco/train2017/000000000009.jpg ...
    /data/coco/annotations/instances_val2017.json     /data/coco/val2017/000000000139.jpg ...

Checks per split: the annotation file parses and holds images, annotations and categories; no file name leaves
the image folder; every listed image file exists; a random sample of images opens and has the size its entry
states. Counts that differ from the official 2017 release are reported (a subset is allowed, but then results
are not comparable with the paper). Prints one line per split and exits 0, or prints ``error: ...`` and exits 2.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

# Official COCO 2017 detection annotations (instances_*.json): images, annotations, categories.
OFFICIAL = {"train2017": (118287, 860001, 80), "val2017": (5000, 36781, 80)}


def check_split(root: Path, split: str, sample: int, seed: int = 0) -> str:
    """One summary line for ``split``; raises ``DataError`` (one line) on the first problem."""
    from PIL import Image

    from engine.data.errors import DataError
    from engine.detection.data import load_coco_index

    coco = load_coco_index(root, split).coco
    images = coco.dataset["images"]
    folder = root / split
    missing = [img["file_name"] for img in images if not (folder / img["file_name"]).is_file()]
    if missing:
        raise DataError(f"{split}: {len(missing)} of {len(images)} listed images are missing (e.g. "
                        f"{folder / missing[0]})")
    rng = random.Random(seed)
    for img in rng.sample(images, min(sample, len(images))):
        path = folder / img["file_name"]
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError as e:
            raise DataError(f"{split}: image {path} cannot be opened ({str(e).splitlines()[0][:80]})") from None
        if size != (img["width"], img["height"]):
            raise DataError(f"{split}: image {path} is {size[0]}x{size[1]} px, its annotation entry says "
                            f"{img['width']}x{img['height']}")
    counts = (len(images), len(coco.dataset["annotations"]), len(coco.dataset["categories"]))
    line = f"{split}: {counts[0]} images, {counts[1]} annotations, {counts[2]} categories; all files present, " \
           f"{min(sample, len(images))} sampled sizes match"
    official = OFFICIAL.get(split)
    if official and counts != official:
        line += (f" (note: the official COCO 2017 {split} has {official[0]} images, {official[1]} annotations, "
                 f"{official[2]} categories: results on this tree are not comparable with the paper's)")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the COCO folder (data.root of the configs)")
    parser.add_argument("--splits", nargs="+", default=["train2017", "val2017"])
    parser.add_argument("--sample", type=int, default=200, help="images per split whose size is checked")
    args = parser.parse_args(argv)
    from engine.data.errors import DataError

    root = Path(args.root)
    try:
        if not root.is_dir():
            raise DataError(f"--root {root}: not a directory")
        for split in args.splits:
            print(check_split(root, split, args.sample), flush=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
