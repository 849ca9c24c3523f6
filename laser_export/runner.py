"""The library behind the ``run``, ``verify`` and ``push`` commands.

Functions here take typed options (:class:`RunOptions`, :class:`VerifyOptions`, :class:`PushOptions`,
built by :mod:`laser_export.cli` or by any caller) and raise typed errors; they never read argparse
and never choose exit codes. Bad input raises one of the input errors (``RecipeError``,
``SourceError``, ``ArchitectureError``, ``BenchmarkError``, ``OutputError``); a check that ran and
failed raises :class:`ClaimsFailed`, ``OnnxExportError`` or ``PushError``.

Order of a run (everything knowable without weights is checked before they load):
recipe → plan (source files, config, layers, matrices, metric) → output folder and report path →
leftovers of killed runs → benchmark data → then the one run path, :func:`_execute`, shared by
``verify``, ``run``, ``apply`` and streaming: load → baseline → reduce (an explicit step) → reduced
→ report → export (:func:`laser_export.export.writer.write_export`) → push. A streamed export skips
load and measure: reduce and export happen shard by shard.
"""

from __future__ import annotations

from .errors import CheckFailed
from dataclasses import dataclass, field
from pathlib import Path

from .pipeline import Plan, load_model, plan, reduce_loaded
from .options import ApplyOptions, PushOptions, RunOptions, VerifyOptions
from .policy import check_report_path, report_path as _report_path
from .progress import console, count, status
from .recipe import RecipeError, check_repo_id, load_recipe


class ClaimsFailed(CheckFailed):
    """The recipe's claims do not hold on its split (the report was written; nothing was exported)."""

    def __init__(self, message: str, report: dict, report_path: Path):
        super().__init__(message)
        self.report = report
        self.report_path = report_path


@dataclass
class RunResult:
    out: Path | None = None
    report_path: Path | None = None
    report: dict | None = None
    manifest: dict | None = None
    url: str | None = None  # the pushed commit
    planned: list[str] = field(default_factory=list)  # --dry-run: what would be written


# ----------------------------------------------------------------------------------------------- checks


def _protected(p: Plan) -> list[Path]:
    from .policy import protected

    return protected(p)


def _write_json(path: Path, data: dict) -> None:
    """Write a report atomically (:func:`laser_export.atomic.write_json`): a kill never leaves half a report; it
    is valid JSON (no NaN); an unwritable path is an OutputError."""
    from .atomic import clean_part_debris, write_json
    from .policy import OutputError
    from .verify import check_report_json

    check_report_json(data, str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_part_debris(path.parent)  # what killed report writes left there
        write_json(path, data)
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror}") from None


def _select(p: Plan, limit: int | None, progress: bool = True, tokenise: bool = True):
    """Load the benchmark data (and, with ``tokenise``, tokenise it) before the weights, so a data problem fails
    fast. A dry run does not tokenise: the tokenizer of a Hub source would be downloaded."""
    from .benchmarks import BenchmarkError
    from .verify import check_scorable, select_examples

    scorer = check_scorable(p)
    with status(f"loading benchmark {p.recipe.benchmark.name}", progress):
        examples, info = select_examples(p, limit)
    if not examples:
        bench = p.recipe.benchmark
        raise BenchmarkError(
            f"benchmark.split: the {bench.split} split is empty ({info['sizes']['validation']} validation, "
            f"{info['sizes']['test']} test examples with validation_fraction {bench.validation_fraction})"
        )
    if tokenise:
        _check_tokenisation(p, scorer, examples, progress)
    return examples, info


def _check_tokenisation(p: Plan, scorer: str, examples, progress: bool) -> None:
    """Tokenise the examples before the weights load (the tokenizer is kept for the load)."""
    from .evaluate import check_tokenisation
    from .pipeline import load_tokenizer
    from .verify import check_perplexity_input

    with status("tokenising the examples", progress):
        check_tokenisation(scorer, load_tokenizer(p), examples)
        check_perplexity_input(p)


def _verify_writes(report: Path, n: int, cache) -> list[str]:
    """What a verify writes, for --dry-run: the report, and the baseline cache entry (when the cache is used)."""
    lines = [f"{report} (verify report; {count(n, 'example')} scored with the reduced model, and with the "
             f"baseline unless the baseline cache holds it)"]
    if cache is not None:
        from .defaults import prefix_cache_gb

        lines.append(f"{cache.root}/ (on a cache miss: the baseline entry, and the inputs of the reduced blocks "
                     f"for replay if at most {prefix_cache_gb():g} GB, $LASER_EXPORT_PREFIX_CACHE_GB; --no-cache "
                     "writes nothing there)")
    return lines


def _plan_lines(p: Plan, writes: list[str]) -> list[str]:
    from .intervene import describe_targets

    targets = describe_targets(p.targets, p.family)
    lines = [f"plan: {p.family.name} from {p.source.describe()}; {count(len(p.targets), 'matrix', 'matrices')} ({targets}); "
             f"storage {p.recipe.storage}"]
    return lines + [f"would write: {w}" for w in writes]


# ------------------------------------------------------------------------------------------- the run path


@dataclass
class _Measure:
    """The verify part of a run: the examples, the options of the two passes, where the report goes."""

    selected: tuple
    path: Path
    limit: int | None = None
    progress: bool = True
    prefix_cache: bool = True
    baseline_cache: object = None  # the opened BaselineCache (None: --no-cache or an unusable folder)
    lm_eval: object = None  # the recipe's lm_eval block, prepared (lm_eval_block.LmEvalPasses)


def _prepare_lm_eval(p: Plan, progress: bool, dry_run: bool = False):
    """The recipe's lm-eval tasks, checked and their data loaded before the weights (None: no lm_eval block).
    A dry run checks the task names only: loading the data may download it."""
    if p.recipe.lm_eval is None:
        return None
    from .lm_eval_block import check_tasks, prepare

    if dry_run:
        check_tasks(p.recipe.lm_eval)
        return None

    with status(f"loading lm-eval tasks {', '.join(p.recipe.lm_eval.tasks)}", progress):
        return prepare(p.recipe.lm_eval)


def _open_cache(enabled: bool, dry_run: bool, protect=()):
    """The baseline cache, checked before any weights load (an unusable folder, or one inside an input of the
    run: a warning, no cache)."""
    from .baseline_cache import BaselineCache

    cache = BaselineCache.open(enabled, clean=not dry_run, protect=protect)
    return cache if cache.enabled else None


def _measure_reduce(p: Plan, loaded, m: _Measure | None, progress: bool) -> dict | None:
    """baseline (when measuring) → reduce (the explicit step) → reduced; returns the report (None: no measure)."""
    session = None
    if m is not None:
        from .verify import Measurement

        session = Measurement(p, loaded, limit=m.limit, progress=m.progress, selected=m.selected,
                              prefix_cache=m.prefix_cache, baseline_cache=m.baseline_cache)
        session.baseline()
        if m.lm_eval is not None:
            m.lm_eval.baseline(loaded.model, loaded.tokenizer)
    reduce_loaded(p, loaded, progress=progress)
    if session is None:
        return None
    report = session.reduced()
    if m.lm_eval is not None:
        report["lm_eval"] = m.lm_eval.reduced(loaded.model, loaded.tokenizer)
    return report


def _execute(p: Plan, measure: _Measure | None, job, *, stream: bool = False, progress: bool = True):
    """THE run path of ``verify`` (measure, no job), ``run`` (measure and/or job), ``apply`` (job) and streaming:
    load → [baseline] → reduce → [reduced → report] → [export]. Returns (report, manifest)."""
    from .export.writer import InMemoryWeights, write_export

    if stream:  # reduce and export shard by shard: nothing is loaded whole, nothing measured
        from .stream import export_streamed

        return None, export_streamed(job)
    loaded = load_model(p, progress=progress)
    if job is not None and measure is not None:  # an export cast that overflows fails now, not after the verify
        from .export.dtype import check_castable

        check_castable(loaded.model, p.recipe.export.dtype)
    report = _measure_reduce(p, loaded, measure, progress)
    if report is not None:
        from .verify import print_report

        print_report(report)
        _write_json(measure.path, report)
        console.print(f"{'verify report' if job else 'report'}: {measure.path}")
        if report["claims"] and not report["passed"]:  # no claims: measured only
            why = ("claims do not hold: nothing exported (see the report; --skip-verify exports anyway)" if job
                   else f"claims do not hold (see {measure.path})")
            raise ClaimsFailed(why, report, measure.path)
        if job is not None:
            job.report = report
    if job is None:
        return report, None
    return report, write_export(job, InMemoryWeights(loaded))


def _exported(out: Path, manifest, how: str) -> None:
    console.print(f"[green]exported[/] {out} ({how}{count(len(manifest.matrices), 'matrix', 'matrices')}, "
                  f"{manifest.totals.bytes_saved / 2**20:.2f} MiB saved)")


# ------------------------------------------------------------------------------------------------ verify


def verify(opts: VerifyOptions) -> RunResult:
    """Score baseline and reduced model on the recipe's split; write the report.

    Raises :class:`ClaimsFailed` (report written) when a claim does not hold."""
    recipe, text = load_recipe(opts.recipe)
    if recipe.benchmark is None:  # without claims, verify measures (baseline vs reduced) and exits 0
        raise RecipeError(["benchmark: the recipe names no benchmark to measure on"], opts.recipe)
    p = plan(recipe, text)
    path, flag = _report_path(recipe.name, opts.report)
    check_report_path(path, flag, [*_protected(p), opts.recipe])
    cache = _open_cache(opts.baseline_cache, opts.dry_run, [*_protected(p), opts.recipe])
    selected = _select(p, opts.limit, opts.progress, not opts.dry_run)
    lm_eval = _prepare_lm_eval(p, opts.progress, opts.dry_run)
    if opts.dry_run:
        return RunResult(report_path=path, planned=_plan_lines(p, _verify_writes(path, len(selected[0]), cache)))
    measure = _Measure(selected, path, opts.limit, opts.progress, opts.prefix_cache, cache, lm_eval)
    report, _ = _execute(p, measure, None, progress=opts.progress)
    return RunResult(report_path=path, report=report)


# --------------------------------------------------------------------------------------------------- run


def _check_run(opts: RunOptions, recipe) -> str | None:
    """The run's options that need no plan: the repo to push to (returned) and --stream with claims."""
    hub = recipe.export.hub
    repo_id = opts.repo_id or (hub.repo_id if hub else None)
    if opts.repo_id and (why := check_repo_id(opts.repo_id)):
        raise RecipeError([f"--repo-id: {why}"])
    if opts.push and not repo_id:
        raise RecipeError(["export.hub.repo_id: --push needs a repo: set it in the recipe or pass --repo-id"],
                          opts.recipe)
    return repo_id


def _prepare_out(p: Plan, out: Path, overwrite: bool, dry_run: bool = False) -> None:
    """Leftovers of killed runs first (they may restore an export at ``out``), then whether ``out`` may be written."""
    from .policy import check_output, clean_debris

    for line in clean_debris(out, dry_run=dry_run):
        console.print(line)
    check_output(out, overwrite=overwrite, protect=_protected(p))


def _run_writes(p: Plan, out: Path, opts: RunOptions, report_path, selected, repo_id, cache) -> list[str]:
    writes = []
    if report_path is not None:
        writes += _verify_writes(report_path, len(selected[0]), cache)
    formats = " + ".join(p.recipe.export.formats)
    writes.append(f"{out}/ ({formats}, manifest.json, recipe.yaml, README.md"
                  + (", verify_report.json" if report_path is not None else "") + ")"
                  + (" replacing the existing export" if out.exists() else ""))
    if opts.push:
        writes.append(f"Hub repo {repo_id} (one commit)")
    return writes


def run(opts: RunOptions) -> RunResult:
    """Run a recipe end to end: reduce → verify → export (→ push).

    Raises :class:`ClaimsFailed` (nothing exported), ``OnnxExportError`` (nothing exported) or
    ``PushError`` (the export is written and intact) for checks that fail."""
    from .export.writer import ExportJob

    recipe, text = load_recipe(opts.recipe)
    repo_id = _check_run(opts, recipe)
    p = plan(recipe, text)
    out = Path(opts.out) if opts.out else Path("out") / recipe.name
    _prepare_out(p, out, opts.overwrite, opts.dry_run)
    verifying = recipe.claims is not None and not opts.skip_verify
    if opts.stream:
        from .stream import streamable

        if verifying:
            raise RecipeError(["--stream: the model is never loaded whole, so the claims cannot be verified: add "
                               "--skip-verify, or run `laser-export verify` then `laser-export apply`"], opts.recipe)
        if (reason := streamable(p)) is not None:
            raise RecipeError([f"--stream: {reason}"], opts.recipe)
    report_path = None
    if verifying:
        report_path, flag = _report_path(recipe.name, opts.report)
        check_report_path(report_path, flag, [*_protected(p), opts.recipe], out=out)
    console.print(f"[bold]{recipe.name}[/]: {p.family.name} from {p.source.describe()}, {count(len(p.targets), 'matrix', 'matrices')}, "
                  f"{recipe.storage}")
    cache = _open_cache(opts.baseline_cache, opts.dry_run, [*_protected(p), opts.recipe]) if verifying else None
    selected = _select(p, opts.limit, opts.progress, not opts.dry_run) if verifying else None
    lm_eval = _prepare_lm_eval(p, opts.progress, opts.dry_run) if verifying else None
    if recipe.lm_eval is not None and not verifying:
        console.print("lm_eval: not measured (run measures only when it verifies claims; `laser-export verify` "
                      "measures without claims)")
    if opts.dry_run:
        return RunResult(out=out, report_path=report_path,
                         planned=_plan_lines(p, _run_writes(p, out, opts, report_path, selected, repo_id, cache)))
    if not verifying and recipe.claims is not None:
        console.print("[yellow]--skip-verify: claims NOT verified; the model card will say so[/]")
    job = ExportJob(p, out, overwrite=opts.overwrite, protect=_protected(p), skip_verify=opts.skip_verify,
                    repo_id=opts.repo_id, private=opts.private, progress=opts.progress)
    measure = _Measure(selected, report_path, opts.limit, opts.progress, opts.prefix_cache,
                       cache, lm_eval) if verifying else None
    report, manifest = _execute(p, measure, job, stream=opts.stream, progress=opts.progress)
    _exported(out, manifest, "streamed, " if opts.stream else "")
    result = RunResult(out=out, report_path=report_path, report=report, manifest=manifest.to_json())
    if opts.push:
        hub = recipe.export.hub
        result.url = push(PushOptions(out, repo_id, private=opts.private or bool(hub and hub.private),
                                      endpoint=opts.endpoint, hub_timeout=opts.hub_timeout))
    return result


# ------------------------------------------------------------------------------------------------- apply


def apply(opts: ApplyOptions) -> RunResult:
    """Reduce and export an already-verified recipe without scoring anything (``laser-export apply``).

    Streams shard by shard when the source is a safetensors checkpoint and the formats allow it
    (:func:`laser_export.stream.streamable`); otherwise (GGUF source, ONNX/GGUF format, device_map, or
    ``opts.in_memory``) loads the model and writes the same export as :func:`run`. ``opts.report``: the
    passing verify report of this recipe (same model, same interventions), carried into the export and the card."""
    from .export.writer import ExportJob
    from .stream import streamable
    from .verify import load_report

    recipe, text = load_recipe(opts.recipe)
    p = plan(recipe, text)
    out = Path(opts.out) if opts.out else Path("out") / recipe.name
    report = load_report(opts.report, p) if opts.report else None
    _prepare_out(p, out, opts.overwrite)
    reason = "--in-memory" if opts.in_memory else streamable(p)
    if reason is None:
        console.print(f"[bold]{recipe.name}[/]: streaming {count(len(p.targets), 'matrix', 'matrices')} shard by shard into {out}")
    else:
        console.print(f"[bold]{recipe.name}[/]: in memory ({reason})")
    job = ExportJob(p, out, overwrite=opts.overwrite, protect=_protected(p), report=report,
                    skip_verify=report is None, progress=opts.progress)
    _, manifest = _execute(p, None, job, stream=reason is None, progress=opts.progress)
    _exported(out, manifest, "streamed, " if manifest.streamed else "in memory, ")
    return RunResult(out=out, report=report, manifest=manifest.to_json())


# -------------------------------------------------------------------------------------------------- push


def push(opts: PushOptions) -> str:
    """Push an export folder as one commit; return the commit URL. Raises ``PushError``."""
    from .export.hub import push_folder
    from .policy import OutputError

    folder = Path(opts.folder)
    if not (folder / "config.json").is_file():
        raise OutputError(f"{folder}: is not an export folder (no config.json)")
    if why := check_repo_id(opts.repo_id):
        raise RecipeError([f"--repo-id: {why}"])
    url = push_folder(folder, opts.repo_id, private=opts.private, endpoint=opts.endpoint, timeout=opts.hub_timeout)
    console.print(f"[green]pushed[/] {url}")
    return url
