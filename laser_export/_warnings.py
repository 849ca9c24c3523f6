"""Third-party warnings that are harmless for laser-export users, each reduced to one line (or none).

Used by the CLI only; the library never changes global warning filters.
"""

from __future__ import annotations

import logging
import re
import warnings

#: (message regex, category) of warnings that say nothing actionable about a laser-export run
HARMLESS = [
    (r".*torchvision is not installed.*", Warning),
    (r".*dynamic=True.*", Warning),
    (r".*TReal.*", Warning),
    (r".*LeafSpec.*", Warning),
    (r".*copying from a non-meta parameter in the checkpoint to a meta parameter.*", Warning),
    (r".*`torch_dtype` is deprecated.*", Warning),
    (r".*`past_key_values` is deprecated.*", FutureWarning),  # transformers 5 on the ONNX parity check's call
]


#: loggers whose records matching :data:`HARMLESS_LOGS` are dropped (logger-level filters: they work
#: before the library is imported and survive torch's own logging setup)
NOISY_LOGGERS = (
    "torch.onnx._internal.exporter._registration",
    "transformers.exporters.exporter_dynamo",
    "transformers.utils.generic",
)
HARMLESS_LOGS = re.compile(
    r"torchvision is not installed|Failed to infer the signature|`dynamic=True` with no explicit"
    r"|`past_key_values`/`cache_params` are deprecated"
)


def _file_named_loggers() -> list[str]:
    """transformers' ONNX exporter names its logger by file path (``get_logger(__file__)``). Found on
    sys.path without importing transformers (and without asking the import system, whose hooks
    laser_export uses to register its loader)."""
    import os
    import sys

    found = []
    for entry in sys.path:
        path = os.path.join(entry or ".", "transformers", "exporters", "exporter_dynamo.py")
        if os.path.isfile(path):
            found.append(path)
    return found


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not HARMLESS_LOGS.search(record.getMessage())
        except Exception:  # noqa: BLE001
            return True


def quiet_third_party() -> None:
    """Ignore the known-harmless warnings and log lines; show every other warning once, on one line."""
    for name in (*NOISY_LOGGERS, *_file_named_loggers()):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())
    for pattern, category in HARMLESS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    warnings.simplefilter("once")
    for pattern, category in HARMLESS:  # simplefilter inserts at the front: re-add the ignores first
        warnings.filterwarnings("ignore", message=pattern, category=category)
    warnings.formatwarning = _one_line
    logging.captureWarnings(False)


def _one_line(message, category, filename, lineno, line=None) -> str:
    text = " ".join(str(message).split())
    if len(text) > 200:
        text = text[:200] + " ..."
    return f"warning ({category.__name__}): {text}\n"
