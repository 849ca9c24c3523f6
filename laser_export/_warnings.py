"""Third-party warnings that are harmless for laser-export users, each reduced to one line (or none).

Used by the CLI only; the library never changes global warning filters.
"""

from __future__ import annotations

import logging
import warnings

#: (message regex, category) of warnings that say nothing actionable about a laser-export run
HARMLESS = [
    (r".*torchvision is not installed.*", Warning),
    (r".*dynamic=True.*", Warning),
    (r".*TReal.*", Warning),
    (r".*LeafSpec.*", Warning),
    (r".*copying from a non-meta parameter in the checkpoint to a meta parameter.*", Warning),
    (r".*`torch_dtype` is deprecated.*", Warning),
]


def quiet_third_party() -> None:
    """Ignore the known-harmless warnings; show every other warning once, on one line."""
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
