"""``laser-export`` command line: the only module that reads argparse, prints errors and picks exit codes.

    laser-export run RECIPE [--out DIR] [options]   run the recipe: reduce → verify → export (→ push)
    laser-export RECIPE [--out DIR] [options]       the same (`run` may be left out)
    laser-export check RECIPE [RECIPE ...]          validate recipes without loading weights
    laser-export verify RECIPE [--limit N]          measure baseline and reduced, compare with the claims
    laser-export push FOLDER --repo-id ORG/NAME     push an existing export (retry after a failed push)
    laser-export apply RECIPE [--out DIR]           reduce + export a verified recipe, shard by shard (no scoring)
    laser-export search --model SRC --benchmark NAME --out recipe.yaml
    laser-export scan SOURCE --out scan.json        data-free spectrum scan (SNR, MP edge, auto rank) + heatmap

`laser-export COMMAND --help` lists a command's options. `--debug` (any command) shows the traceback
of an unexpected error.

Exit codes: 0 success; 1 a claim, the ONNX parity check or the push failed, or an unexpected error;
2 bad input (recipe, model source, data, output folder); 130 interrupted.

Importing this module imports neither torch nor transformers (so `--help` is instant); the library
is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError, exit_code_for

COMMANDS = ("run", "check", "verify", "push", "apply", "search", "scan")


def _say(text: str) -> None:
    """Print an error line on stderr: the first word in red (rich, markup-safe, once a command has
    loaded it), else plain."""
    mod = sys.modules.get("laser_export.pipeline")
    if mod is None:
        print(text, file=sys.stderr)
        return
    from rich.markup import escape

    head, _, rest = text.partition(" ")
    mod.console.print(f"[red]{escape(head)}[/] {escape(rest)}")


# ------------------------------------------------------------------------------------------ arg types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _layers(text: str) -> str:
    """``--layers`` syntax (20-29, 24,26,28, -4); a range must not be empty. Bounds are checked by search."""
    import re

    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m and int(m[1]) > int(m[2]):
            raise argparse.ArgumentTypeError(f"range {part!r} is empty (write LOW-HIGH, e.g. {m[2]}-{m[1]})")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit 2 (its own default prints usage too)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------- parsers


def _hub_timeout_default() -> float:
    import os

    try:
        return float(os.environ.get("LASER_EXPORT_HUB_TIMEOUT") or 60.0)
    except ValueError:
        return 60.0


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or spinners (ours, transformers' and huggingface_hub's)")


def _add_verify_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="score only the first N examples of the split (reported; can never satisfy a claim)")
    p.add_argument("--report", type=Path, metavar="PATH",
                   help="verify report JSON (default: reports/<name>.verify.json; a run also copies it into the export)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="score the reduced model with full forwards instead of replaying from the lowest reduced layer")
    p.add_argument("--no-cache", action="store_true",
                   help="score the baseline again instead of reading it from the baseline cache "
                   "(~/.cache/laser-export/baselines, or $LASER_EXPORT_BASELINE_CACHE)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the source, check the recipe, output folder and data, print what would be "
                        "written; load no weights and write nothing")
    _add_progress(p)


def _add_hub_opts(p: argparse.ArgumentParser, *, required_repo: bool) -> None:
    p.add_argument("--repo-id", required=required_repo, metavar="ORG/NAME",
                   help="Hub repo to push to" + ("" if required_repo else " (overrides export.hub.repo_id)"))
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--hub-timeout", type=_positive_float, default=_hub_timeout_default(), metavar="SECONDS",
                   help="timeout of each Hub request, connect and read (default 60, or LASER_EXPORT_HUB_TIMEOUT)")


def build_parser() -> dict[str, argparse.ArgumentParser]:
    run = _Parser(prog="laser-export run", description="Run a LASER recipe: reduce, verify the claims, export "
                  "(and push). `laser-export RECIPE` is the same command.")
    run.add_argument("recipe", type=Path, help="recipe YAML")
    run.add_argument("--out", type=Path, metavar="DIR", help="export folder (default: out/<recipe name>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace DIR when it holds a laser-export export (its manifest.json); any other "
                          "non-empty folder, the working directory, home and the source are never replaced")
    run.add_argument("--skip-verify", action="store_true",
                     help="export without verifying the claims (the model card says NOT verified)")
    run.add_argument("--push", action="store_true", help="push the export to the Hub after writing it")
    run.add_argument("--stream", action="store_true",
                     help="with --skip-verify (or a recipe without claims): reduce shard by shard from a safetensors "
                          "source, the model never whole in memory; same files as the in-memory export")
    _add_hub_opts(run, required_repo=False)
    _add_verify_opts(run)

    apply_ = _Parser(prog="laser-export apply",
                     description="Reduce and export an already-verified recipe without scoring: shard by shard from "
                     "a safetensors source (bounded memory, models larger than RAM), in memory otherwise (GGUF "
                     "source, ONNX/GGUF formats, device_map).")
    apply_.add_argument("recipe", type=Path, help="recipe YAML")
    apply_.add_argument("--out", type=Path, metavar="DIR", help="export folder (default: out/<recipe name>)")
    apply_.add_argument("--overwrite", action="store_true",
                        help="replace DIR when it holds a laser-export export (same rules as run)")
    apply_.add_argument("--report", type=Path, metavar="PATH",
                        help="the passing verify report of this recipe, carried into the export and the card")
    apply_.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming")
    _add_progress(apply_)

    check = _Parser(prog="laser-export check", description="Validate recipes without loading weights.")
    check.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE", help="recipe YAML files")

    verify = _Parser(prog="laser-export verify", description="Check a recipe's claims on its split "
                     "(baseline and reduced); exit 1 if a claim fails.")
    verify.add_argument("recipe", type=Path, help="recipe YAML")
    _add_verify_opts(verify)

    push = _Parser(prog="laser-export push", description="Push an export folder to the Hub as one commit "
                   "(also the retry after a failed --push).")
    push.add_argument("folder", type=Path, help="export folder (written by a run)")
    _add_hub_opts(push, required_repo=True)

    search = _Parser(
        prog="laser-export search",
        description="Sweep (layer, matrix, rho) on the validation split, compose greedily, score the choice on "
        "test and write a recipe (plus <out>.sweep.json, <out>.sweep.png and a resumable <out>.search.jsonl).",
    )
    search.add_argument("--model", help="model source (as model.source in a recipe)")
    search.add_argument("--benchmark", help="benchmark name (as benchmark.name); a,b,...: several tasks at once, "
                        "objective the mean paired top-1 gain, the first the primary (the recipe's benchmark)")
    search.add_argument("--task-weights", help="weights of the tasks of --benchmark a,b (default equal)")
    search.add_argument("--template", help="recipe to take model (revision, dtype, device, trust_remote_code), "
                        "benchmark, storage, reduction and export from; its name, comments, interventions and "
                        "claims are replaced")
    search.add_argument("--benchmark-path", help="benchmark data file or archive (several tasks: comma separated, "
                        "in --benchmark order, empty for a task's default)")
    search.add_argument("--subsample", type=_positive_int, help="draw N examples (seeded) before splitting")
    search.add_argument("--max-examples", type=_positive_int, help="sweep on only the first N validation examples")
    search.add_argument("--layers", type=_layers, help="e.g. 20-29 or 24,26,28 (default: last third)")
    search.add_argument("--matrices", default="fc_in,fc_up,fc_out", help="aliases or groups, comma separated")
    search.add_argument("--rhos", default="0.01,0.05,0.1,0.25",
                        help="comma separated fractions of rank kept; auto: the Marchenko-Pastur rank")
    search.add_argument("--seed", type=int, help="split seed (default 0)")
    search.add_argument("--validation-fraction", type=_fraction, help="in (0, 1); default 0.2")
    search.add_argument("--batch-size", type=_positive_int, help="default 32")
    search.add_argument("--storage", choices=["dense", "factorised"], help="default dense (or the template's)")
    search.add_argument("--compose", type=_positive_int, default=3, help="max interventions stacked greedily (1: no stacking)")
    search.add_argument("--compose-tries", type=_positive_int, default=6, help="max stacking attempts")
    search.add_argument("--rank-by-snr", action="store_true", help="sweep matrices in order of data-free SNR")
    search.add_argument("--prune-snr", type=_unit_interval, help="sweep only the top FRACTION of matrices by SNR")
    search.add_argument("--tolerance", type=_non_negative_float, default=0.005, help="claims tolerance written to the recipe")
    search.add_argument("--skip-test", action="store_true", help="no test scoring (writes sweep files, no recipe)")
    search.add_argument("--results", help="JSONL of candidate results (resumable; default next to --out)")
    search.add_argument("--name", help="recipe name (default: <model>-<benchmark>)")
    search.add_argument("--plot-metric", choices=["top1", "logloss", "both"], default="both",
                        help="heatmap panels: Δ top-1, Δ validation log-loss (the paper's Figure 1), or both")
    search.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="score candidates on Ray actors (one per GPU, else 2 CPU workers); without ADDRESS "
                        "a local Ray (or RAY_ADDRESS); needs pip install 'laser-export[ray]'")
    search.add_argument("--ray-workers", type=_positive_int, help="number of Ray actors (default: one per GPU, else 2)")
    search.add_argument("--svd-cache-gb", type=_non_negative_float, default=2.0, metavar="GB",
                        help="memory budget of the SVD cache; least recently used matrices are dropped first "
                        "and recomputed when needed again (default 2)")
    search.add_argument("--strategy", choices=["grid", "halving"], default="grid",
                        help="grid: every candidate on every validation example; halving: successive halving "
                        "(all candidates on a small random part, the best 1/ETA on a part ETA times larger, ...)")
    search.add_argument("--eta", type=_positive_int, default=3, help="halving rate (default 3)")
    search.add_argument("--from-scan", metavar="SCAN_JSON",
                        help="order the matrices by the SNR of a `laser-export scan` (and --prune-snr by it)")
    search.add_argument("--out", required=True, help="recipe YAML to write")
    _add_progress(search)
    scan = _Parser(prog="laser-export scan", description="Data-free spectrum scan, one matrix at a time without "
                   "loading the model: top singular values, Marchenko-Pastur edge, SNR, auto rank, energy kept per rho "
                   "(JSON, plus a PNG heatmap of SNR by layer x matrix next to it).")
    scan.add_argument("source", help="model source: safetensors folder, Hub id[@revision] or .gguf file")
    scan.add_argument("--layers", type=_layers, help="e.g. 20-29 or 24,26,28 (default: every layer)")
    scan.add_argument("--matrices", default="mlp,attn", help="aliases or groups, comma separated (default: mlp,attn)")
    scan.add_argument("--out", required=True, help="scan JSON to write (the heatmap is <out stem>.png)")
    _add_progress(scan)
    return {"run": run, "check": check, "verify": verify, "push": push, "search": search, "apply": apply_,
            "scan": scan}


# ------------------------------------------------------------------------------------------- commands


def cmd_check(args) -> int:
    from rich.markup import escape

    from .pipeline import console, plan
    from .recipe import load_recipe

    status = EXIT_OK
    for path in args.recipes:
        try:
            recipe, text = load_recipe(path)
            p = plan(recipe, text, weights_free=True)
        except InputError as err:
            console.print(f"[red]✗[/] {escape(str(err))}")
            status = EXIT_BAD_INPUT
            continue
        how = "recipe hints" if p.config_from_hints else "model config"
        console.print(
            f"[green]✓[/] {escape(str(path))}: {p.family.name}, {len(p.targets)} matrices "
            f"({', '.join(f'L{t.layer}.{t.alias}' for t in p.targets)}), checked against the {how}"
        )
    return status


def _print_planned(result) -> None:
    from rich.markup import escape

    from .pipeline import console

    for line in result.planned:
        console.print(escape(line))
    console.print("dry run: no weights loaded, nothing written")


def cmd_run(args) -> int:
    from .runner import RunOptions, run

    opts = RunOptions(
        recipe=args.recipe, out=args.out, overwrite=args.overwrite, skip_verify=args.skip_verify,
        limit=args.limit, report=args.report, push=args.push, repo_id=args.repo_id, private=args.private,
        endpoint=args.endpoint, hub_timeout=args.hub_timeout, progress=not args.no_progress,
        prefix_cache=not args.no_prefix_cache, baseline_cache=not args.no_cache, dry_run=args.dry_run,
        stream=args.stream,
    )
    result = run(opts)
    if opts.dry_run:
        _print_planned(result)
    return EXIT_OK


def cmd_verify(args) -> int:
    from .runner import VerifyOptions, verify

    opts = VerifyOptions(recipe=args.recipe, limit=args.limit, report=args.report, progress=not args.no_progress,
                         prefix_cache=not args.no_prefix_cache, baseline_cache=not args.no_cache,
                         dry_run=args.dry_run)
    result = verify(opts)
    if opts.dry_run:
        _print_planned(result)
    return EXIT_OK


def cmd_push(args) -> int:
    from .runner import PushOptions, push

    push(PushOptions(folder=args.folder, repo_id=args.repo_id, private=args.private, endpoint=args.endpoint,
                     hub_timeout=args.hub_timeout))
    return EXIT_OK


def cmd_apply(args) -> int:
    from .runner import ApplyOptions, apply

    apply(ApplyOptions(recipe=args.recipe, out=args.out, overwrite=args.overwrite, report=args.report,
                       in_memory=args.in_memory, progress=not args.no_progress))
    return EXIT_OK


def cmd_search(args) -> int:
    from dataclasses import fields

    from .search import SearchOptions, search

    names = {f.name for f in fields(SearchOptions)} - {"progress"}
    search(SearchOptions(**{k: v for k, v in vars(args).items() if k in names}, progress=not args.no_progress))
    return EXIT_OK


def cmd_scan(args) -> int:
    from .pipeline import console
    from .scan import ScanOptions, scan

    result = scan(ScanOptions(source=args.source, out=args.out, layers=args.layers, matrices=args.matrices,
                              progress=not args.no_progress))
    console.print(f"wrote {args.out} ({len(result['matrices'])} matrices) and {result.get('plot')}")
    return EXIT_OK


HANDLERS = {"run": cmd_run, "check": cmd_check, "verify": cmd_verify, "push": cmd_push, "apply": cmd_apply,
            "search": cmd_search, "scan": cmd_scan}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `laser-export --help | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return EXIT_OK if argv else EXIT_BAD_INPUT
    if argv[0] == "--version":
        from . import __version__

        print(f"laser-export {__version__}")
        return EXIT_OK
    name = argv[0] if argv[0] in COMMANDS else "run"
    rest = argv[1:] if argv[0] in COMMANDS else argv
    try:
        args = build_parser()[name].parse_args(rest)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed
        return int(stop.code or 0)
    if getattr(args, "no_progress", False):
        from .progress import quiet_third_party_bars

        quiet_third_party_bars()
    from ._warnings import quiet_third_party

    quiet_third_party()
    try:
        return HANDLERS[name](args)
    except KeyboardInterrupt:
        _say("interrupted: nothing was replaced (a partial export is removed)")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
        code = exit_code_for(err)
        if code is not None:
            _say(f"{err.label} {err}")
            return code
        if debug:
            import traceback

            traceback.print_exc()
        msg = " ".join(str(err).split())
        _say(f"error: unexpected {type(err).__name__}: {msg[:500]} (rerun with --debug for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
