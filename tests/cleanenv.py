"""A Python environment that has torch and transformers but cannot import laser_export.

``python -m venv --without-pip`` from the base interpreter, plus one ``.pth`` file that puts the current
environment's site-packages directories on ``sys.path``. A plain path in a ``.pth`` file is appended as is:
the ``.pth`` files *inside* those directories (the editable install of laser-export is one) are not run, so
the package is absent, exactly as on a machine where it was never installed. :func:`clean_python` checks that.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path


def make_venv(where: Path, *, with_pip: bool = False) -> Path:
    """A bare venv from the base interpreter (nothing installed); returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    flags = [] if with_pip else ["--without-pip"]
    subprocess.run([base, "-m", "venv", *flags, str(where)], check=True, timeout=180)
    return where / "bin" / "python"


def reuse_site_packages(python: Path) -> None:
    """Let ``python`` import what the current environment has installed, except editable installs."""
    purelib = subprocess.run([str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_reuse_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def make_clean_venv(where: Path) -> Path:
    """Create the venv under ``where``; return its python. Fails if laser_export is importable there."""
    python = make_venv(where)
    reuse_site_packages(python)
    check = run_clean(python, "import importlib.util, torch, transformers\n"
                      "assert importlib.util.find_spec('laser_export') is None, 'laser_export is importable'\n"
                      "print('CLEAN')", cwd=where)
    assert check.returncode == 0 and "CLEAN" in check.stdout, check.stderr[-2000:]
    return python


def run_clean(python: Path, code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` with ``python`` in ``cwd``: no PYTHONPATH, a private HF cache for remote-code modules."""
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=clean_env(cwd), capture_output=True, text=True,
                          timeout=timeout)


def clean_env(cwd: Path) -> dict[str, str]:
    """os.environ without PYTHON* (no PYTHONPATH to the source tree) and with a private HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(Path(cwd) / "hf_home"), HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    return env
