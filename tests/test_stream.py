"""Streaming reduction (laser_export.stream): identical to the in-memory export, tensor for tensor."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from laser_export.cli import main
from laser_export.runner import ApplyOptions, apply
from laser_export.stream import list_tensors
from tinymodels import checkpoint_tensors, tiny_inputs, tiny_model, tiny_tokenizer


def _source(folder: Path, model_type: str, dtype=torch.float32, shard="20KB"):
    model = tiny_model(model_type).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _recipe(path: Path, source: Path, storage: str, ivs, **model):
    path.write_text(yaml.safe_dump({
        "name": "tiny-stream", "model": {"source": str(source), **model}, "interventions": ivs,
        "storage": storage, "export": {"max_shard_size": "30KB"},
    }))
    return path




CASES = [
    ("llama", "dense", torch.float32, {}),
    ("llama", "factorised", torch.float16, {}),  # dtype auto: stays float16
    ("llama", "factorised", torch.float16, {"dtype": "float32"}),  # recipe asks for another dtype
    ("gpt2", "factorised", torch.float32, {}),  # Conv1D (transposed) weights
    ("gpt2", "dense", torch.float32, {}),
]


@pytest.mark.parametrize("model_type, storage, dtype, model_kw", CASES)
def test_streamed_export_equals_in_memory_export(tmp_path, model_type, storage, dtype, model_kw):
    src = _source(tmp_path / "src", model_type, dtype)
    assert len(list(src.glob("*.safetensors"))) > 1  # a sharded source
    ivs = [{"layer": 1, "matrix": "fc_in", "rho": 0.25}, {"layer": 2, "matrix": "fc_out", "rank": 3},
           {"layer": 0, "matrix": "fc_in", "rho": 1.0}]  # full rank: kept bit-exact
    recipe = _recipe(tmp_path / "r.yaml", src, storage, ivs, **model_kw)
    mem = apply(ApplyOptions(recipe, out=tmp_path / "mem", in_memory=True, progress=False)).manifest
    st = apply(ApplyOptions(recipe, out=tmp_path / "st", progress=False)).manifest
    assert mem["streamed"] is False and st["streamed"] is True
    a, b = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "st")
    assert set(a) == set(b)
    want = {"float32": torch.float32}.get(model_kw.get("dtype"), dtype)  # default: the checkpoint's own dtype
    assert {t.dtype for t in b.values() if t.is_floating_point()} == {want}
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert mem["matrices"] == st["matrices"] and mem["model"]["dtype"] == st["model"]["dtype"]
    assert mem["checkpoint"]["tensor_bytes"] == st["checkpoint"]["tensor_bytes"]
    assert len(st["checkpoint"]["files"]) > 1 and (tmp_path / "st" / "model.safetensors.index.json").is_file()
    ca = json.loads((tmp_path / "mem" / "config.json").read_text())
    cb = json.loads((tmp_path / "st" / "config.json").read_text())
    assert ca.get("quantization_config") == cb.get("quantization_config")
    assert ca.get("dtype") == cb.get("dtype")
    assert ca.get("auto_map") == cb.get("auto_map")  # factorised: the remote code is shipped by both paths
    # the same files besides the shards (whose split may differ; their tensors are compared above)
    files = lambda d: {f.relative_to(d).as_posix() for f in d.rglob("*")  # noqa: E731
                       if f.is_file() and not re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f.name)}
    assert files(tmp_path / "mem") == files(tmp_path / "st")
    if storage == "factorised":
        assert set(cb["quantization_config"]["ranks"]) == {e["name"] for e in st["matrices"] if e["storage"] == "factorised"}
    # both load back (factorised through laser_export's quantizer) with the same logits
    x = tiny_inputs()
    la = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()(x).logits
    lb = AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()(x).logits
    assert torch.equal(la, lb)
    for name in ("tokenizer.json", "recipe.yaml", "manifest.json", "README.md"):
        assert (tmp_path / "st" / name).is_file()


def test_stream_reads_headers_only_and_cli_apply(tmp_path, capsys):
    src = _source(tmp_path / "src", "llama")
    listed = list_tensors(src)
    assert {t.key for t in listed} == set(checkpoint_tensors(src)) and len({t.file for t in listed}) > 1
    recipe = _recipe(tmp_path / "r.yaml", src, "factorised", [{"layer": 2, "matrix": "fc_in", "rho": 0.1}])
    assert main(["apply", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "streamed" in capsys.readouterr().err
    # an existing folder is refused without --overwrite, nothing changed
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert main(["apply", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    # a report of another recipe is refused
    (tmp_path / "rep.json").write_text(json.dumps({"recipe": "other", "passed": True}))
    assert main(["apply", str(recipe), "--out", str(tmp_path / "o2"), "--report", str(tmp_path / "rep.json")]) == 2
    assert "other" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    # run --stream needs --skip-verify semantics: no claims here, so it streams
    assert main([str(recipe), "--stream", "--out", str(tmp_path / "o3"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o3" / "manifest.json").read_text())["streamed"] is True


def test_rank_too_large_fails_before_writing(tmp_path, capsys):
    src = _source(tmp_path / "src", "llama")
    recipe = _recipe(tmp_path / "r.yaml", src, "dense", [{"layer": 1, "matrix": "fc_in", "rank": 999}])
    assert main(["apply", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "interventions[0].rank" in capsys.readouterr().err and not (tmp_path / "o").exists()
