#!/usr/bin/env python
"""Turn the official ILSVRC2012 validation tarball + devkit labels into ImageFolder class folders.

    python scripts/prepare_imagenet_val.py --val-tar ILSVRC2012_img_val.tar \
        --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet/val

writes ``OUT/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` (1000 folders, 50 images each for the full set). The
class of validation image ``i`` is line ``i`` of ``data/ILSVRC2012_validation_ground_truth.txt`` (an
ILSVRC2012_ID in 1..1000), mapped to its WordNet id by ``data/meta.mat``, both in the devkit. The train
tarball already unpacks into ``train/<wnid>/`` folders (one inner tar per class).

Streams the tarball (no temp copy); files are written to a temp name and renamed, and complete files
already present are skipped, so an interrupted run can simply be restarted.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


def read_devkit(devkit: str | Path) -> list[str]:
    """WordNet id of every validation image, in order (index 0 = ILSVRC2012_val_00000001)."""
    import io

    from scipy.io import loadmat

    meta = truth = None
    with tarfile.open(devkit) as tar:
        for m in tar.getmembers():
            if m.name.endswith("data/meta.mat"):
                meta = loadmat(io.BytesIO(tar.extractfile(m).read()), squeeze_me=True)["synsets"]
            elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                truth = [int(x) for x in tar.extractfile(m).read().decode().split()]
    if meta is None or truth is None:
        raise ValueError(f"{devkit}: no data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt inside "
                         "(expected ILSVRC2012_devkit_t12.tar.gz)")
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    try:
        return [id_to_wnid[i] for i in truth]
    except KeyError as e:
        raise ValueError(f"{devkit}: ground truth uses class id {e.args[0]} missing from meta.mat") from None


def prepare(val_tar: str | Path, devkit: str | Path, out: str | Path) -> dict:
    labels = read_devkit(devkit)
    out = Path(out)
    written = skipped = 0
    with tarfile.open(val_tar, mode="r|*") as tar:  # streaming: the 6.4 GB tar is read once
        for m in tar:
            if not m.isfile():
                continue
            name = os.path.basename(m.name)
            match = VAL_NAME.match(name)
            if not match:
                raise ValueError(f"{val_tar}: unexpected member {m.name!r} (not ILSVRC2012_val_XXXXXXXX.JPEG)")
            index = int(match.group(1))
            if not 1 <= index <= len(labels):
                raise ValueError(f"{val_tar}: {name} has no label in the devkit ({len(labels)} labels)")
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
    total = written + skipped
    classes = len({p.name for p in out.iterdir() if p.is_dir()}) if out.exists() else 0
    return {"images": total, "written": written, "already_present": skipped, "classes": classes,
            "expected_images": len(labels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val-tar", required=True, help="ILSVRC2012_img_val.tar")
    p.add_argument("--devkit", required=True, help="ILSVRC2012_devkit_t12.tar.gz")
    p.add_argument("--out", required=True, help="output folder, e.g. data/imagenet/val")
    a = p.parse_args(argv)
    for f in (a.val_tar, a.devkit):
        if not Path(f).is_file():
            print(f"error: file not found: {f}", file=sys.stderr)
            return 2
    try:
        r = prepare(a.val_tar, a.devkit, a.out)
    except (ValueError, KeyError, EOFError, tarfile.TarError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{r['images']} images in {r['classes']} class folders under {a.out} ({r['written']} written, "
          f"{r['already_present']} already present; the devkit lists {r['expected_images']})")
    if r["images"] != r["expected_images"]:
        print(f"warning: the tarball held {r['images']} images, the devkit labels {r['expected_images']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
