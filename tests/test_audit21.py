"""Issue 21, re-trial (helper H12): variants of the issue's cases that still failed on main, each a test that
failed before its fix. The issue's own cases are covered where their behaviour lives (see the issue note)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from laser_export.cli import main
from tinymodels import save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]
CLAIMS = {"baseline": {"accuracy": 0.0}, "reduced": {"accuracy": 0.0}, "tolerance": 1.0}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit21")
    save_tiny("llama", root / "llama")
    (root / "bench.jsonl").write_text("".join(
        json.dumps({"prompt": f"{WORDS[i % 90]} {WORDS[(3 * i + 1) % 90]}", "answer": WORDS[(i * 11) % 90]}) + "\n"
        for i in range(24)))
    return root


def _recipe(path: Path, source: Path, bench: Path, **top) -> Path:
    data = {"name": "audit", "model": {"source": str(source)}, "storage": "factorised",
            "interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.25}],
            "benchmark": {"name": "jsonl", "path": str(bench), "split": "test", "seed": 0,
                          "validation_fraction": 0.25, "batch_size": 8},
            "claims": CLAIMS, **top}
    path.write_text(yaml.safe_dump(data))
    return path


def _with_stale_index(ws: Path, dest: Path) -> Path:
    """The tiny model plus a stale sharded index (and its shard, all zeros) beside model.safetensors:
    transformers loads model.safetensors and never the index."""
    shutil.copytree(ws / "llama", dest)
    state = load_file(dest / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, dest / "model-00001-of-00001.safetensors",
              metadata={"format": "pt"})
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}))
    return dest


def _cli(*argv) -> "subprocess.CompletedProcess":
    """The command in a fresh process, as a user runs it (exit codes asserted there)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "laser_export", *map(str, argv), "--no-progress"], capture_output=True,
                          text=True, timeout=300, env=env)


def _bump_weights(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    state["model.embed_tokens.weight"] += 1
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------ the identity is what transformers loads (model.safetensors wins)


def test_identity_follows_model_safetensors_not_a_stale_index_beside_it(ws, tmp_path):
    """Before: the identity hashed the index's shards while transformers (and the stream) loaded
    model.safetensors: new weights kept the old identity (caches hit, an old report was accepted)."""
    from laser_export.identity import weight_files, weights_identity

    src = _with_stale_index(ws, tmp_path / "m")
    assert weight_files(src) == [src / "model.safetensors"]
    before = weights_identity(str(src))
    _bump_weights(src)
    assert weights_identity(str(src)) != before


@pytest.mark.slow  # a verify, then `apply` in a fresh process (~5 s); CI runs the slow tests too
def test_apply_report_of_old_weights_is_refused_with_a_stale_index_beside_them(ws, tmp_path, capsys):
    """apply --report: a report measured on other weights is refused, also when a stale index sits beside
    model.safetensors (before: exit 0, the card certified weights that were never measured)."""
    src = _with_stale_index(ws, tmp_path / "m")
    recipe = _recipe(tmp_path / "r.yaml", src, ws / "bench.jsonl")
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    _bump_weights(src)
    res = _cli("apply", recipe, "--out", tmp_path / "o", "--report", report)
    assert res.returncode == 2 and "measured another model" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------- a cache folder is never the model source (or inside it)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["the model folder", "a folder inside it"])
def test_a_baseline_cache_pointed_into_the_model_source_is_a_warning_and_writes_nothing_there(
        ws, tmp_path, monkeypatch, capsys, where):
    """Before: LASER_EXPORT_BASELINE_CACHE=<the model folder> wrote cache entries, a prefix *.safetensors and the
    checksum memo into the model source (exit 0); every path the tool writes goes through the output policy."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    before = _listing(src)
    monkeypatch.setenv("LASER_EXPORT_BASELINE_CACHE", str(src if where == "the model folder" else src / "cache"))
    recipe = _recipe(tmp_path / "r.yaml", src, ws / "bench.jsonl")
    assert main(["verify", str(recipe), "--report", str(tmp_path / "rep.json"), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "is inside an input of this run" in err and "continuing without the cache" in err
    assert _listing(src) == before
    assert main([str(recipe), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "rep2.json"), "--no-progress"]) == 0
    assert _listing(src) == before


def test_the_checksum_memo_is_never_written_among_the_files_it_hashes(ws, tmp_path):
    from laser_export.identity import SIDECAR, file_sha256

    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    file_sha256(src / "model.safetensors", memo_dir=src)
    assert not (src / SIDECAR).exists()
    file_sha256(src / "config.json", memo_dir=tmp_path / "memo")  # elsewhere: memoised as before
    assert (tmp_path / "memo" / SIDECAR).is_file()


# ------------------------------------------------------- apply --report: the reduction is part of the interventions


@pytest.mark.slow  # a verify, then `apply` in a fresh process (~5 s); CI runs the slow tests too
def test_apply_report_measured_with_another_svd_is_refused(ws, tmp_path, capsys):
    """Before: a report measured with the exact SVD was accepted for a recipe that reduces with the randomized
    one (same layers, ranks and storage, other factors): the card certified matrices that were never measured."""
    recipe = _recipe(tmp_path / "r.yaml", ws / "llama", ws / "bench.jsonl")
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    assert json.loads(report.read_text())["reduction"]["method"] == "exact"
    assert main(["apply", str(recipe), "--out", str(tmp_path / "ok"), "--report", str(report), "--no-progress"]) == 0
    other = _recipe(tmp_path / "r2.yaml", ws / "llama", ws / "bench.jsonl", reduction={"method": "randomized"})
    res = _cli("apply", other, "--out", tmp_path / "o", "--report", report)
    assert res.returncode == 2 and "reduced with" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a verify, then `apply` in a fresh process (~5 s); CI runs the slow tests too
@pytest.mark.parametrize("change, fragment", [
    ({"claims": {"baseline": {"accuracy": 0.9}, "reduced": {"accuracy": 0.95}, "tolerance": 0.01}}, "verified other claims"),
    ({"benchmark": {"name": "jsonl", "split": "test", "seed": 3, "validation_fraction": 0.25, "batch_size": 8}},
     "measured benchmark.seed 0, this recipe's is 3"),
])
def test_apply_report_of_other_claims_or_another_split_is_refused(ws, tmp_path, capsys, change, fragment):
    """Before: the card showed the report's claims as passed next to an embedded recipe claiming other numbers
    (or on another split), exit 0."""
    recipe = _recipe(tmp_path / "r.yaml", ws / "llama", ws / "bench.jsonl")
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    if "benchmark" in change:
        change = {"benchmark": {**change["benchmark"], "path": str(ws / "bench.jsonl")}}
    other = _recipe(tmp_path / "r2.yaml", ws / "llama", ws / "bench.jsonl", **change)
    res = _cli("apply", other, "--out", tmp_path / "o", "--report", report)
    assert res.returncode == 2 and fragment in " ".join(res.stderr.split()), res.stderr
    assert not (tmp_path / "o").exists()


def test_nan_in_a_float32_checkpoint_is_named_without_advising_float32(ws, tmp_path, capsys):
    """A NaN in an untouched weight of a float32 model: exit 1 naming the weight, no report; the advice to load
    in float32 (right for model.dtype float16) was wrong here."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][1, 1] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path / "r.yaml", src, ws / "bench.jsonl")
    assert main(["verify", str(recipe), "--report", str(tmp_path / "rep.json"), "--no-progress", "--no-cache"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "model.layers.0.mlp.up_proj.weight holds inf/NaN" in err and "load the model in float32" not in err
    assert not (tmp_path / "rep.json").exists()


# ------------------------------------------------------------ .part debris of killed search / scan writes


def test_search_and_scan_remove_part_debris_of_killed_writes(ws, tmp_path):
    """A search or scan killed while writing its recipe / sweep / scan JSON left a .part temporary that nothing
    removed; the next run in that folder removes those of dead writers (a live writer's stays)."""
    import os

    for name in ("s", "sc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".f.yaml.999999999-abc.part").write_text("half")
        (tmp_path / name / ".f.yaml.1t2-abc.part").write_text("half, pid reused")
        (tmp_path / name / f".f.yaml.{os.getpid()}-live.part").write_text("being written")
    assert main(["scan", str(ws / "llama"), "--out", str(tmp_path / "sc" / "scan.json"), "--layers", "2",
                 "--matrices", "fc_in", "--no-progress"]) == 0
    assert main(["search", "--model", str(ws / "llama"), "--benchmark", "jsonl", "--benchmark-path", str(ws / "bench.jsonl"),
                 "--out", str(tmp_path / "s" / "f.yaml"), "--layers", "2", "--matrices", "fc_in", "--rhos", "0.5",
                 "--compose", "1", "--skip-test", "--no-progress"]) == 0
    for name in ("s", "sc"):
        assert sorted(p.name for p in (tmp_path / name).glob(".*.part")) == [f".f.yaml.{os.getpid()}-live.part"]


def test_export_dtype_overflow_fails_before_the_verify(ws, tmp_path, capsys):
    """run with export.dtype float16 and a weight beyond its range: exit 2 naming the tensor right after loading
    (before: the whole verify ran and wrote its report, then the export was refused)."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path / "r.yaml", src, ws / "bench.jsonl", export={"dtype": "float16"})
    report = tmp_path / "rep.json"
    assert main([str(recipe), "--out", str(tmp_path / "o"), "--report", str(report), "--no-progress", "--no-cache"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "export.dtype: float16: model.layers.1.mlp.up_proj.weight (1 of 2048 values beyond the float16 range)" in err
    assert not report.exists() and not (tmp_path / "o").exists()


@pytest.mark.slow  # a verify, then `apply` in a fresh process (~5 s); CI runs the slow tests too
def test_apply_report_of_other_examples_is_refused_and_missing_data_is_said(ws, tmp_path, capsys):
    """Same benchmark name, split and seed over another data file: the report scored other examples (before:
    accepted, the card showed numbers of other data). Where the data is not on the apply machine, one line says
    the examples were not compared and the export goes on."""
    import shutil

    recipe = _recipe(tmp_path / "r.yaml", ws / "llama", ws / "bench.jsonl")
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    lines = (ws / "bench.jsonl").read_text().splitlines()
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("\n".join(lines[:-1] + [json.dumps({"prompt": "w4 w5", "answer": "w6"})]) + "\n")
    other = _recipe(tmp_path / "r2.yaml", ws / "llama", other_data)
    res = _cli("apply", other, "--out", tmp_path / "o", "--report", report)
    assert res.returncode == 2 and "scored other examples" in " ".join(res.stderr.split()), res.stderr
    assert not (tmp_path / "o").exists()
    moved = tmp_path / "gone.jsonl"
    shutil.copy(ws / "bench.jsonl", moved)
    away = _recipe(tmp_path / "r3.yaml", ws / "llama", moved)
    assert main(["verify", str(away), "--report", str(tmp_path / "rep3.json"), "--no-progress", "--no-cache"]) == 0
    moved.unlink()
    capsys.readouterr()
    assert main(["apply", str(away), "--out", str(tmp_path / "o3"), "--report", str(tmp_path / "rep3.json"),
                 "--no-progress"]) == 0
    assert "the examples it scored were not compared with this recipe's data" in " ".join(capsys.readouterr().err.split())


def test_model_dtype_float16_overflow_is_named_before_scoring(ws, tmp_path, capsys, monkeypatch):
    """issue 21: `model.dtype: float16` of a checkpoint with a weight beyond the float16 range verified with NaN
    log-probs (then: exit 1 after the baseline pass). Now: exit 2 naming model.dtype and the weight, before any
    scoring, no report."""
    import laser_export.verify as verify

    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][1, 1] = 1e6
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path / "r.yaml", src, ws / "bench.jsonl")
    data = yaml.safe_load(recipe.read_text())
    data["model"]["dtype"] = "float16"
    recipe.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(verify.Measurement, "baseline", lambda self: pytest.fail("scored before the check"))
    assert main(["verify", str(recipe), "--report", str(tmp_path / "rep.json"), "--no-progress", "--no-cache"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.dtype: float16: model.layers.0.mlp.up_proj.weight holds 1 values beyond the float16 range" in err
    assert not (tmp_path / "rep.json").exists()
