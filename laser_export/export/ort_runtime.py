"""Which onnxruntime distribution is installed: ``onnxruntime`` (the ``cpu`` extra) or ``onnxruntime-gpu`` (the
``gpu`` extra). Both ship the same ``onnxruntime`` package; installed together, one overwrites the other's files and
the CUDA provider silently disappears (microsoft/onnxruntime#26996). Reading distribution metadata only (no import)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed() -> list[str]:
    """The onnxruntime distributions installed in this environment."""
    found = []
    for dist in DISTRIBUTIONS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def missing() -> str | None:
    """A sentence when no onnxruntime is installed (the ONNX export cannot check parity), else None."""
    if installed():
        return None
    return ("onnxruntime is not installed: pip install 'laser-export[cpu]' (or 'laser-export[gpu]' for "
            "onnxruntime-gpu; not both)")


def conflict() -> str | None:
    """A sentence when both distributions are installed, else None."""
    if len(installed()) < 2:
        return None
    return ("onnxruntime and onnxruntime-gpu are both installed: they ship the same package and the CUDA provider "
            "silently disappears (microsoft/onnxruntime#26996); pip uninstall -y onnxruntime onnxruntime-gpu, then "
            "pip install 'laser-export[gpu]' (or '[cpu]')")
