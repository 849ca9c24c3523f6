"""Every recipe in recipes/ passes `laser-export check` offline (model hints), has a scorer for its
benchmark, and every paper recipe is verified by the GPU job of .github/workflows/claims.yml."""

import os
from pathlib import Path

import pytest
import yaml

from laser_export.benchmarks import BENCHMARKS
from laser_export.cli import main
from laser_export.selection import scorer_for
from laser_export.pipeline import plan
from laser_export.recipe import load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PAPER = [p for p in RECIPES if p.name.startswith(("gptj-", "llama2-7b-", "roberta-"))]


def _param(path):  # a recipe on a real local model file (GGUF) reads it: slow
    slow = "source: package:" in path.read_text() or ".gguf\n" in path.read_text()
    return pytest.param(path, id=path.name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("path", [_param(p) for p in RECIPES])
def test_recipe_checks_and_has_a_scorer(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, text = load_recipe(path)
    if recipe.model.source.startswith("package:"):
        import importlib.util

        package = recipe.model.source.removeprefix("package:").split("/")[0]
        try:
            found = importlib.util.find_spec(package)
        except ImportError:  # a namespace-less parent package is missing
            found = None
        if found is None:
            pytest.skip(f"{package} is not installed")
    gguf = Path(recipe.model.source).expanduser()
    if recipe.model.source.endswith(".gguf") and not recipe.model.source.startswith("package:") and not gguf.is_file():
        if os.environ.get("LASER_EXPORT_REQUIRE_DATA") == "1":  # .ci/run installs it: missing is a failure there
            pytest.fail(f"{gguf} is required (LASER_EXPORT_REQUIRE_DATA=1) but missing")
        pytest.skip(f"{gguf} is not there (its recipe's header says how to install it)")
    p = plan(recipe, text, weights_free=True)
    scorer = scorer_for(p.family, BENCHMARKS[recipe.benchmark.name])
    assert scorer in p.family.scorers
    assert recipe.benchmark.metric in BENCHMARKS[recipe.benchmark.name].metrics
    assert main(["check", str(path)]) == 0


def test_the_paper_table_has_a_recipe_per_cell_and_ci_verifies_them_all():
    assert len(PAPER) == 24  # 3 models x 8 datasets of the paper's Table 1
    claims = yaml.safe_load((ROOT / ".github/workflows/claims.yml").read_text())
    listed = set(claims["jobs"]["gpu"]["strategy"]["matrix"]["recipe"])
    assert {f"recipes/{p.name}" for p in PAPER} <= listed
    for p in PAPER:
        r = yaml.safe_load(p.read_text())
        assert 0 < r["claims"]["tolerance"] <= 0.02 and r["benchmark"]["seed"] is None
