"""Typed options of a search: what ``laser-export search`` generates its flags from (field metadata,
:func:`laser_export.options.option`), validated when built by any caller."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import (
    at_least,
    closed_unit,
    fraction,
    layers as layers_syntax,
    non_empty,
    non_negative_float,
    no_progress,
    option,
    positive_int,
    unit_interval,
    validate,
)
from .plot import PLOT_METRICS


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
    prune_snr: float | None = option(None, "sweep only the top FRACTION of matrices by SNR", check=unit_interval,
                                     metavar="FRACTION")
    tolerance: float = option(0.005, "claims tolerance written to the recipe", check=closed_unit)
    skip_test: bool = option(False, "no test scoring (writes sweep files, no recipe)")
    results: str | None = option(None, "JSONL of candidate results (resumable; default <out>.search.jsonl)",
                                 metavar="PATH")
    name: str | None = option(None, "recipe name (default: <model>-<benchmark>)")
    plot_metric: str = option("both", "heatmap panels: Δ top-1, Δ validation log-loss (the paper's Figure 1), "
                              "or both", choices=tuple(PLOT_METRICS))
    ray: str | None = option(None, "score candidates on Ray actors (one per GPU, else 2 CPU workers); without "
                             "ADDRESS a local Ray (or RAY_ADDRESS); needs pip install 'laser-export[ray]'",
                             nargs="?", const="", metavar="ADDRESS")
    ray_workers: int | None = option(None, "number of Ray actors (default: one per GPU, else 2)", check=positive_int)
    svd_cache_gb: float = option(2.0, "memory budget of the SVD cache; least recently used matrices are dropped "
                                 "first and recomputed when needed again", check=non_negative_float, metavar="GB")
    strategy: str = option("grid", "grid: every candidate on every validation example; halving: successive halving "
                           "(all candidates on a small random part, the best 1/ETA on a part ETA times larger, ...)",
                           choices=("grid", "halving"))
    eta: int = option(3, "halving rate (default 3)", check=at_least(2))
    from_scan: str | None = option(None, "order the matrices by the SNR of a `laser-export scan` (and --prune-snr "
                                   "by it)", metavar="SCAN_JSON")
    beam: int = option(0, "compose by a beam search of width B over the helpful candidates instead of greedily "
                       "(0: greedy)", check=at_least(0), metavar="B")
    task_weights: str | None = option(None, "weights of the tasks of --benchmark a,b (default equal)",
                                      metavar="W1,W2")
    progress: bool = no_progress()

    def __post_init__(self) -> None:
        validate(self)
