"""laser_export.atomic: the one module every writer goes through."""

from __future__ import annotations

import json
import os
import stat

import pytest

from laser_export import atomic


def test_write_text_bytes_json_replace_whole_files(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    assert atomic.write_json(p, {"b": 1, "a": [1, 2]}, sort_keys=True) == p
    assert p.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    atomic.write_json(p, {"x": 1}, indent=1, newline=False)
    assert p.read_text() == json.dumps({"x": 1}, indent=1)
    atomic.write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == atomic.FILE_MODE
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json", "b.bin", "t.txt"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(TypeError):
        atomic.write_json(p, {"x": object()})  # not serialisable: fails before anything is written
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(p, "wb") as f:
            f.write(b"half")
            raise RuntimeError("killed half-way")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_folder_raises_and_leaves_nothing(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OSError):
            atomic.write_text(ro / "x.txt", "x")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_folder_replacement_lives_with_the_output_policy():
    from laser_export import policy
    from laser_export.export import safetensors

    assert not hasattr(atomic, "atomic_folder") and not hasattr(safetensors, "atomic_folder")
    assert not hasattr(safetensors, "check_output") and not hasattr(safetensors, "OutputError")
    assert callable(policy.atomic_folder) and callable(policy.clean_debris)


def test_write_via_a_path_writer_is_atomic_too(tmp_path):
    """write_via serves writers that take a path (safetensors' save_file): whole file or the old one."""
    p = tmp_path / "prefix.safetensors"
    p.write_bytes(b"old")
    atomic.write_via(p, lambda tmp: tmp.write_bytes(b"new whole file"))
    assert p.read_bytes() == b"new whole file"
    assert stat.S_IMODE(p.stat().st_mode) == atomic.FILE_MODE

    def half(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_via(p, half)
    assert p.read_bytes() == b"new whole file"
    assert [x.name for x in tmp_path.iterdir()] == ["prefix.safetensors"]


def test_part_debris_of_a_killed_writer_is_removed_and_a_live_one_kept(tmp_path):
    """A writer killed mid-write leaves `.NAME.PID-RANDOM.part`; the next write into that folder (reports, cache
    entries) removes it when PID is gone, and never touches a live writer's temporary."""
    import subprocess
    import sys

    from laser_export.atomic import clean_part_debris

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    killed = tmp_path / f".r.json.{dead_pid}-abc123.part"
    live = tmp_path / f".r.json.{os.getpid()}-def456.part"
    other = tmp_path / "keep.part"
    for f in (killed, live, other):
        f.write_bytes(b"x" * 10)
    assert clean_part_debris(tmp_path) == [killed]
    assert not killed.exists() and live.exists() and other.exists()


def test_a_report_write_cleans_the_debris_of_killed_report_writes(tmp_path):
    import subprocess
    import sys

    from laser_export.runner import _write_json

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    debris = tmp_path / f".verify.json.{dead_pid}-zz.part"
    debris.write_bytes(b"{half a report")
    _write_json(tmp_path / "verify.json", {"passed": True})
    assert not debris.exists() and json.loads((tmp_path / "verify.json").read_text()) == {"passed": True}
