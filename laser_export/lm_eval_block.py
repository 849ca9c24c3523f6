"""The recipe's ``lm_eval:`` block: lm-evaluation-harness tasks measured before and after the reduction.

``verify`` (and ``run`` when it verifies) evaluates the baseline and the reduced model in process with
``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<the in-memory model>)``, with ``log_samples=True``; the
per-document scores of the two passes are paired by document (id and lm-eval's document hash) and every
metric that is a mean of per-document scores gets a paired-bootstrap 95% CI of reduced − baseline
(:func:`laser_export.stats.paired_bootstrap`). Metrics lm-eval aggregates otherwise (perplexities, F1 over
the corpus) are reported before/after without a CI.

Everything knowable without weights is checked first (:func:`prepare`): lm-eval installed (else a
``RecipeError`` naming the ``laser-export[lm-eval]`` extra), every task name known to lm-eval's
``TaskManager`` (offline: it indexes YAML files), the tasks' data loaded. Groups (``mmlu``) are run and
reported as their leaf tasks.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from dataclasses import dataclass, field

from .benchmarks import BenchmarkError
from .errors import CheckFailed
from .recipe import RecipeError
from .stats import paired_bootstrap

EXTRA = "pip install 'laser-export[lm-eval]'"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_MANAGERS: dict = {}  # include_path -> TaskManager (indexing every task YAML takes seconds)


class LmEvalMismatch(CheckFailed):
    """The two lm-eval passes did not score the same documents: no paired difference can be reported."""


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def lm_eval_missing() -> str | None:
    """Why the ``lm_eval:`` block cannot run here (lm-eval not installed), without importing lm-eval; else None."""
    import importlib.util
    import sys

    if "lm_eval" in sys.modules:
        present = sys.modules["lm_eval"] is not None
    else:
        present = importlib.util.find_spec("lm_eval") is not None
    return None if present else f"needs lm-eval, which is not installed: {EXTRA}"


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RecipeError([f"lm_eval: needs lm-eval, which is not installed ({err.name or err}): {EXTRA}"]) from None
    return TaskManager


def task_manager(include_path: str | None, defaults: bool = True):
    """lm-eval's TaskManager over its own tasks (``defaults``) and the recipe's folder of task YAMLs, built once
    per (folder, defaults): indexing lm-eval's ~15,000 task YAMLs takes seconds."""
    TaskManager = _import_lm_eval()
    if include_path is not None and not os.path.isdir(os.path.expanduser(include_path)):
        raise RecipeError([f"lm_eval.include_path: {include_path} is not a folder"])
    key = (None if include_path is None else os.path.abspath(os.path.expanduser(include_path)), defaults)
    if key not in _MANAGERS:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about a model object are noise here
        _MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=defaults)
    return _MANAGERS[key]


def check_tasks(spec) -> object:
    """Every name of ``spec.tasks`` is a task, group or tag lm-eval knows; returns the TaskManager (the recipe's
    folder alone when it holds every name: include_path tasks take precedence in lm-eval anyway).
    Unknown names: one RecipeError line each, naming ``lm_eval.tasks[i]``."""
    if spec.include_path is not None:
        local = task_manager(spec.include_path, defaults=False)
        if set(spec.tasks) <= set(local.all_tasks):
            return local
    tm = task_manager(spec.include_path)
    known = set(tm.all_tasks)
    bad = [f"lm_eval.tasks[{i}]: unknown lm-eval task {name!r}"
           + ("" if spec.include_path else " (local task YAMLs: set lm_eval.include_path)")
           for i, name in enumerate(spec.tasks) if name not in known]
    if bad:
        raise RecipeError(bad)
    return tm


@dataclass
class LmEvalPasses:
    """The lm-eval part of a verify: :meth:`baseline` before the reduce step, :meth:`reduced` after it."""

    spec: object
    tasks: dict  # leaf task name -> lm-eval Task (data loaded once, before the weights)
    manager: object = None  # the TaskManager that loaded them (simple_evaluate builds a full one without it)
    base: dict | None = field(default=None, repr=False)

    def _evaluate(self, model, tokenizer) -> dict:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        # HFLM sets a pad token on the tokenizer it gets: a copy, so the exported tokenizer stays as loaded
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.spec.batch_size)
        return simple_evaluate(model=lm, tasks=list(self.tasks.values()), num_fewshot=self.spec.num_fewshot,
                               limit=self.spec.limit, log_samples=True, bootstrap_iters=0,
                               task_manager=self.manager)

    def baseline(self, model, tokenizer) -> None:
        self.base = self._evaluate(model, tokenizer)

    def reduced(self, model, tokenizer) -> dict:
        """Evaluate the reduced model; return the report's ``lm_eval`` section."""
        red = self._evaluate(model, tokenizer)
        s = self.spec
        return {"library": "lm-eval", "version": lm_eval_version(), "url": LM_EVAL_URL,
                "num_fewshot": s.num_fewshot, "limit": s.limit, "batch_size": s.batch_size,
                "tasks": {name: _task_report(name, self.base, red) for name in self.tasks}}


def prepare(spec) -> LmEvalPasses:
    """Check the block and load the tasks' data before any weights load (RecipeError / BenchmarkError); the
    family (causal LMs only) was checked by :func:`laser_export.pipeline.plan`."""
    tm = check_tasks(spec)
    try:
        try:
            tasks = dict(tm.load(list(spec.tasks))["tasks"])  # groups and tags: their leaf tasks
        except Exception:
            if tm is task_manager(spec.include_path):
                raise
            # the recipe's folder alone was not enough (e.g. a local group of lm-eval's own tasks)
            tm = task_manager(spec.include_path)
            tasks = dict(tm.load(list(spec.tasks))["tasks"])
    except Exception as err:  # lm-eval raises whatever datasets raised (offline, missing file, bad YAML)
        raise BenchmarkError(f"lm_eval.tasks: cannot load {', '.join(spec.tasks)}: "
                             f"{type(err).__name__}: {' '.join(str(err).split())[:400]}") from None
    if not tasks:
        raise RecipeError([f"lm_eval.tasks: {', '.join(spec.tasks)} holds no task lm-eval can run"])
    return LmEvalPasses(spec, tasks, tm)


# ------------------------------------------------------------------------------------------------ report


def _public_dataset(path) -> str | None:
    """lm-eval's ``dataset_path`` as a report shows it: a local path by its last part."""
    if not isinstance(path, str):
        return None
    if path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path)):
        return os.path.basename(os.path.normpath(path))
    return path


def _per_doc(samples: list[dict]) -> dict:
    """{(metric, filter): {doc_id: value}} and {doc_id: (doc_hash, prompt_hash)} of lm-eval's logged samples."""
    values, hashes = {}, {}
    for s in samples:
        hashes[s["doc_id"]] = (s.get("doc_hash"), s.get("prompt_hash"))
        for m in s.get("metrics") or []:
            values.setdefault((m, s.get("filter", "none")), {})[s["doc_id"]] = s.get(m)
    return values, hashes


def _number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _metric_report(key, agg_b, agg_r, vb: dict, vr: dict, higher) -> dict:
    """One metric: before/after (lm-eval's aggregate) and, for a mean of per-document scores, the paired CI."""
    out = {"filter": key[1], "baseline": _number(agg_b), "reduced": _number(agg_r), "higher_is_better": higher,
           "delta": None}
    ids = sorted(vb)
    a, b = [_number(vb[i]) for i in ids], [_number(vr.get(i)) for i in ids]
    if not ids or any(x is None for x in a + b):
        return {**out, "why": "per-document scores are not numbers: no paired CI"}
    mean_b, mean_r = sum(a) / len(a), sum(b) / len(b)
    if out["baseline"] is None or abs(mean_b - out["baseline"]) > 1e-9 or abs(mean_r - out["reduced"]) > 1e-9:
        return {**out, "why": "lm-eval's aggregate is not the mean of the per-document scores: no paired CI"}
    return {**out, "delta": paired_bootstrap(a, b, seed=0)}


def _task_report(name: str, base: dict, red: dict) -> dict:
    sb, sr = base["samples"].get(name, []), red["samples"].get(name, [])
    vb, hb = _per_doc(sb)
    vr, hr = _per_doc(sr)
    if hb != hr:
        raise LmEvalMismatch(f"lm_eval: task {name}: the baseline and reduced passes scored different documents "
                             f"or prompts ({len(hb)} vs {len(hr)} documents); no paired comparison")
    cfg = base["configs"].get(name, {})
    rb, rr = base["results"].get(name, {}), red["results"].get(name, {})
    higher = base.get("higher_is_better", {}).get(name, {})
    metrics = {}
    for key in vb:
        label = f"{key[0]},{key[1]}"
        metrics[label] = _metric_report(key, rb.get(label), rr.get(label), vb[key], vr.get(key, {}),
                                        higher.get(key[0]))
    split = cfg.get("test_split") or cfg.get("validation_split")
    n = base.get("n-samples", {}).get(name, {})
    return {"dataset": {"path": _public_dataset(cfg.get("dataset_path")), "name": cfg.get("dataset_name"),
                        "split": split, "hub": _hub_dataset(cfg.get("dataset_path"))},
            "version": base.get("versions", {}).get(name), "num_fewshot": base.get("n-shot", {}).get(name),
            "n": len(hb), "n_available": n.get("original"), "metrics": metrics}


def _hub_dataset(path) -> bool:
    """Whether lm-eval's ``dataset_path`` is a Hub dataset id (namespace/name, not a local folder)."""
    return isinstance(path, str) and bool(_HUB_ID.match(path)) and not os.path.exists(os.path.expanduser(path))


def print_lm_eval(section: dict) -> None:
    from rich.table import Table

    from .progress import console

    lim = f", limit {section['limit']}" if section.get("limit") is not None else ""
    t = Table(title=f"lm-eval {section['version']} ({section['num_fewshot'] if section['num_fewshot'] is not None else 'default'}-shot{lim})")
    for col in ("task", "metric", "n", "baseline", "reduced", "Δ (paired bootstrap 95% CI)"):
        t.add_column(col)
    for name, task in section["tasks"].items():
        for metric, m in task["metrics"].items():
            d = m["delta"]
            delta = f"{d['estimate']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else m.get("why", "")
            t.add_row(name, metric, str(task["n"]), _fmt(m["baseline"]), _fmt(m["reduced"]), delta)
    console.print(t)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


__all__ = ["EXTRA", "LmEvalMismatch", "LmEvalPasses", "check_tasks", "lm_eval_version", "prepare", "print_lm_eval"]
