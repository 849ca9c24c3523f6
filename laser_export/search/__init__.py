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
* :mod:`.options` / :mod:`.command` — typed options and the end-to-end ``search(options)``.
"""

import importlib

#: public name -> the module of this package that defines it. Imported on first use, so that
#: ``laser_export.search.options`` (what the CLI builds its flags from) loads without torch.
_WHERE = {
    "SearchOutcome": "command", "search": "command",
    "SELECTION_METRICS": "compose", "compose_greedy": "compose", "selection_key": "compose",
    "Candidate": "grid", "parse_layers": "grid", "parse_matrices": "grid", "parse_rhos": "grid", "set_key": "grid",
    "SearchOptions": "options",
    "PLOT_METRICS": "plot", "plot_sweep": "plot",
    "build_recipe_dict": "recipe_writer", "recipe_name": "recipe_writer", "write_recipe": "recipe_writer",
    "ResultsLog": "results", "run_key": "results",
    "mp_median": ".lowrank",  # laser_export.lowrank: the MP law serves rank: auto too
    "snr": "snr", "spearman": "snr",
    "KEPT_METRICS": "sweep", "LocalScorer": "sweep", "SearchResult": "sweep", "Swapper": "sweep",
    "evaluate_recipe": "sweep", "run_search": "sweep",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Candidate",
    "KEPT_METRICS",
    "LocalScorer",
    "PLOT_METRICS",
    "ResultsLog",
    "SELECTION_METRICS",
    "SearchOptions",
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
