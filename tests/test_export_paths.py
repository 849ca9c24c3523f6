"""Every export path through the one writer (laser_export.export.writer): the streamed and in-memory exports of a
recipe are the same folder (manifest, card, tensors); every export is read back before it is declared done; the
streamed source is what transformers loads; a carried report must be of this model and these interventions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from laser_export.cli import main
from laser_export.export.readback import read_back
from laser_export.export.checkpoint import ExportError
from tinymodels import checkpoint_tensors, save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]




@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-paths")
    save_tiny("llama", root / "llama")
    (root / "bench.jsonl").write_text("\n".join(
        json.dumps({"prompt": f"{WORDS[i % 90]} {WORDS[(3 * i + 1) % 90]}", "answer": WORDS[(i * 11) % 90]})
        for i in range(24)) + "\n")
    return root


def _recipe(path: Path, source: Path, **top) -> Path:
    data = {"name": "paths", "model": {"source": str(source)}, "storage": "factorised",
            "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.25}, {"layer": 2, "matrix": "fc_out", "rank": 3}],
            "export": {"max_shard_size": "30KB"}, **top}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("storage", ["factorised", "dense"])
def test_streamed_and_in_memory_exports_are_the_same_folder(ws, tmp_path, storage):
    """issue 20: same manifest (``streamed`` aside), same card, same tensors, same files."""
    recipe = _recipe(tmp_path / "r.yaml", ws / "llama", storage=storage)
    argv = lambda where, *more: ["apply", str(recipe), "--out", str(tmp_path / where / "out"), "--no-progress", *more]  # noqa: E731
    assert main(argv("st")) == 0
    assert main(argv("mem", "--in-memory")) == 0
    st, mem = tmp_path / "st" / "out", tmp_path / "mem" / "out"
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (st, mem))
    assert (a.pop("streamed"), b.pop("streamed")) == (True, False)
    assert a == b and a["export_dtype"] == "float32" and a["model"]["source"] == "llama"
    assert (st / "README.md").read_text() == (mem / "README.md").read_text()
    assert 'from_pretrained("out"' in (st / "README.md").read_text() and str(ws) not in (st / "README.md").read_text()
    ta, tb = checkpoint_tensors(st), checkpoint_tensors(mem)
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(st) == files(mem)
    index = [json.loads((d / "model.safetensors.index.json").read_text()) for d in (st, mem)]
    assert index[0] == index[1]  # the same shard split and index as save_pretrained (huggingface_hub's split)


def test_export_dtype_overflow_is_refused_naming_the_tensor(ws, tmp_path, capsys):
    """issue 21: ``export.dtype: float16`` wrote inf for a weight beyond the float16 range, exit 0."""
    src = tmp_path / "big"
    shutil.copytree(ws / "llama", src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = 1e6
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path / "r.yaml", src, export={"dtype": "float16"})
    assert main(["apply", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "export.dtype: float16" in err and "model.layers.0.self_attn.q_proj.weight" in err
    assert not (tmp_path / "o").exists()


def test_read_back_names_a_non_finite_or_misplaced_tensor(tmp_path):
    save_file({"a": torch.ones(2, 2), "b": torch.tensor([1.0, float("inf")])}, tmp_path / "model.safetensors")
    with pytest.raises(ExportError, match="tensor b .*1 non-finite"):
        read_back(tmp_path)
    save_file({"a": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    assert read_back(tmp_path, {"a": [2, 2]}).tensor_bytes == 16
    with pytest.raises(ExportError, match="unexpected tensor a"):
        read_back(tmp_path, {"c": [2, 2]})
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-4])  # truncated
    with pytest.raises(ExportError, match="offsets|data bytes"):
        read_back(tmp_path)


def test_stream_ignores_safetensors_transformers_does_not_load(ws, tmp_path, capsys):
    """issue 21: a model-backup.safetensors beside model.safetensors was streamed too: unreadable export, exit 0."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    shutil.copy(src / "model.safetensors", src / "model-backup.safetensors")
    recipe = _recipe(tmp_path / "r.yaml", src)
    assert main(["apply", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "ignored model-backup.safetensors" in capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # readable
    assert read_back(tmp_path / "o").files


def test_stale_index_next_to_model_safetensors_streams_what_transformers_loads(ws, tmp_path):
    """issue 21: model.safetensors + a stale sharded index: streaming took the index, verify the single file."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    state = load_file(src / "model.safetensors")
    stale = {k: torch.zeros_like(v) for k, v in state.items()}
    save_file(stale, src / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in stale}}))
    recipe = _recipe(tmp_path / "r.yaml", src)
    assert main(["apply", str(recipe), "--out", str(tmp_path / "st"), "--no-progress"]) == 0
    assert main(["apply", str(recipe), "--out", str(tmp_path / "mem"), "--in-memory", "--no-progress"]) == 0
    ta, tb = checkpoint_tensors(tmp_path / "st"), checkpoint_tensors(tmp_path / "mem")
    assert all(torch.equal(ta[k], tb[k]) for k in tb)
    assert torch.equal(ta["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def _verified(ws: Path, tmp_path: Path, source: Path) -> tuple[Path, Path]:
    claims = {"baseline": {"accuracy": 0.0}, "reduced": {"accuracy": 0.0}, "tolerance": 1.0}
    bench = {"name": "jsonl", "path": str(ws / "bench.jsonl"), "split": "test", "seed": 0, "validation_fraction": 0.25}
    recipe = _recipe(tmp_path / "r.yaml", source, claims=claims, benchmark=bench)
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 0
    return recipe, report


def test_apply_report_must_be_of_this_model_and_these_interventions(ws, tmp_path, capsys):
    """issue 21: only the recipe name was compared; another model's or intervention's report was accepted."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    recipe, report = _verified(ws, tmp_path, src)
    out = lambda n: ["--out", str(tmp_path / n), "--no-progress", "--report", str(report)]  # noqa: E731
    assert main(["apply", str(recipe), *out("ok")]) == 0
    assert json.loads((tmp_path / "ok" / "verify_report.json").read_text())["passed"]
    # same name, other interventions
    data = yaml.safe_load(recipe.read_text())
    data["interventions"][0]["rho"] = 0.5
    other = tmp_path / "r2.yaml"
    other.write_text(yaml.safe_dump(data))
    assert main(["apply", str(other), *out("iv")]) == 2
    assert "other interventions" in capsys.readouterr().err and not (tmp_path / "iv").exists()
    # same recipe, the model's weights changed since the report
    state = load_file(src / "model.safetensors")
    state["model.embed_tokens.weight"] += 1
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["apply", str(recipe), *out("w")]) == 2
    assert "measured another model" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_report_inside_the_replaced_export_is_refused_before_loading(ws, tmp_path, capsys):
    """issue 21: ``--overwrite --report out/extra.json`` reported a file that went away with the old export."""
    claims = {"baseline": {"accuracy": 0.0}, "reduced": {"accuracy": 0.0}, "tolerance": 1.0}
    bench = {"name": "jsonl", "path": str(ws / "bench.jsonl"), "split": "test", "seed": 0, "validation_fraction": 0.25}
    recipe = _recipe(tmp_path / "r.yaml", ws / "llama", claims=claims, benchmark=bench)
    argv = [str(recipe), "--out", str(tmp_path / "out"), "--overwrite", "--report", str(tmp_path / "out" / "x.json")]
    code = subprocess.run([sys.executable, "-m", "laser_export", *argv, "--no-progress"], capture_output=True,
                          text=True, timeout=300)
    assert code.returncode == 2, code.stderr
    assert "is inside --out" in code.stderr and not (tmp_path / "out").exists()


def test_nan_scores_are_an_error_never_a_report(ws, tmp_path, capsys):
    """issue 21: NaN log-probs passed top-1 claims and wrote a report with bare NaN (invalid JSON)."""
    src = tmp_path / "m"
    shutil.copytree(ws / "llama", src)
    state = load_file(src / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")  # not a target: the non-finite check of targets does not see it
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    claims = {"baseline": {"accuracy": 0.0}, "reduced": {"accuracy": 0.0}, "tolerance": 1.0}
    bench = {"name": "jsonl", "path": str(ws / "bench.jsonl"), "split": "test", "seed": 0, "validation_fraction": 0.25}
    recipe = _recipe(tmp_path / "r.yaml", src, claims=claims, benchmark=bench)
    report = tmp_path / "rep.json"
    assert main(["verify", str(recipe), "--report", str(report), "--no-progress", "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert "baseline pass" in err and "model.norm.weight" in err and not report.exists()
    assert re.search(r"not finite", err)
