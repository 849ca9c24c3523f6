"""laser_export.policy: the one output policy (unit level; the CLI rows are in test_hostile.py)."""

from __future__ import annotations

import os

import pytest

from laser_export.policy import OutputError, check_file_output, check_output, check_search_log, is_export
from laser_export.search.results import ResultsLog, run_key


def test_the_search_log_accepts_its_own_lines_and_a_torn_last_one(tmp_path):
    log = tmp_path / "x.search.jsonl"
    ResultsLog(log, run_key(a=1)).add("L1.fc_in.k2", "single", {"top1": 0.5})
    ResultsLog(log, run_key(a=2)).add("L1.fc_in.k3", "single", {"top1": 0.25})
    assert check_search_log(log) == log.resolve()
    with log.open("a") as fh:
        fh.write('{"run": "0123')  # a killed write
    assert check_search_log(log) == log.resolve()


def test_the_search_log_never_appends_to_another_file(tmp_path):
    other = tmp_path / "notes.jsonl"
    other.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(OutputError, match="is not a laser-export search log"):
        check_search_log(other)
    assert other.read_text() == '{"prompt": "a", "answer": "b"}\n'


def test_a_file_output_is_never_an_input_or_inside_one(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="is inside an input of this run"):
        check_file_output(model / "config.json", "--report", protect=[model])
    with pytest.raises(OutputError, match="is an input of this run"):
        check_file_output(model / "config.json", "--report", protect=[model / "config.json"])
    with pytest.raises(OutputError, match="is inside --out"):
        check_file_output(tmp_path / "out" / "r.json", "--report", inside=[("--out", tmp_path / "out")])
    with pytest.raises(OutputError, match="is a folder"):
        check_file_output(tmp_path, "--report")
    assert check_file_output(tmp_path / "r.json", "--report", protect=[model]) == (tmp_path / "r.json").resolve()


def test_non_regular_files_and_odd_paths_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="not a regular file"):
        check_file_output(tmp_path / "fifo", "--report")
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "manifest.json")
    assert not is_export(tmp_path / "out")  # returns at once: a FIFO manifest is never opened
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(OutputError, match="cannot be resolved"):
        check_output(tmp_path / "loop")
    with pytest.raises(OutputError, match="longer than 255 bytes"):
        check_file_output(tmp_path / ("é" * 130), "--report")  # 130 characters, 260 bytes
