"""Typed options of the commands (run, verify, apply, push, search), one source of truth for their flags,
defaults, help and validation.

Each field of an options dataclass carries its command-line flag in its metadata (:func:`option`):
help text, parse check, metavar, choices. :mod:`laser_export.cli` generates the argparse flags from
the fields (as mergekit's ``MergeOptions`` generates click flags), and :func:`validate` runs the same
checks when the dataclass is built by any other caller. Imports nothing heavy.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields
import os
from pathlib import Path
from typing import Any, Callable

from .defaults import HUB_TIMEOUT, hub_timeout
from .errors import InputError


class OptionError(InputError):
    """An option value is out of range; one line per problem, each naming the flag."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line."""

    help: str
    flag: str | None = None  # default: --field-name; a bool defaulting to True is given as its --no-... flag
    positional: bool = False
    check: Callable[[Any], Any] | None = None  # str or value -> value; ValueError(message) when unusable
    metavar: str | None = None
    choices: tuple | None = None
    nargs: str | None = None
    const: Any = None
    default_from: Callable[[], Any] | None = None  # the default when the flag is not given (an env setting)


def option(default: Any = MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with its command-line flag (see :class:`Flag`)."""
    return field(default=default, metadata={"cli": Flag(help=help, **kw)})


def flag_name(f) -> str:
    meta: Flag = f.metadata["cli"]
    return meta.flag or "--" + f.name.replace("_", "-")


# -- checks: each takes the text of a flag or a typed value, returns the value or raises ValueError --------


def _num(value, kind: type, want: str):
    if isinstance(value, bool):
        raise ValueError(f"expected {want}, got {value}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {want}, got {value!r}") from None


def positive_int(value) -> int:
    v = _num(value, int, "a positive integer")
    if v < 1:
        raise ValueError(f"expected a positive integer, got {v}")
    return v


def at_least(low: int) -> Callable[[Any], int]:
    def check(value) -> int:
        v = _num(value, int, f"an integer >= {low}")
        if v < low:
            raise ValueError(f"expected an integer >= {low}, got {v}")
        return v

    return check


def positive_float(value) -> float:
    v = _num(value, float, "a positive number")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"expected a positive number, got {v}")
    return v


def non_negative_float(value) -> float:
    v = _num(value, float, "a number >= 0")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"expected a finite number >= 0, got {v}")
    return v


def fraction(value) -> float:
    v = _num(value, float, "a number in (0, 1)")
    if not 0 < v < 1:
        raise ValueError(f"expected a number in (0, 1), got {v}")
    return v


def unit_interval(value) -> float:
    v = _num(value, float, "a number in (0, 1]")
    if not 0 < v <= 1:
        raise ValueError(f"expected a number in (0, 1], got {v}")
    return v


def closed_unit(value) -> float:
    v = _num(value, float, "a number in [0, 1]")
    if not 0 <= v <= 1:
        raise ValueError(f"expected a number in [0, 1], got {v}")
    return v


def layers_syntax(value) -> str:
    """``--layers`` syntax (20-29, 24,26,28, -4); a range must not be empty. Bounds are checked by search."""
    for part in (p.strip() for p in str(value).split(",")):
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m and int(m[1]) > int(m[2]):
            raise ValueError(f"range {part!r} is empty (write LOW-HIGH, e.g. {m[2]}-{m[1]})")
    return str(value)


def file_path(value) -> Path:
    """A path a file is written to: ``dir/`` (a trailing slash) names a folder, never a file called ``dir``."""
    if isinstance(value, str) and value.endswith(("/", os.sep)):
        raise ValueError(f"{value!r} ends with '/', a folder; give a file path such as {value}report.json")
    return Path(value)


def non_empty(value) -> str:
    if not str(value).strip():
        raise ValueError("must not be empty")
    return str(value)


def validate(opts) -> None:
    """Run every field's check (and choices) on the values of ``opts``; :class:`OptionError` lists the
    problems, each naming its flag. Called by the options dataclasses' ``__post_init__``."""
    problems = []
    for f in fields(opts):
        meta: Flag | None = f.metadata.get("cli")
        value = getattr(opts, f.name)
        if meta is None or value is None:
            continue
        try:
            if meta.check is not None:
                meta.check(value)
            if meta.choices is not None and value not in meta.choices:
                raise ValueError(f"one of {', '.join(map(str, meta.choices))}, got {value!r}")
        except ValueError as err:
            problems.append(f"{flag_name(f)}: {err}")
    if problems:
        raise OptionError(problems)


def from_namespace(cls, args) -> Any:
    """Build ``cls`` from parsed arguments: every field with a flag, an unset one from its ``default_from``."""
    kw = {}
    for f in fields(cls):
        meta: Flag | None = f.metadata.get("cli")
        if meta is None or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and meta.default_from is not None:
            value = meta.default_from()
        kw[f.name] = value
    return cls(**kw)


# -- the commands' options -------------------------------------------------------------------------------

_RECIPE = dict(help="recipe YAML", positional=True)
_OUT = "export folder (default: out/<recipe name>)"


def _checked(cls):
    """Frozen dataclass whose fields are validated when built (by the CLI or any other caller)."""
    cls.__post_init__ = validate
    return dataclass(frozen=True)(cls)


_VERIFY = dict(
    limit=lambda: option(None, "score only the first N examples of the split (reported; can never satisfy a "
                         "claim)", check=positive_int, metavar="N"),
    report=lambda: option(None, "verify report JSON (default: reports/<name>.verify.json; a run also copies it "
                          "into the export)", metavar="PATH", check=file_path),
    prefix_cache=lambda: option(True, "score the reduced model with full forwards instead of replaying from the "
                                "lowest reduced layer", flag="--no-prefix-cache"),
    baseline_cache=lambda: option(True, "score the baseline again instead of reading it from the baseline cache "
                                  "(~/.cache/laser-export/baselines, or $LASER_EXPORT_BASELINE_CACHE)",
                                  flag="--no-cache"),
    dry_run=lambda: option(False, "resolve the source, check the recipe, output paths and data, print what "
                           "would be written; load no weights and write nothing"),
)


def no_progress() -> Any:
    return option(True, "no progress bars or spinners (ours, transformers' and huggingface_hub's)",
                  flag="--no-progress")


@_checked
class VerifyOptions:
    recipe: Path = option(**_RECIPE)
    limit: int | None = _VERIFY["limit"]()
    report: Path | None = _VERIFY["report"]()
    prefix_cache: bool = _VERIFY["prefix_cache"]()
    baseline_cache: bool = _VERIFY["baseline_cache"]()
    dry_run: bool = _VERIFY["dry_run"]()
    progress: bool = no_progress()


_HUB = dict(
    private=lambda: option(False, "create the Hub repo private"),
    endpoint=lambda: option(None, "Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)", metavar="URL"),
    hub_timeout=lambda: option(HUB_TIMEOUT, f"deadline of each network step of a push (default "
                               f"{HUB_TIMEOUT:g}, or $LASER_EXPORT_HUB_TIMEOUT)", check=positive_float,
                               metavar="SECONDS", default_from=hub_timeout),
)


@_checked
class RunOptions:
    recipe: Path = option(**_RECIPE)
    out: Path | None = option(None, _OUT, metavar="DIR")
    overwrite: bool = option(False, "replace DIR when it holds a laser-export export (its manifest.json); any "
                             "other non-empty folder, the working directory, home and the source are never replaced")
    skip_verify: bool = option(False, "export without verifying the claims (the model card says NOT verified)")
    stream: bool = option(False, "with --skip-verify (or a recipe without claims): reduce shard by shard from a "
                          "safetensors source, the model never whole in memory; same files as the in-memory export")
    push: bool = option(False, "push the export to the Hub after writing it")
    repo_id: str | None = option(None, "Hub repo to push to (overrides export.hub.repo_id)", metavar="ORG/NAME")
    private: bool = _HUB["private"]()
    endpoint: str | None = _HUB["endpoint"]()
    hub_timeout: float = _HUB["hub_timeout"]()
    limit: int | None = _VERIFY["limit"]()
    report: Path | None = _VERIFY["report"]()
    prefix_cache: bool = _VERIFY["prefix_cache"]()
    baseline_cache: bool = _VERIFY["baseline_cache"]()
    dry_run: bool = _VERIFY["dry_run"]()
    progress: bool = no_progress()


@_checked
class ApplyOptions:
    recipe: Path = option(**_RECIPE)
    out: Path | None = option(None, _OUT, metavar="DIR")
    overwrite: bool = option(False, "replace DIR when it holds a laser-export export (same rules as run)")
    report: Path | None = option(None, "the passing verify report of this recipe, carried into the export and "
                                 "the card", metavar="PATH")
    in_memory: bool = option(False, "load the whole model instead of streaming")
    progress: bool = no_progress()


@_checked
class PushOptions:
    folder: Path = option(help="export folder (written by a run)", positional=True)
    repo_id: str = option(help="Hub repo to push to", metavar="ORG/NAME", check=non_empty)
    private: bool = _HUB["private"]()
    endpoint: str | None = _HUB["endpoint"]()
    hub_timeout: float = _HUB["hub_timeout"]()


#: heatmap panels of a search (laser_export.search.plot draws them)
PLOT_METRICS = ("top1", "logloss", "both")


@dataclass
class SearchOptions:
    out: str = option(help="recipe YAML to write; <out>.sweep.json, <out>.sweep.png and <out>.search.jsonl go "
                      "next to it", check=non_empty, metavar="RECIPE")
    model: str | None = option(None, "model source (as model.source in a recipe); default: the template's")
    benchmark: str | None = option(None, "benchmark name (as benchmark.name); default: the template's; a,b,...: "
                                   "several tasks at once, objective the mean paired top-1 gain, the first the "
                                   "primary (the recipe's benchmark)")
    template: str | None = option(None, "recipe to take model (revision, dtype, device, trust_remote_code), "
                                  "benchmark, storage, reduction and export from; its name, comments, interventions "
                                  "and claims are replaced", metavar="RECIPE")
    benchmark_path: str | None = option(None, "benchmark data file or archive (several tasks: comma separated, "
                                        "in --benchmark order, empty for a task's default)", metavar="PATH")
    subsample: int | None = option(None, "draw N examples (seeded) before splitting", check=at_least(2), metavar="N")
    max_examples: int | None = option(None, "sweep on only the first N validation examples", check=positive_int,
                                      metavar="N")
    layers: str | None = option(None, "e.g. 20-29 or 24,26,28 or -4 (default: the last third)", check=layers_syntax)
    matrices: str = option("fc_in,fc_up,fc_out", "aliases or groups, comma separated", check=non_empty)
    rhos: str = option("0.01,0.05,0.1,0.25", "comma separated fractions of the max rank kept; auto: the "
                       "Marchenko-Pastur rank", check=non_empty)
    seed: int | None = option(None, "split seed (default 0, or the template's)", check=at_least(0))
    validation_fraction: float | None = option(None, "in (0, 1); default 0.2, or the template's", check=fraction)
    batch_size: int | None = option(None, "default 32, or the template's", check=positive_int)
    storage: str | None = option(None, "default dense (or the template's)", choices=("dense", "factorised"))
    compose: int = option(3, "max interventions stacked greedily (1: no stacking)", check=positive_int)
    compose_tries: int = option(6, "max stacking attempts", check=at_least(0))
    rank_by_snr: bool = option(False, "sweep matrices in order of data-free SNR")
    per_expert: bool = option(False, "MoE: each expert of an expert alias is its own candidate (default: all "
                              "experts of a layer reduced together); the recipe names the experts")
    prune_snr: float | None = option(None, "sweep only the top FRACTION of matrices by SNR", check=unit_interval,
                                     metavar="FRACTION")
    tolerance: float = option(0.005, "claims tolerance written to the recipe", check=closed_unit)
    skip_test: bool = option(False, "no test scoring (writes sweep files, no recipe)")
    results: str | None = option(None, "JSONL of candidate results (resumable; default <out>.search.jsonl)",
                                 metavar="PATH")
    name: str | None = option(None, "recipe name (default: <model>-<benchmark>)")
    plot_metric: str = option("both", "heatmap panels: Δ top-1, Δ validation log-loss (the paper's Figure 1), "
                              "or both", choices=PLOT_METRICS)
    ray: str | None = option(None, "score candidates on Ray actors (one per GPU, else 2 CPU workers); without "
                             "ADDRESS a local Ray (or RAY_ADDRESS); needs pip install 'laser-export[ray]'",
                             nargs="?", const="", metavar="ADDRESS")
    ray_workers: int | None = option(None, "number of Ray actors (default: one per GPU, else 2)", check=positive_int)
    svd_cache_gb: float = option(2.0, "memory budget of the SVD cache; least recently used matrices are dropped "
                                 "first and recomputed when needed again", check=non_negative_float, metavar="GB")
    strategy: str = option("grid", "grid: every candidate on every validation example; halving: successive halving "
                           "(all candidates on a small random part, the best 1/ETA on a part ETA times larger, ...)",
                           choices=("grid", "halving"))
    eta: int | None = option(None, "halving rate (default: the smallest from 2 whose plan keeps the worst case "
                             "within 35% of the grid's example scorings)", check=at_least(2))
    from_scan: str | None = option(None, "order the matrices by the SNR of a `laser-export scan` (and --prune-snr "
                                   "by it)", metavar="SCAN_JSON")
    beam: int = option(0, "compose by a beam search of width B over the helpful candidates instead of greedily "
                       "(0: greedy)", check=at_least(0), metavar="B")
    task_weights: str | None = option(None, "weights of the tasks of --benchmark a,b (default equal)",
                                      metavar="W1,W2")
    progress: bool = no_progress()

    def __post_init__(self) -> None:
        validate(self)
