"""Find the (layer, matrix, ρ) interventions that help on a benchmark, then write a recipe.

One job per module:

* :mod:`.grid` — candidates and the ``--layers`` / ``--matrices`` / ``--rhos`` grid;
* :mod:`.sweep` — swap + prefix-cache scoring of every candidate, selection, composition driver;
* :mod:`.compose` — the selection key and greedy composition;
* :mod:`.snr` — data-free Marchenko–Pastur SNR ranking;
* :mod:`.results` — the resumable JSONL log, keyed by the identity of the weights;
* :mod:`.ray_pool` — the sweep spread over Ray actors (optional ``[ray]`` extra);
* :mod:`.plot` — the heatmap (Δ top-1 and/or Δ log-loss per layer × ρ);
* :mod:`.recipe_writer` — the recipe (name from model + benchmark, fresh comments, claims);
* :mod:`.command` — the end-to-end ``search(options)`` (its options: :class:`laser_export.options.SearchOptions`).
"""

from .command import SearchOutcome, search
from .compose import SELECTION_METRICS, compose_greedy, selection_key
from .grid import Candidate, parse_layers, parse_matrices, parse_rhos, set_key
from .plot import plot_sweep
from .recipe_writer import build_recipe_dict, recipe_name, write_recipe
from .results import ResultsLog, run_key
from ..lowrank import mp_median  # the MP law: rank: auto and the SNR share it
from .snr import snr, spearman
from .sweep import KEPT_METRICS, LocalScorer, SearchResult, Swapper, evaluate_recipe, run_search

__all__ = [
    "Candidate",
    "KEPT_METRICS",
    "LocalScorer",
    "ResultsLog",
    "SELECTION_METRICS",
    "SearchOutcome",
    "SearchResult",
    "Swapper",
    "build_recipe_dict",
    "compose_greedy",
    "evaluate_recipe",
    "mp_median",
    "parse_layers",
    "parse_matrices",
    "parse_rhos",
    "plot_sweep",
    "recipe_name",
    "run_key",
    "run_search",
    "search",
    "selection_key",
    "set_key",
    "snr",
    "spearman",
    "write_recipe",
]
