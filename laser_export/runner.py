"""The commands behind the CLI: run a recipe end to end, verify only, push an existing export."""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline import Plan, build_manifest, console, load_model, plan, reduce_loaded
from .recipe import load_recipe

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _select(p: Plan, args):
    """Load the benchmark data before the weights, so a data problem fails fast."""
    from .verify import check_scorable, select_examples

    check_scorable(p)
    with console.status(f"loading benchmark {p.recipe.benchmark.name}"):
        return select_examples(p, args.limit)


def _verify(p: Plan, loaded, args, selected):
    from .verify import print_report, verify_loaded

    report = verify_loaded(p, loaded, limit=args.limit, progress=not args.no_progress, selected=selected,
                           prefix_cache=not args.no_prefix_cache)
    print_report(report)
    return report


def run_recipe(args) -> int:
    recipe, text = load_recipe(args.recipe)
    p = plan(recipe, text)
    out = Path(args.out or Path("out") / recipe.name)
    hub = recipe.export.hub
    repo_id = args.repo_id or (hub.repo_id if hub else None)
    if args.push and not repo_id:
        console.print("[red]error:[/] --push needs a repo: set export.hub.repo_id in the recipe or pass --repo-id")
        return EXIT_BAD_INPUT
    console.print(f"[bold]{recipe.name}[/]: {p.family.name} from {p.source.describe()}, {len(p.targets)} matrices, {recipe.storage}")

    verifying = recipe.claims is not None and not args.skip_verify
    if getattr(args, "stream", False):
        return _run_streamed(p, out, args, verifying, repo_id, hub)
    selected = _select(p, args) if verifying else None
    loaded = load_model(p)
    report = None
    if verifying:
        report = _verify(p, loaded, args, selected)  # scores baseline, reduces in place, scores reduced
        report_path = Path(args.report) if args.report else Path("reports") / f"{recipe.name}.verify.json"
        _write_json(report_path, report)
        console.print(f"verify report: {report_path}")
        if not report["passed"]:
            console.print("[red]claims do not hold: nothing exported[/] (see the report; --skip-verify exports anyway)")
            return EXIT_FAILED
    else:
        reduce_loaded(p, loaded, progress=not args.no_progress)
        if recipe.claims is not None:
            console.print("[yellow]--skip-verify: claims NOT verified; the model card will say so[/]")

    manifest = build_manifest(p, loaded.entries)
    from .export.onnx import OnnxExportError

    try:
        _export(p, loaded, out, args, manifest, report)
    except OnnxExportError as err:
        console.print(f"[red]ONNX export failed, nothing exported:[/] {err}")
        return EXIT_FAILED
    saved = manifest["totals"]["bytes_saved"]
    console.print(f"[green]exported[/] {out} ({len(loaded.entries)} matrices, {saved / 2**20:.2f} MiB saved)")

    if args.push:
        return _push(out, repo_id, private=args.private or bool(hub and hub.private), endpoint=args.endpoint)
    return EXIT_OK


def _run_streamed(p: Plan, out: Path, args, verifying: bool, repo_id, hub) -> int:
    """``run --stream``: shard-by-shard reduction and export (see laser_export.stream)."""
    from .stream import StreamExportOptions, export_streamed, streamable

    if verifying:
        console.print("[red]error:[/] --stream does not load the model, so it cannot verify claims: add --skip-verify "
                      "(or run `laser-export verify` then `laser-export apply`)")
        return EXIT_BAD_INPUT
    reason = streamable(p)
    if reason is not None:
        console.print(f"[red]error:[/] --stream: {reason}")
        return EXIT_BAD_INPUT
    manifest = export_streamed(p, StreamExportOptions(
        out, overwrite=args.overwrite, skip_verify=bool(args.skip_verify), repo_id=args.repo_id,
        private=bool(args.private), progress=not args.no_progress))
    if p.recipe.claims is not None:
        console.print("[yellow]--skip-verify: claims NOT verified; the model card will say so[/]")
    console.print(f"[green]exported[/] {out} (streamed, {len(manifest['matrices'])} matrices, "
                  f"{manifest['totals']['bytes_saved'] / 2**20:.2f} MiB saved)")
    if args.push:
        return _push(out, repo_id, private=args.private or bool(hub and hub.private), endpoint=args.endpoint)
    return EXIT_OK


def _export(p: Plan, loaded, out: Path, args, manifest: dict, report: dict | None) -> None:
    """Write every export format into a temporary folder, then rename it to ``out``."""
    from .export.safetensors import atomic_folder, write_checkpoint

    recipe, text = p.recipe, p.yaml_text
    with atomic_folder(out, overwrite=args.overwrite) as tmp:
        with console.status("writing safetensors"):
            write_checkpoint(
                loaded.model, loaded.tokenizer, tmp, recipe_yaml=text, manifest=manifest,
                max_shard_size=recipe.export.max_shard_size,
            )
        if "onnx" in recipe.export.formats:
            from .export.onnx import export_onnx

            with console.status("exporting ONNX and checking parity with onnxruntime"):
                manifest["onnx"] = export_onnx(
                    loaded.model, loaded.tokenizer, tmp, with_past=recipe.export.onnx_with_past,
                    tolerance=recipe.export.onnx_tolerance,
                )
            console.print(
                f"ONNX parity: max |Δlogits| {manifest['onnx']['max_abs_diff']:.2e} "
                f"≤ {manifest['onnx']['tolerance']:.0e} (onnxruntime vs torch, padded batch + decode step)"
            )
        if report is not None:
            _write_json(tmp / "verify_report.json", report)
        _write_json(tmp / "manifest.json", manifest)
        from .export.card import render_card

        recipe_dict = recipe.model_dump(mode="json")
        if args.repo_id:  # the card's loading snippet names the repo the export is pushed to
            recipe_dict["export"]["hub"] = {"repo_id": args.repo_id, "private": bool(args.private)}
        card = render_card(
            recipe_dict, text, manifest, report,
            skip_verify=bool(args.skip_verify and recipe.claims is not None),
        )
        (tmp / "README.md").write_text(str(card))


def _push(folder: Path, repo_id: str, *, private: bool, endpoint: str | None) -> int:
    from .export.hub import PushError, push_folder

    try:
        url = push_folder(folder, repo_id, private=private, endpoint=endpoint)
    except PushError as err:
        console.print(f"[red]push failed:[/] {err}")
        return EXIT_FAILED
    console.print(f"[green]pushed[/] {url}")
    return EXIT_OK


def push_existing(args) -> int:
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        console.print(f"[red]error:[/] {folder} is not an export folder (no config.json)")
        return EXIT_BAD_INPUT
    return _push(folder, args.repo_id, private=args.private, endpoint=args.endpoint)


def verify_only(args) -> int:
    recipe, text = load_recipe(args.recipe)
    if recipe.claims is None:
        console.print(f"[red]error:[/] {args.recipe}: claims: the recipe makes no claims to verify")
        return EXIT_BAD_INPUT
    p = plan(recipe, text)
    selected = _select(p, args)
    loaded = load_model(p)
    report = _verify(p, loaded, args, selected)
    path = Path(args.report) if args.report else Path("reports") / f"{recipe.name}.verify.json"
    _write_json(path, report)
    console.print(f"report: {path}")
    return EXIT_OK if report["passed"] else EXIT_FAILED
