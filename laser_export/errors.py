"""The error taxonomy: every error laser-export raises on purpose says its exit code by its class.

* :class:`InputError` — bad input (recipe, model source, data, output path, options, environment):
  exit **2**, one line naming the field or the file. Raised before any weights load wherever possible.
* :class:`CheckFailed` — a check that ran and failed (a claim, ONNX/GGUF parity, an export read-back,
  a push): exit **1**.

Anything else that escapes a command is an unexpected error (exit 1, ``rerun with --debug``). The CLI
maps by class (:func:`exit_code_for`), never by module or class name, so an error is classified the
same way whatever was imported before it. This module imports nothing heavy.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class LaserExportError(Exception):
    """Base of every error laser-export raises on purpose. ``label`` starts the CLI's error line."""

    exit_code = EXIT_FAILED
    label = "error:"


class InputError(LaserExportError, ValueError):
    """Bad input: exit 2. (Also a ``ValueError``, as the classes it replaces were.)"""

    exit_code = EXIT_BAD_INPUT
    label = "error:"


class CheckFailed(LaserExportError, RuntimeError):
    """A check that ran and failed (claims, parity, read-back, push): exit 1."""

    exit_code = EXIT_FAILED
    label = "failed:"


def exit_code_for(err: BaseException) -> int | None:
    """The exit code an error stands for, or None for an unexpected error."""
    if isinstance(err, LaserExportError):
        return err.exit_code
    return None
