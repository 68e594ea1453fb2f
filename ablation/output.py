"""Writing a set of output files all or nothing, with one-line errors (a full disk changes nothing)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from engine.fileio import fsync_dir, temp_path, write_error

from .errors import AblationError


def write_files(files: Mapping[str | Path, str | bytes]) -> list[Path]:
    """Write every file, or none: each goes to a temp file beside its target (fsync-ed) first, and only when
    all are on disk are they renamed over their targets. A failure (disk full, read-only, a folder where a
    file should be) removes the temp files, leaves every target as it was, and raises one AblationError line
    naming the path."""
    temps: list[tuple[Path, Path]] = []
    replaced = 0
    target = Path()
    try:
        for target, data in files.items():
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                raise AblationError(f"cannot write {target}: it is a directory")
            tmp = temp_path(target)
            temps.append((tmp, target))
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, target in temps:
            os.replace(tmp, target)
            replaced += 1
            fsync_dir(target.parent)
    except OSError as exc:
        error = write_error(target, exc)
        state = "nothing was changed" if not replaced else f"{replaced} of {len(files)} files were replaced"
        raise AblationError(f"{error or f'cannot write {target}: {exc}'}; {state}") from None
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()
    return [target for _, target in temps]


def csv_text(header: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})
    return buf.getvalue()
