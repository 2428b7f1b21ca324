"""compressor.atomic: the one atomic write (text, bytes, JSON, and writers that take a file name)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.atomic import atomic_path, atomic_write, atomic_write_json


def test_text_bytes_and_json_land_whole_and_leave_no_temporary_file(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "sub" / "c.json", {"path": tmp_path}, indent=None)  # parent created, str default
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"path": str(tmp_path)}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "report.md"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_the_temporary_name_keeps_the_suffix_writers_choose_formats_by(tmp_path):
    with atomic_path(tmp_path / "latency.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path  # same dir: os.replace stays atomic
        np.save(tmp, np.arange(3))  # would write tmp + ".npy" for any other suffix
    assert np.load(tmp_path / "latency.npy").tolist() == [0, 1, 2]
