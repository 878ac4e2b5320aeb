"""The app's temp folder: new files get unique names; files older than a day are deleted, newer ones kept."""

from __future__ import annotations

import os
import time

from app.tempfiles import MAX_AGE_S, new_temp_file, temp_dir


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_new_files_are_unique_and_old_ones_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLMO_STUDIO_TMP", str(tmp_path / "root"))
    a = new_temp_file("downloads", "point", ".json")
    b = new_temp_file("downloads", "point", ".json")
    assert a != b and a.parent == b.parent == tmp_path / "root" / "downloads" and a.suffix == ".json"
    old_nested = a.parent / "sub" / "old.wav"
    old_nested.parent.mkdir()
    old_nested.write_bytes(b"x")
    _age(old_nested, MAX_AGE_S + 60)
    _age(a, MAX_AGE_S + 60)
    _age(b, MAX_AGE_S - 600)  # younger than a day: kept
    other = tmp_path / "root" / "clock_examples" / "clock_0.png"
    other.parent.mkdir()
    other.write_bytes(b"png")
    _age(other, MAX_AGE_S + 60)  # another sub-folder: only pruned when that one is used

    c = new_temp_file("downloads", "count", ".json")
    assert not a.exists() and not old_nested.exists() and not old_nested.parent.exists()
    assert b.exists() and c.exists() and other.exists()
    assert temp_dir("clock_examples") == other.parent and not other.exists()
