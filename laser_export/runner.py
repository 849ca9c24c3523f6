"""The library behind the ``run``, ``verify`` and ``push`` commands.

Functions here take typed options (:class:`RunOptions`, :class:`VerifyOptions`, :class:`PushOptions`,
built by :mod:`laser_export.cli` or by any caller) and raise typed errors; they never read argparse
and never choose exit codes. Bad input raises one of the input errors (``RecipeError``,
``SourceError``, ``ArchitectureError``, ``BenchmarkError``, ``OutputError``); a check that ran and
failed raises :class:`ClaimsFailed`, ``OnnxExportError`` or ``PushError``.

Order of a run (everything knowable without weights is checked before they load):
recipe → plan (source files, config, layers, matrices, metric) → output folder and report path →
leftovers of killed runs → benchmark data → weights (non-finite check) → verify → export → push.
"""

from __future__ import annotations

from .errors import CheckFailed
from dataclasses import dataclass, field
from pathlib import Path

from .pipeline import Plan, build_manifest, load_model, plan, reduce_loaded
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
    """Write JSON atomically (:func:`laser_export.atomic.write_json`): a kill never leaves half a report;
    an unwritable path is an OutputError."""
    from .atomic import write_json
    from .policy import OutputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror}") from None


def _select(p: Plan, limit: int | None, progress: bool = True):
    """Load the benchmark data before the weights, so a data problem fails fast."""
    from .benchmarks import BenchmarkError
    from .verify import check_scorable, select_examples

    check_scorable(p)
    with status(f"loading benchmark {p.recipe.benchmark.name}", progress):
        examples, info = select_examples(p, limit)
    if not examples:
        bench = p.recipe.benchmark
        raise BenchmarkError(
            f"benchmark.split: the {bench.split} split is empty ({info['sizes']['validation']} validation, "
            f"{info['sizes']['test']} test examples with validation_fraction {bench.validation_fraction})"
        )
    return examples, info


def _no_stdout(on: bool):
    """Swallow third-party progress printed to stdout (with --no-progress)."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO()) if on else contextlib.nullcontext()


def _plan_lines(p: Plan, writes: list[str]) -> list[str]:
    targets = ", ".join(f"L{t.layer}.{t.alias}" for t in p.targets)
    lines = [f"plan: {p.family.name} from {p.source.describe()}; {count(len(p.targets), 'matrix', 'matrices')} ({targets}); "
             f"storage {p.recipe.storage}"]
    return lines + [f"would write: {w}" for w in writes]


# ------------------------------------------------------------------------------------------------ verify


def _verify(p: Plan, loaded, opts, selected) -> dict:
    from .verify import print_report, verify_loaded

    from .baseline_cache import BaselineCache

    report = verify_loaded(p, loaded, limit=opts.limit, progress=opts.progress, selected=selected,
                           prefix_cache=opts.prefix_cache, baseline_cache=BaselineCache() if opts.baseline_cache else None)
    print_report(report)
    return report


def verify(opts: VerifyOptions) -> RunResult:
    """Score baseline and reduced model on the recipe's split; write the report.

    Raises :class:`ClaimsFailed` (report written) when a claim does not hold."""
    recipe, text = load_recipe(opts.recipe)
    if recipe.benchmark is None:  # without claims, verify measures (baseline vs reduced) and exits 0
        raise RecipeError(["benchmark: the recipe names no benchmark to measure on"], opts.recipe)
    p = plan(recipe, text)
    path, flag = _report_path(recipe.name, opts.report)
    check_report_path(path, flag, [*_protected(p), opts.recipe])
    selected = _select(p, opts.limit, opts.progress)
    if opts.dry_run:
        return RunResult(report_path=path, planned=_plan_lines(p, [f"{path} (verify report, {len(selected[0])} "
                                                                 "examples scored twice)"]))
    loaded = load_model(p, progress=opts.progress)
    report = _verify(p, loaded, opts, selected)
    _write_json(path, report)
    console.print(f"report: {path}")
    if report["claims"] and not report["passed"]:
        raise ClaimsFailed(f"claims do not hold (see {path})", report, path)
    return RunResult(report_path=path, report=report)


# --------------------------------------------------------------------------------------------------- run


def run(opts: RunOptions) -> RunResult:
    """Run a recipe end to end: reduce → verify → export (→ push).

    Raises :class:`ClaimsFailed` (nothing exported), ``OnnxExportError`` (nothing exported) or
    ``PushError`` (the export is written and intact) for checks that fail."""
    from .policy import check_output, clean_debris

    recipe, text = load_recipe(opts.recipe)
    hub = recipe.export.hub
    repo_id = opts.repo_id or (hub.repo_id if hub else None)
    if opts.repo_id and (why := check_repo_id(opts.repo_id)):
        raise RecipeError([f"--repo-id: {why}"])
    if opts.push and not repo_id:
        raise RecipeError(["export.hub.repo_id: --push needs a repo: set it in the recipe or pass --repo-id"],
                          opts.recipe)
    p = plan(recipe, text)
    out = Path(opts.out) if opts.out else Path("out") / recipe.name
    for line in clean_debris(out, dry_run=opts.dry_run):  # first: it may restore an export at `out`
        console.print(line)
    check_output(out, overwrite=opts.overwrite, protect=_protected(p))
    verifying = recipe.claims is not None and not opts.skip_verify
    if opts.stream and verifying:
        raise RecipeError(["--stream: the model is never loaded whole, so the claims cannot be verified: add "
                           "--skip-verify, or run `laser-export verify` then `laser-export apply`"], opts.recipe)
    report_path = None
    if verifying:
        report_path, flag = _report_path(recipe.name, opts.report)
        check_report_path(report_path, flag, [*_protected(p), opts.recipe], out=out)
    console.print(f"[bold]{recipe.name}[/]: {p.family.name} from {p.source.describe()}, {count(len(p.targets), 'matrix', 'matrices')}, "
                  f"{recipe.storage}")
    selected = _select(p, opts.limit, opts.progress) if verifying else None

    if opts.dry_run:
        writes = []
        if verifying:
            writes.append(f"{report_path} (verify report, {len(selected[0])} examples scored twice)")
        formats = " + ".join(recipe.export.formats)
        writes.append(f"{out}/ ({formats}, manifest.json, recipe.yaml, README.md"
                      + (", verify_report.json" if verifying else "") + ")"
                      + (" replacing the existing export" if out.exists() else ""))
        if opts.push:
            writes.append(f"Hub repo {repo_id} (one commit)")
        return RunResult(out=out, report_path=report_path, planned=_plan_lines(p, writes))
    if opts.stream:
        return _run_streamed(p, out, opts, repo_id, hub)

    loaded = load_model(p, progress=opts.progress)
    report = None
    if verifying:
        report = _verify(p, loaded, opts, selected)  # scores baseline, reduces in place, scores reduced
        _write_json(report_path, report)
        console.print(f"verify report: {report_path}")
        if not report["passed"]:
            raise ClaimsFailed(
                "claims do not hold: nothing exported (see the report; --skip-verify exports anyway)",
                report, report_path,
            )
    else:
        reduce_loaded(p, loaded, progress=opts.progress)
        if recipe.claims is not None:
            console.print("[yellow]--skip-verify: claims NOT verified; the model card will say so[/]")

    manifest = build_manifest(p, loaded.entries)
    _export(p, loaded, out, opts, manifest, report, protect=_protected(p))
    saved = manifest["totals"]["bytes_saved"]
    console.print(f"[green]exported[/] {out} ({count(len(loaded.entries), 'matrix', 'matrices')}, {saved / 2**20:.2f} MiB saved)")
    result = RunResult(out=out, report_path=report_path, report=report, manifest=manifest)
    if opts.push:
        result.url = push(PushOptions(out, repo_id, private=opts.private or bool(hub and hub.private),
                                      endpoint=opts.endpoint, hub_timeout=opts.hub_timeout))
    return result


def _run_streamed(p: Plan, out: Path, opts: RunOptions, repo_id: str | None, hub) -> RunResult:
    """``run --stream``: shard-by-shard reduction and export (see :mod:`laser_export.stream`)."""
    from .stream import StreamExportOptions, export_streamed, streamable

    reason = streamable(p)
    if reason is not None:
        raise RecipeError([f"--stream: {reason}"], opts.recipe)
    manifest = export_streamed(p, StreamExportOptions(
        out, overwrite=opts.overwrite, skip_verify=True, repo_id=opts.repo_id, private=opts.private,
        progress=opts.progress, protect=_protected(p)))
    if p.recipe.claims is not None:
        console.print("[yellow]--skip-verify: claims NOT verified; the model card will say so[/]")
    console.print(f"[green]exported[/] {out} (streamed, {count(len(manifest['matrices']), 'matrix', 'matrices')}, "
                  f"{manifest['totals']['bytes_saved'] / 2**20:.2f} MiB saved)")
    result = RunResult(out=out, manifest=manifest)
    if opts.push:
        result.url = push(PushOptions(out, repo_id, private=opts.private or bool(hub and hub.private),
                                      endpoint=opts.endpoint, hub_timeout=opts.hub_timeout))
    return result


# ------------------------------------------------------------------------------------------------- apply


def apply(opts: ApplyOptions) -> RunResult:
    """Reduce and export an already-verified recipe without scoring anything (``laser-export apply``).

    Streams shard by shard when the source is a safetensors checkpoint and the formats allow it
    (:func:`laser_export.stream.streamable`); otherwise (GGUF source, ONNX/GGUF format, device_map, or
    ``opts.in_memory``) loads the model and writes the same export as :func:`run`. ``opts.report``: the
    passing verify report of this recipe, carried into the export and the card."""
    from .policy import check_output, clean_debris
    from .stream import StreamExportOptions, export_streamed, load_report, streamable

    recipe, text = load_recipe(opts.recipe)
    p = plan(recipe, text)
    out = Path(opts.out) if opts.out else Path("out") / recipe.name
    report = load_report(opts.report, recipe) if opts.report else None
    for line in clean_debris(out):
        console.print(line)
    check_output(out, overwrite=opts.overwrite, protect=_protected(p))
    reason = "--in-memory" if opts.in_memory else streamable(p)
    if reason is None:
        console.print(f"[bold]{recipe.name}[/]: streaming {count(len(p.targets), 'matrix', 'matrices')} shard by shard into {out}")
        manifest = export_streamed(p, StreamExportOptions(out, overwrite=opts.overwrite, report=report,
                                                          skip_verify=report is None, progress=opts.progress,
                                                          protect=_protected(p)))
    else:
        console.print(f"[bold]{recipe.name}[/]: in memory ({reason})")
        loaded = reduce_loaded(p, load_model(p, progress=opts.progress), progress=opts.progress)
        manifest = build_manifest(p, loaded.entries)
        manifest["streamed"] = False
        run_opts = RunOptions(recipe=opts.recipe, out=out, overwrite=opts.overwrite, skip_verify=report is None,
                              progress=opts.progress)
        _export(p, loaded, out, run_opts, manifest, report, protect=_protected(p))
    how = "streamed" if manifest.get("streamed") else "in memory"
    console.print(f"[green]exported[/] {out} ({how}, {count(len(manifest['matrices']), 'matrix', 'matrices')}, "
                  f"{manifest['totals']['bytes_saved'] / 2**20:.2f} MiB saved)")
    return RunResult(out=out, report=report, manifest=manifest)


def _export(p: Plan, loaded, out: Path, opts: RunOptions, manifest: dict, report: dict | None,
            protect: list[Path]) -> None:
    """Write every export format into a temporary folder, then rename it to ``out``."""
    from .atomic import write_text
    from .policy import atomic_folder
    from .export.dtype import cast_for_export
    from .export.safetensors import write_checkpoint

    recipe, text = p.recipe, p.yaml_text
    cast_for_export(loaded.model, recipe.export.dtype, manifest)  # after verify: numbers are the loaded dtype's
    with atomic_folder(out, overwrite=opts.overwrite, protect=protect) as tmp:
        with status("writing safetensors", opts.progress):
            write_checkpoint(
                loaded.model, loaded.tokenizer, tmp, recipe_yaml=text, manifest=manifest,
                max_shard_size=recipe.export.max_shard_size,
            )
        if "onnx" in recipe.export.formats:
            from .export.onnx import export_onnx

            with status("exporting ONNX and checking parity with onnxruntime", opts.progress), \
                    _no_stdout(not opts.progress):  # torch.onnx prints its "[torch.onnx] ..." steps
                manifest["onnx"] = export_onnx(
                    loaded.model, loaded.tokenizer, tmp / "onnx", with_past=recipe.export.onnx_with_past,
                    tolerance=recipe.export.onnx_tolerance,
                )
                _under_onnx_folder(manifest["onnx"])
            console.print(
                f"ONNX parity: max |Δlogits| {manifest['onnx']['max_abs_diff']:.2e} "
                f"≤ {manifest['onnx']['tolerance']:.0e} (onnxruntime vs torch, padded batch + decode step)"
            )
        if "gguf" in recipe.export.formats:
            _export_gguf(p, loaded, tmp, manifest, opts.progress)
        if report is not None:
            _write_json(tmp / "verify_report.json", report)
        _write_json(tmp / "manifest.json", manifest)
        from .export.card import render_card

        recipe_dict = recipe.model_dump(mode="json")
        if opts.repo_id:  # the card's loading snippet names the repo the export is pushed to
            recipe_dict["export"]["hub"] = {"repo_id": opts.repo_id, "private": bool(opts.private)}
        card = render_card(
            recipe_dict, text, manifest, report,
            skip_verify=bool(opts.skip_verify and recipe.claims is not None), folder=out,
        )
        write_text(tmp / "README.md", str(card))


def _under_onnx_folder(info: dict) -> None:
    """The ONNX files live in ``onnx/`` (the layout transformers.js and optimum expect)."""
    for key in ("file", "external_data"):
        if info.get(key):
            info[key] = f"onnx/{info[key]}"


def _export_gguf(p: Plan, loaded, tmp: Path, manifest: dict, progress: bool = True) -> None:
    from .export.gguf import write_gguf

    import torch
    import transformers

    auto = getattr(transformers, p.family.auto_class)
    source = Path(p.source.location) / p.source.gguf_file if p.source.gguf_file else None
    with status("writing GGUF and checking it against the safetensors export", progress):
        reference = auto.from_pretrained(tmp, dtype=torch.float32).eval()  # the export as written
        manifest["gguf"] = write_gguf(loaded.model, tmp / f"{p.recipe.name}.gguf", arch=p.family.gguf_arch,
                                      dtype=manifest["export_dtype"], source_gguf=source, name=p.recipe.name,
                                      reference=reference, tokenizer=loaded.tokenizer,
                                      quantized=p.recipe.export.gguf_types, provenance=manifest.get("model"))


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
