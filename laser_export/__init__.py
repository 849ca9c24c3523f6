"""laser-export: LASER (layer-selective rank reduction) as a model-hub workflow.

Importing the package registers the ``laser`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads factorised exports (see :mod:`laser_export.hf`).

The registration needs transformers (and torch), which take seconds to import. So it happens at once
when transformers is already imported, and otherwise right after transformers is imported later
(an import hook that removes itself). ``import laser_export.cli`` (the ``laser-export`` command)
therefore imports neither, and ``laser-export --help`` is instant.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from . import hf  # noqa: F401  (registers the 'laser' quantizer)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` once ``transformers`` has finished importing; then leaves sys.meta_path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None) if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        loader.exec_module = exec_module
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTransformers)]


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())


def __getattr__(name: str):
    if name == "LowRankLinear":
        from .lowrank import LowRankLinear

        return LowRankLinear
    raise AttributeError(f"module 'laser_export' has no attribute {name!r}")
