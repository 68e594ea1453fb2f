"""engine/fileio.py: appends that survive an earlier cut-short write."""
from __future__ import annotations

import json

from engine import fileio


def test_append_after_a_row_cut_short_keeps_both_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    fileio.append_line(path, json.dumps({"epoch": 1}))
    with open(path, "a") as f:
        f.write(json.dumps({"epoch": 2}))  # complete row, its newline never written
    fileio.append_line(path, json.dumps({"epoch": 3}))
    rows, torn = fileio.read_jsonl(path, warn=lambda msg: None)
    assert rows == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}] and not torn
    assert path.read_text().endswith('{"epoch": 3}\n')


def test_append_to_a_new_or_empty_file_adds_no_blank_line(tmp_path):
    path = tmp_path / "m.jsonl"
    fileio.append_line(path, "{}")
    (tmp_path / "e.jsonl").write_text("")
    fileio.append_line(tmp_path / "e.jsonl", "{}")
    assert path.read_text() == (tmp_path / "e.jsonl").read_text() == "{}\n"
