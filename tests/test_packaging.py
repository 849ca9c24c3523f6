"""The sdist and wheel build, install into a fresh environment and run (`pip install laser-export` works)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cleanenv import clean_env, make_venv, reuse_site_packages, run_clean

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdist_and_wheel_install_into_a_fresh_venv_and_run(tmp_path):
    pytest.importorskip("build", reason="the packaging check needs `pip install build` (in the test extra)")
    dist, src = tmp_path / "dist", tmp_path / "src"  # build from a copy: no build/ or egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "reports", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    # sdist first, then the wheel built *from the sdist*: a file missing from the sdist fails here
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    wheel = next(dist.glob("laser_export-*.whl"))
    assert next(dist.glob("laser_export-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "laser_export/remote/modeling_laser.py" in names  # shipped into factorised exports
    assert any(n.startswith("laser_export/schemas/") and n.endswith(".json") for n in names)

    # a fresh venv: install the wheel with its own pip first (it must not see this environment's editable
    # install), then let it reuse this environment's dependencies (torch etc.: offline)
    python = make_venv(tmp_path / "venv", with_pip=True)
    res = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=clean_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    reuse_site_packages(python)
    cli = python.parent / "laser-export"
    res = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=clean_env(tmp_path))
    assert res.returncode == 0 and "usage: laser-export" in res.stdout and "check RECIPE" in res.stdout, res.stderr[-2000:]
    res = run_clean(python, "import laser_export, sys; print(laser_export.__file__, laser_export.__version__)",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(tmp_path / "venv") in res.stdout  # the installed copy, not the source tree
