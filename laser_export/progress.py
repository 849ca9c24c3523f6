"""Every progress bar and spinner laser-export draws, built in one place.

* :data:`console` — the one rich console (stderr), so progress never mixes with a command's output;
* :func:`bar` — a counting bar: ``bar("search", unit="candidates")`` → ``search ━━━━ 3/12 candidates
  0:00:04 ETA 0:00:09 L27.fc_in.rho0.01``; add the task with ``total=`` and advance it;
* :func:`status` — a spinner while one step runs.

``enabled=False`` (the ``progress`` option of every library call; ``--no-progress`` on the command
line) draws nothing; this module is the only place that switch is read. ``--no-progress`` also
silences the bars of transformers and huggingface_hub (:func:`quiet_third_party_bars`).
"""

from __future__ import annotations

from contextlib import nullcontext

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def bar(label: str, *, enabled: bool = True, unit: str = "", eta: bool = True, elapsed: bool = True,
        transient: bool = False, description: bool = True):
    """A rich ``Progress`` counting done/total ``unit`` (e.g. ``"examples"``), drawn on :data:`console`.

    ``label``: a fixed bold prefix (``""``: none: the task's description leads instead, as the scorers'
    bars do). ``description``: show the task's description (updated per step) after the counts;
    ``transient``: the bar disappears when done. Nothing is drawn with ``enabled=False``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}[/]") if label else TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    if elapsed:
        columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    if label and description:
        columns.append(TextColumn("{task.description}"))
    return Progress(*columns, console=console, disable=not enabled, transient=transient)


def status(text: str, enabled: bool = True):
    """A spinner while a step runs; nothing with ``enabled=False`` (--no-progress)."""
    return console.status(text) if enabled else nullcontext()


def quiet_third_party_bars() -> None:
    """--no-progress: also silence transformers' and huggingface_hub's own tqdm bars."""
    import os
    import sys

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # bars that transformers draws with plain tqdm (GGUF de-quantization): tqdm reads TQDM_* defaults when
    # it is first imported, which this command has not done yet (the CLI imports it lazily)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    if "transformers" not in sys.modules:
        return  # transformers takes its default from huggingface_hub's switch when it is imported (no import here:
        # it would load torch before the command has checked its input)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def count(n: int, one: str, many: str | None = None) -> str:
    """``1 matrix`` / ``3 matrices``: a number with the noun it counts, singular or plural."""
    return f"{n} {one if n == 1 else (many or one + 's')}"
