"""laser-export: LASER (layer-selective rank reduction) as a model-hub workflow.

Importing the package registers the ``laser`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads factorised exports (see :mod:`laser_export.hf`).
"""

__version__ = "0.1.0"

from . import hf as _hf  # noqa: E402,F401  (registers the 'laser' quantizer)
from .lowrank import LowRankLinear  # noqa: E402,F401
