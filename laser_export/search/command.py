"""``laser-export search`` as a library call: options → plan → benchmark → load → sweep → test →
sweep JSON, heatmap, recipe.

The model goes through the same :func:`laser_export.pipeline.plan` / :func:`~laser_export.pipeline.load_model`
as ``run`` and ``verify``: a ``--template`` recipe's ``model`` section (revision, trust_remote_code,
device, dtype) and ``reduction`` are honoured. The plan is the template (or a minimal recipe) with one
probe intervention per requested matrix at layer 0, so bad ``--matrices`` fail before any weights load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

from .. import stats
from ..architectures import num_layers
from ..atomic import clean_part_debris, write_json
from ..recipe import RecipeError, load_recipe, parse_recipe
from .compose import selection_key
from .grid import Candidate, parse_layers, parse_matrices, parse_rhos, rho_label, set_key
from ..options import SearchOptions
from .plot import plot_sweep
from .recipe_writer import build_recipe_dict, header_comments, model_stem, recipe_name, write_recipe
from ..baseline_cache import memo_dir_if_present
from ..identity import library_versions, weights_identity
from .results import ResultsLog, run_key
from .sweep import KEPT_METRICS, evaluate_recipe, run_search

#: model fields that describe one particular checkpoint: dropped when --model replaces the template's
_CHECKPOINT_FIELDS = ("revision", "model_type", "num_layers", "base_model", "license")


@dataclass
class SearchOutcome:
    """What a search wrote and found (the CLI prints from it; tests read it)."""

    sweep_json: Path
    plot: Path
    results: Path
    recipe: Path | None
    chosen: list[Candidate]
    test: dict = field(default_factory=dict)


def _plan_recipe(opts: SearchOptions, template: dict) -> dict:
    model = dict(template.get("model") or {})
    if opts.model and opts.model != model.get("source"):
        model = {k: v for k, v in model.items() if k not in _CHECKPOINT_FIELDS}
        model["source"] = opts.model
    t_bench = template.get("benchmark") or {}
    bench_name = _names(opts.benchmark)[0] if opts.benchmark else t_bench.get("name")  # the primary task
    if not model.get("source") or not bench_name:
        raise RecipeError(["search: give --model and --benchmark (or a --template recipe that names them)"])
    pick = lambda value, key, default: value if value is not None else t_bench.get(key, default)  # noqa: E731
    bench = {
        "name": bench_name,
        "path": pick(_names(opts.benchmark_path, keep_empty=True)[0] or None if opts.benchmark_path else None,
                     "path", None),
        "seed": pick(opts.seed, "seed", 0),
        "validation_fraction": pick(opts.validation_fraction, "validation_fraction", 0.2),
        "subsample": pick(opts.subsample, "subsample", None),
        "metric": "top1",
        "batch_size": pick(opts.batch_size, "batch_size", 32),
    }
    probes = [{"layer": 0, "matrix": m.strip(), "rho": 1.0} for m in opts.matrices.split(",") if m.strip()]
    if not probes:
        raise RecipeError(["--matrices: no matrix named"])
    data = {
        "name": "search",
        "model": model,
        "interventions": probes,
        "storage": opts.storage or template.get("storage") or "dense",
        "benchmark": {k: v for k, v in bench.items() if v is not None},
    }
    for key in ("reduction", "export"):
        if key in template:
            data[key] = template[key]
    return data


def _names(spec: str | None, keep_empty: bool = False) -> list[str]:
    parts = [x.strip() for x in (spec or "").split(",")]
    return parts if keep_empty else [x for x in parts if x]


@dataclass
class _Task:
    """One benchmark of a several-task search (``--benchmark a,b``)."""

    name: str
    weight: float
    split: object
    validation: list


def _tasks(opts: SearchOptions, p, bench: dict, primary_split, primary_validation) -> list[_Task] | None:
    """The tasks of ``--benchmark a,b,...`` (None for one task): same seed, validation fraction and
    subsample as the primary; each task's scorer checked; weights normalised to sum 1."""
    from ..benchmarks import BENCHMARKS, load_split
    from ..selection import scorer_for

    names = _names(opts.benchmark)
    if len(names) < 2:
        if opts.task_weights:
            raise RecipeError(["--task-weights: only with several tasks (--benchmark a,b)"])
        return None
    paths = _names(opts.benchmark_path, keep_empty=True) if opts.benchmark_path else []
    try:
        weights = [float(w) for w in _names(opts.task_weights)] if opts.task_weights else [1.0] * len(names)
    except ValueError:
        raise RecipeError([f"--task-weights: numbers, got {opts.task_weights!r}"]) from None
    problems = []
    keyed = [(n, paths[i] if i < len(paths) else "") for i, n in enumerate(names)]
    if len(set(keyed)) != len(keyed):
        problems.append(f"--benchmark: a task (benchmark and path) is given twice in {opts.benchmark!r}")
    # the label of a task: its benchmark name, with the data file's stem when a name repeats (jsonl,jsonl)
    labels = [n if names.count(n) == 1 else f"{n}:{Path(p).stem}" for n, p in keyed]
    if len(weights) != len(names) or any(w < 0 for w in weights) or sum(weights) <= 0:
        problems.append(f"--task-weights: {len(names)} non-negative numbers, not all 0, got {opts.task_weights!r}")
    if len(paths) > len(names):
        problems.append(f"--benchmark-path: {len(paths)} paths for {len(names)} tasks")
    for name in names[1:]:
        spec = BENCHMARKS.get(name)
        if spec is None:
            problems.append(f"--benchmark: unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
        elif scorer_for(p.family, spec, "top1") != "causal":
            problems.append(f"--benchmark: {name} is not scored by the causal first-token scorer the search uses")
    if problems:
        raise RecipeError(problems)
    total = sum(weights)
    tasks = [_Task(labels[0], weights[0] / total, primary_split, primary_validation)]
    for i, name in enumerate(names[1:], 1):
        split = load_split(name, path=(paths[i] if i < len(paths) else "") or None, seed=bench.get("seed"),
                           validation_fraction=bench["validation_fraction"], subsample=bench.get("subsample"))
        val = split.validation[: opts.max_examples] if opts.max_examples else split.validation
        if not val or (not opts.skip_test and not split.test):
            raise RecipeError([f"benchmark {name}: the split has {len(val)} validation and {len(split.test)} test examples"])
        tasks.append(_Task(labels[i], weights[i] / total, split, val))
    return tasks


def output_paths(opts: SearchOptions) -> dict[str, Path]:
    """Every file a search writes: the recipe, the sweep JSON and heatmap next to it, the results log."""
    out = Path(opts.out)
    stem = out.with_suffix("")
    results = Path(opts.results) if opts.results else stem.parent / f"{stem.name}.search.jsonl"
    return {"out": out, "sweep": stem.parent / f"{stem.name}.sweep.json",
            "plot": stem.parent / f"{stem.name}.sweep.png", "results": results}


def check_outputs(opts: SearchOptions, protect: Sequence[str | Path] = ()) -> None:
    """The output policy for every file a search writes, before anything loads (and before the sweep):
    never the model source or a file in it, the benchmark data, the template; the results log appends
    only to a search log; ``--name`` can name a recipe. Raises OutputError/RecipeError."""
    from ..policy import check_file_output, check_search_log, protected_inputs
    from ..recipe import check_name

    if opts.name is not None and (why := check_name(opts.name)):
        raise RecipeError([f"--name: {why}"])
    held = [*protected_inputs(None, opts.template, opts.from_scan, *_names(opts.benchmark_path)), *protect]
    if opts.model and Path(opts.model).expanduser().exists():
        held.append(Path(opts.model).expanduser())
    if opts.template:
        held += protected_inputs(load_recipe(opts.template)[0])
    check_file_output(opts.out, "--out", protect=held)  # first: "/" has no file name to derive the others from
    paths = output_paths(opts)
    for key in ("sweep", "plot"):
        check_file_output(paths[key], f"--out ({paths[key].name})", protect=held)
    check_search_log(paths["results"], "--results" if opts.results else f"--out ({paths['results'].name})",
                     protect=held)
    if paths["results"].expanduser().resolve() in {paths[k].expanduser().resolve() for k in ("out", "sweep", "plot")}:
        raise RecipeError([f"--results {opts.results}: is one of the files --out {opts.out} writes"])


def _load_for_worker(p):
    """Runs inside each Ray actor: the same loading as the driver (pipeline.load_model)."""
    from ..pipeline import load_model

    loaded = load_model(p)
    return loaded.model, loaded.tokenizer


@dataclass
class _Prepared:
    """Everything known before the weights load."""

    plan: object
    template: dict
    bench: dict
    layers: list[int]
    matrices: list[str]
    rhos: list[float]
    split: object
    validation: list
    identity: str
    key: str
    log: ResultsLog
    out: Path
    stem: Path
    scan: dict | None = None  # --from-scan: {(layer, matrix): SNR row}
    tasks: list[_Task] | None = None  # --benchmark a,b: every task (the first is the primary)


def _check_scorer(p) -> None:
    """The sweep scores with the causal first-token scorer and its prefix cache: a family, benchmark or
    metric that another scorer serves (masked LMs, generation metrics) is refused here, before any weights
    load, rather than scored wrongly."""
    from ..benchmarks import BENCHMARKS
    from ..selection import scorer_for

    scorer = scorer_for(p.family, BENCHMARKS[p.recipe.benchmark.name], p.recipe.benchmark.metric)
    if scorer != "causal":
        raise RecipeError([f"benchmark: search sweeps with the causal first-token scorer; {p.family.name} on "
                           f"{p.recipe.benchmark.name} ({p.recipe.benchmark.metric}) is scored by {scorer!r}, "
                           "which search does not support yet (verify does)"])


def _check_tokenisation(p, examples) -> None:
    """Every example the search scores, tokenised before the weights load (a prompt or answer that tokenises
    to nothing fails here, not after the sweep); the tokenizer is kept for the load."""
    from ..evaluate import check_tokenisation
    from ..pipeline import load_tokenizer
    from ..progress import console

    with console.status("tokenising the examples"):
        check_tokenisation("causal", load_tokenizer(p), examples)


def prepare(opts: SearchOptions) -> _Prepared:
    """Plan (no weights), grid, benchmark split and the run key: every input problem fails here."""
    import yaml

    from ..benchmarks import examples_sha256, load_split
    from ..pipeline import plan
    from ..progress import console

    template: dict = {}
    if opts.template:
        _, t_text = load_recipe(opts.template)  # validated; its comments and claims are not carried over
        template = yaml.safe_load(t_text)
    data = _plan_recipe(opts, template)
    p = plan(parse_recipe(data, opts.template), yaml.safe_dump(data, sort_keys=False))
    check_outputs(opts, [p.source.location] if p.source.kind != "hub" else [])
    _check_scorer(p)
    bench = p.recipe.benchmark.model_dump(exclude={"split"}, exclude_none=True)
    n_layers = num_layers(p.config)
    layers = parse_layers(opts.layers, n_layers)
    matrices = parse_matrices(opts.matrices, p.family)
    rhos = parse_rhos(opts.rhos)
    paths = output_paths(opts)
    out, stem, results_path = paths["out"], paths["out"].with_suffix(""), paths["results"]

    with console.status(f"loading benchmark {bench['name']}"):
        split = load_split(bench["name"], path=bench.get("path"), seed=bench.get("seed"),
                           validation_fraction=bench["validation_fraction"], subsample=bench.get("subsample"))
    validation = split.validation[: opts.max_examples] if opts.max_examples else split.validation
    if not validation or (not opts.skip_test and not split.test):
        raise RecipeError([f"benchmark: the split has {len(validation)} validation and {len(split.test)} test examples"])

    tasks = _tasks(opts, p, bench, split, validation)
    if tasks:
        validation = [ex for t in tasks for ex in t.validation]
    tests = [] if opts.skip_test else [ex for t in tasks for ex in t.split.test] if tasks else split.test
    _check_tokenisation(p, [*validation, *tests])
    with console.status("identifying the weights"):
        identity = weights_identity(p.source, memo_dir=memo_dir_if_present())
    key = run_key(weights=identity, dtype=p.recipe.model.dtype, libraries=library_versions(),
                  trust_remote_code=p.recipe.model.trust_remote_code, benchmark=",".join(f"{t.name}:{t.weight:g}" for t in tasks) if tasks else bench["name"],
                  validation=examples_sha256(validation), storage=p.recipe.storage,
                  reduction=p.recipe.reduction.model_dump())
    log = ResultsLog(results_path, key)
    scan = scan_snr(opts.from_scan, p.config.model_type) if opts.from_scan else None
    return _Prepared(p, template, bench, layers, matrices, rhos, split, validation, identity, key, log, out, stem, scan,
                     tasks)


def _sweep(opts: SearchOptions, pr: _Prepared, model, tokenizer, svd):
    from ..progress import console

    p = pr.plan
    pool = None
    if opts.ray is not None:
        from .ray_pool import RayPool

        with console.status("starting Ray"):
            pool = RayPool(partial(_load_for_worker, p), p.family, pr.validation, batch_size=pr.bench["batch_size"],
                           storage=p.recipe.storage, reduction=p.recipe.reduction, cache_start=min(pr.layers),
                           address=opts.ray or None, workers=opts.ray_workers)
        console.print(f"Ray: {len(pool)} actors")
    t0 = time.perf_counter()
    try:
        result = run_search(
            model, tokenizer, p.family, pr.validation, layers=pr.layers, matrices=pr.matrices, rhos=pr.rhos,
            batch_size=pr.bench["batch_size"], results=pr.log, compose=opts.compose, compose_tries=opts.compose_tries,
            prune_snr=opts.prune_snr, rank_by_snr=opts.rank_by_snr, storage=p.recipe.storage, svd=svd,
            progress=opts.progress, pool=pool, strategy=opts.strategy, eta=opts.eta,
            scan_snr=pr.scan, beam=opts.beam, per_expert=opts.per_expert, tasks=[(t.name, len(t.validation), t.weight) for t in pr.tasks] if pr.tasks else None,
        )
    finally:
        if pool is not None:
            pool.close()
    result.timings["search_s"] = time.perf_counter() - t0
    if not result.chosen:
        raise RecipeError(["search: no candidates were swept"])
    return result


def scan_snr(path: str, model_type: str) -> dict:
    """{(layer, matrix): SNR row} from a ``laser-export scan`` JSON of a model of the same type."""
    from ..scan import ScanError, load_scan

    data = load_scan(path)
    if data.get("model_type") != model_type:
        raise ScanError(f"--from-scan: {path} scanned a {data.get('model_type')!r} model, this is {model_type!r}")
    return {(r["layer"], r["matrix"]): {"snr": r["snr"], "noise_std": r["noise_std"], "threshold": r["mp_edge"],
                                        "n_signal": r["n_signal"], "sigma_max": r["sigma_max"]}
            for r in data["matrices"]}


def _print_validation(result) -> None:
    from ..progress import console

    # halving: the candidates scored on every example first
    top = sorted(result.candidates, key=lambda r: (r["metrics"].get("n", 0), selection_key(r["metrics"])),
                 reverse=True)[:10]
    console.print(f"validation baseline top1 {result.baseline['top1']:.4f} (n={int(result.baseline['n'])})")
    for r in top:
        m = r["metrics"]
        # choice tasks (FEVER, TruthfulQA, ...) score top-1 only: no answer log-prob / log-loss
        extra = "".join(f" {k} {m[k]:.3f}" for k in ("logprob", "logloss") if k in m)
        where = r["matrix"] + (f"[e{r['experts'][0]}]" if r.get("experts") else "")  # --per-expert
        console.print(f"  L{r['layer']:>2} {where:<6} ρ={rho_label(r['rho']):<5} k={r['rank']:<4} top1 {m['top1']:.4f} "
                      f"({r['delta_top1'] * 100:+.2f} pts){extra}")
    if result.halving:
        h = result.halving
        cuts = " → ".join(f"{t['candidates']}@{t['examples']}" for t in h["rungs"])
        over = f", over the {h['budget']:.2f} budget: too few examples or candidates for a cheaper plan"
        console.print(f"halving (eta {h['eta']}): candidates@examples {cuts}; {h['scored_examples']} examples scored, "
                      f"{h['scored_examples'] / h['grid_examples']:.2f} of the grid's {h['grid_examples']} (worst case "
                      f"{h['worst_case_ratio']:.2f}{'' if h['within_budget'] else over})")
    console.print(f"chosen on validation: {set_key(result.chosen)} → top1 {result.chosen_metrics['top1']:.4f}")


def _test(pr: _Prepared, model, tokenizer, chosen, svd, progress: bool) -> dict:
    """The primary task's test summary; with several tasks, every task's under ``tasks`` (with its weight)
    and ``objective``, the weighted mean of the tasks' test top-1 deltas."""
    test = _test_on(pr, pr.split.test, model, tokenizer, chosen, svd, progress)
    if pr.tasks:
        test["tasks"] = {t.name: {**(test if i == 0 else _test_on(pr, t.split.test, model, tokenizer, chosen, svd,
                                                                  progress)), "weight": t.weight}
                         for i, t in enumerate(pr.tasks)}
        for t in test["tasks"].values():
            t.pop("tasks", None)
        test["objective"] = sum(t["weight"] * t["delta_top1_bootstrap"]["estimate"] for t in test["tasks"].values())
    return test


def _test_on(pr: _Prepared, examples, model, tokenizer, chosen, svd, progress: bool) -> dict:
    """Baseline and the chosen recipe scored once on held-out ``examples``, with bootstrap CIs."""
    base, red = evaluate_recipe(model, tokenizer, pr.plan.family, examples, chosen,
                                batch_size=pr.bench["batch_size"], storage=pr.plan.recipe.storage, svd=svd,
                                progress=progress)
    test = {
        "n": len(examples),
        "baseline": {k: base.metrics.get(k) for k in KEPT_METRICS if k in base.metrics},
        "reduced": {k: red.metrics.get(k) for k in KEPT_METRICS if k in red.metrics},
        "delta_top1_bootstrap": stats.paired_bootstrap(base.hits("top1"), red.hits("top1")),
    }
    if "top1_no_article" in base.metrics:
        test["delta_top1_no_article_bootstrap"] = stats.paired_bootstrap(
            base.hits("top1_no_article"), red.hits("top1_no_article"))
    from ..answer_balance import paired

    balance = paired(examples, base, red)
    if balance is not None:
        test["answer_balance"] = balance
    return test


def _write_recipe(opts: SearchOptions, pr: _Prepared, result, test: dict, name: str) -> Path:
    p, template = pr.plan, pr.template
    source = p.recipe.model.source
    n = len(result.chosen)
    data = build_recipe_dict(
        name=name, source=source, chosen=result.chosen, benchmark=pr.bench,
        baseline_acc=test["baseline"]["top1"], reduced_acc=test["reduced"]["top1"],
        tolerance=opts.tolerance, storage=p.recipe.storage, template=template,
        model={"model_type": p.config.model_type, "num_layers": num_layers(p.config)},
        description=f"{source} with {'one matrix' if n == 1 else f'{n} matrices'} rank-reduced by LASER, "
        f"found by laser-export search on {pr.bench['name']}",
    )
    if template and opts.model and opts.model != (template.get("model") or {}).get("source"):
        data["model"] = {k: v for k, v in data["model"].items()
                         if k not in _CHECKPOINT_FIELDS or k in ("model_type", "num_layers")}
    comments = header_comments(
        source=source, benchmark=pr.bench["name"], n_validation=len(pr.validation),
        n_candidates=len(result.candidates), layers=pr.layers, matrices=pr.matrices, rhos=pr.rhos,
        compose=opts.compose, test=test, tolerance=opts.tolerance,
    )
    write_recipe(pr.out, data, comments)
    return pr.out


def search(opts: SearchOptions) -> SearchOutcome:
    """The whole search; see the module docstring. Raises RecipeError/SourceError/... on bad input."""
    from ..intervene import SVDCache
    from ..pipeline import load_model
    from ..progress import console, count

    pr = prepare(opts)
    p = pr.plan
    ignored = f"; {pr.log.other_runs} rows of other runs (other weights or settings) ignored" if pr.log.other_runs else ""
    console.print(
        f"search: {count(len(pr.layers), 'layer')} × {count(len(pr.matrices), 'matrix', 'matrices')} × {len(pr.rhos)} ρ on {len(pr.validation)} "
        f"validation examples; {len(pr.log.rows)} results already in {pr.log.path}{ignored}"
    )
    loaded = load_model(p)
    svd = SVDCache(p.recipe.reduction, max_bytes=int(opts.svd_cache_gb * 2**30))  # an LRU: memory bounded
    result = _sweep(opts, pr, loaded.model, loaded.tokenizer, svd)
    _print_validation(result)
    test = {} if opts.skip_test else _test(pr, loaded.model, loaded.tokenizer, result.chosen, svd, opts.progress)
    if test:
        print_test_summary(test)

    source, bench = p.recipe.model.source, pr.bench
    name = opts.name or recipe_name(source, bench["name"])
    sweep = {"run": pr.key, "weights_identity": pr.identity, "model": source, "benchmark": bench,
             "layers": pr.layers, "matrices": pr.matrices, "rhos": pr.rhos, "validation_n": len(pr.validation),
             "results_file": str(pr.log.path), **result.to_json(), "test": test}
    json_path = pr.stem.parent / f"{pr.stem.name}.sweep.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    clean_part_debris(json_path.parent)  # .part files of killed search writes (the recipe, sweep files go here)
    write_json(json_path, sweep, indent=1, newline=False)
    png = plot_sweep(result, pr.stem.parent / f"{pr.stem.name}.sweep.png", metric=opts.plot_metric,
                     model=model_stem(source), benchmark=bench["name"])
    console.print(f"wrote {json_path} and {png}")
    written = None
    if test:
        written = _write_recipe(opts, pr, result, test, name)
        console.print(f"wrote {written} (recipe {name!r})")
    return SearchOutcome(json_path, png, pr.log.path, written, list(result.chosen), test)


def print_test_summary(test: dict) -> None:
    """Top-1 and article-excluded deltas on the test split, each with its bootstrap CI and a verdict."""
    from ..progress import console

    def line(label: str, metric: str, ci: dict) -> str:
        b, r = test["baseline"][metric], test["reduced"][metric]
        lo, hi = ci["ci95"]
        verdict = "[green]gain[/]" if lo > 0 else "[red]loss[/]" if hi < 0 else "[yellow]CI includes 0[/]"
        return (f"  {label:<22} {b:.4f} → {r:.4f}  Δ {ci['estimate'] * 100:+.2f} pts  "
                f"95% CI [{lo * 100:+.2f}, {hi * 100:+.2f}]  {verdict}")

    for name, t in (test.get("tasks") or {}).items():
        ci = t["delta_top1_bootstrap"]
        console.print(f"  task {name} (weight {t['weight']:.2f}, test n={t['n']}): top1 {t['baseline']['top1']:.4f} → "
                      f"{t['reduced']['top1']:.4f}  Δ {ci['estimate'] * 100:+.2f} pts  95% CI "
                      f"[{ci['ci95'][0] * 100:+.2f}, {ci['ci95'][1] * 100:+.2f}]")
    if "objective" in test:
        console.print(f"  weighted mean test Δ top1 over the tasks: {test['objective'] * 100:+.2f} pts")
    console.print(f"test (n={test['n']}), held out{' (primary task)' if test.get('tasks') else ''}:")
    console.print(line("top1", "top1", test["delta_top1_bootstrap"]))
    if "delta_top1_no_article_bootstrap" in test:
        console.print(line("top1, articles ignored", "top1_no_article", test["delta_top1_no_article_bootstrap"]))
        top, noart = test["delta_top1_bootstrap"], test["delta_top1_no_article_bootstrap"]
        if top["ci95"][0] > 0 and noart["ci95"][0] <= 0:
            console.print("[yellow]  the top1 gain is answer format (fewer leading articles), not shown to be recall[/]")
    if test["reduced"]["top1"] <= test["baseline"]["top1"]:
        console.print("[yellow]warning:[/] the validation choice does not improve the test split")
    from ..answer_balance import side_warning

    warning = side_warning(test.get("answer_balance"), "reduced", test["reduced"]["top1"])
    if warning:
        console.print(f"[yellow]warning:[/] reduced model: {warning}")
