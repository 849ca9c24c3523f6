"""``laser-export scan``: the spectrum of every matrix read from the checkpoint (safetensors shard by shard,
GGUF tensor by tensor) without loading the model, equal to an in-memory SVD; the heatmap; --from-scan."""

from __future__ import annotations

import json

import pytest
import torch

from laser_export.architectures import family_for, module_name
from laser_export.cli import main
from laser_export.lowrank import as_matrix, auto_rank, mp_edge
from laser_export.scan import ScanOptions, load_scan, scan
from tinymodels import save_tiny


def _reference(model, family, layer, alias):
    w = as_matrix(model.get_submodule(module_name(model, family, layer, alias))).detach().double()
    return torch.linalg.svdvals(w), tuple(w.shape)


def _close(a, b, rel=1e-6):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: Conv1D weights stored transposed
def test_scan_equals_in_memory_svd(tmp_path, model_type):
    model = save_tiny(model_type, tmp_path / "m")
    fam = family_for(model.config.model_type)
    out = tmp_path / "scan.json"
    result = scan(ScanOptions(source=str(tmp_path / "m"), out=str(out), matrices="fc_in,fc_out,o", progress=False))
    assert json.loads(out.read_text()) == {k: v for k, v in result.items() if k != "plot"}
    assert len(result["matrices"]) == 3 * 3
    for row in result["matrices"]:
        S, shape = _reference(model, fam, row["layer"], row["matrix"])
        assert row["shape"] == list(shape)
        for got, want in zip(row["top_singular_values"], S.tolist()):
            assert _close(got, want)
        noise, edge = mp_edge(S, shape)
        assert _close(row["mp_edge"], edge) and _close(row["noise_std"], noise)
        assert row["auto_rank"] == auto_rank(S, shape).rank
        k = max(1, int(0.25 * min(shape)))
        assert _close(row["energy_kept"]["0.25"], float(S[:k].pow(2).sum() / S.pow(2).sum()))
    png = tmp_path / "scan.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_scan_gguf_tensor_by_tensor(tmp_path):
    from laser_export.export.gguf import write_gguf

    model = save_tiny("llama", tmp_path / "m")
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(model, gguf_path, arch="llama", dtype="float32")
    result = scan(ScanOptions(source=str(gguf_path), out=str(tmp_path / "s.json"), layers="1", matrices="fc_in,q",
                              progress=False, plot=False))
    fam = family_for("llama")
    for row in result["matrices"]:
        S, shape = _reference(model, fam, row["layer"], row["matrix"])
        assert row["shape"] == list(shape)
        assert all(_close(g, w) for g, w in zip(row["top_singular_values"], S.tolist()))


def test_scan_cli_and_errors(tmp_path, capsys):
    save_tiny("llama", tmp_path / "m")
    out = tmp_path / "s.json"
    assert main(["scan", str(tmp_path / "m"), "--layers", "2", "--matrices", "mlp", "--out", str(out), "--no-progress"]) == 0
    data = load_scan(out)
    assert [r["matrix"] for r in data["matrices"]] == ["fc_in", "fc_up", "fc_out"]
    assert main(["scan", str(tmp_path / "m"), "--layers", "7", "--out", str(out), "--no-progress"]) == 2
    assert "--layers" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(Exception, match="not a laser-export scan"):
        load_scan(bad)
