"""The ``cpu`` / ``gpu`` extras: onnxruntime-gpu is installed *instead of* onnxruntime, never next to it
(the two ship the same package and the CUDA provider disappears, microsoft/onnxruntime#26996)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from laser_export.export import ort_runtime

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names reached from ``requirements`` through the installed packages' own metadata
    (markers evaluated here, no extras of dependencies)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return seen


def test_onnxruntime_is_an_extra_not_a_core_dependency():
    project = _project()
    extras = project["optional-dependencies"]
    assert [Requirement(r).name for r in extras["cpu"]] == ["onnxruntime"]
    assert [Requirement(r).name for r in extras["gpu"]] == ["onnxruntime-gpu"]
    reached = _closure(project["dependencies"])
    assert "torch" in reached and "transformers" in reached  # the walk does follow the installed metadata
    assert not reached & {"onnxruntime", "onnxruntime-gpu"}, "a core dependency pulls an onnxruntime in"


def test_ci_installs_the_cpu_runtime():
    (extras,) = re.findall(r"-e '\.\[([^\]]*)\]'", (ROOT / ".ci" / "run").read_text())
    assert "cpu" in extras.split(",") and "gpu" not in extras.split(",")


def test_runtime_check_names_the_conflict_and_the_missing_runtime(monkeypatch):
    monkeypatch.setattr(ort_runtime, "installed", lambda: ["onnxruntime", "onnxruntime-gpu"])
    assert "microsoft/onnxruntime#26996" in ort_runtime.conflict() and ort_runtime.missing() is None
    monkeypatch.setattr(ort_runtime, "installed", lambda: [])
    assert "laser-export[cpu]" in ort_runtime.missing() and ort_runtime.conflict() is None
    monkeypatch.setattr(ort_runtime, "installed", lambda: ["onnxruntime-gpu"])
    assert ort_runtime.missing() is None and ort_runtime.conflict() is None


def test_an_onnx_recipe_without_onnxruntime_fails_check(tmp_path, capsys, monkeypatch):
    import yaml

    from laser_export.cli import main
    from tinymodels import save_tiny

    monkeypatch.setattr(ort_runtime, "installed", lambda: [])
    save_tiny("llama", tmp_path / "m")
    recipe = {"name": "o", "model": {"source": str(tmp_path / "m")},
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.1}], "export": {"formats": ["onnx"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "r.yaml")]) == 2
    assert "export.formats: onnx: onnxruntime is not installed: pip install 'laser-export[cpu]'" in capsys.readouterr().err


@pytest.mark.slow
def test_pip_resolves_the_gpu_extra_to_onnxruntime_gpu_alone(tmp_path):
    """``pip install --dry-run --report`` of ``.[gpu]`` (needs the package index for onnxruntime-gpu's metadata)."""
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                          "--report", str(report), f"{ROOT}[gpu]"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and re.search(r"No matching distribution|connection|resolve|Network", res.stderr, re.I):
        pytest.skip(f"the package index is not reachable: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-2000:]
    items = {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}
    ours = items["laser-export"]
    assert ours["requested_extras"] == ["gpu"]
    runtimes = [r for r in ours["metadata"]["requires_dist"] if Requirement(r).name.startswith("onnxruntime")]
    assert all(Requirement(r).marker is not None for r in runtimes)  # each only under its extra
    assert "onnxruntime" not in items  # never pulled next to the GPU build
    if "onnxruntime-gpu" not in [d.lower() for d in ort_runtime.installed()]:
        assert "onnxruntime-gpu" in items
