"""``laser-export`` command line.

    laser-export RECIPE [--out DIR] [options]   run the recipe: reduce → verify → export (→ push)
    laser-export check RECIPE [RECIPE ...]      validate recipes without loading weights
    laser-export verify RECIPE [--limit N]      measure baseline and reduced, compare with the claims
    laser-export push FOLDER --repo-id ORG/NAME push an existing export (retry after a failed push)
    laser-export apply RECIPE --out DIR         reduce + export a verified recipe, shard by shard (no scoring)
    laser-export search --model SRC --benchmark NAME --out recipe.yaml

Exit codes: 0 success; 1 a claim, parity check or push failed; 2 bad input (recipe, source, data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .pipeline import console

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _input_errors() -> tuple[type[BaseException], ...]:
    from .architectures import ArchitectureError
    from .recipe import RecipeError
    from .sources import SourceError

    errors: list[type[BaseException]] = [RecipeError, SourceError, ArchitectureError]
    try:
        from .benchmarks import BenchmarkError

        errors.append(BenchmarkError)
    except ImportError:
        pass
    return tuple(errors)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_verify_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="score the reduced model with full forwards instead of replaying from the reduced layer")


def cmd_check(args) -> int:
    from .pipeline import plan
    from .recipe import load_recipe

    status = EXIT_OK
    for path in args.recipes:
        try:
            recipe, text = load_recipe(path)
            p = plan(recipe, text, weights_free=True)
        except _input_errors() as err:
            console.print(f"[red]✗[/] {err}")
            status = EXIT_BAD_INPUT
            continue
        how = "recipe hints" if p.config_from_hints else "model config"
        console.print(
            f"[green]✓[/] {path}: {p.family.name}, {len(p.targets)} matrices "
            f"({', '.join(f'L{t.layer}.{t.alias}' for t in p.targets)}), checked against the {how}"
        )
    return status


def cmd_run(args) -> int:
    from .runner import run_recipe

    return run_recipe(args)


def cmd_verify(args) -> int:
    from .runner import verify_only

    return verify_only(args)


def cmd_push(args) -> int:
    from .runner import push_existing

    return push_existing(args)


def cmd_apply(args) -> int:
    from .export.safetensors import ExportError
    from .stream import ApplyOptions, StreamError, apply_recipe

    opts = ApplyOptions(out=Path(args.out) if args.out else None, overwrite=args.overwrite,
                        report=Path(args.report) if args.report else None, in_memory=args.in_memory,
                        progress=not args.no_progress)
    try:
        manifest = apply_recipe(args.recipe, opts)
    except (StreamError, ExportError) as err:
        console.print(f"[red]error:[/] {err}")
        return EXIT_BAD_INPUT
    how = "streamed" if manifest.get("streamed") else "in memory"
    console.print(f"[green]exported[/] {opts.out or Path('out') / manifest['recipe']} ({how}, "
                  f"{manifest['totals']['n_matrices']} matrices, {manifest['totals']['bytes_saved'] / 2**20:.2f} MiB saved)")
    return EXIT_OK


def cmd_search(args) -> int:
    from .search import main as search_main

    return search_main(args)


def build_parser() -> dict[str, argparse.ArgumentParser]:
    run = argparse.ArgumentParser(prog="laser-export", description="Run a LASER recipe: reduce, verify, export.")
    run.add_argument("recipe", help="recipe YAML")
    run.add_argument("--out", help="export folder (default: out/<recipe name>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    run.add_argument("--skip-verify", action="store_true", help="export without verifying the claims (stated on the model card)")
    run.add_argument("--limit", type=int, help="score only N examples (quick look; can never satisfy a claim)")
    run.add_argument("--report", help="where to write the verify report JSON (default: inside the export)")
    run.add_argument("--push", action="store_true", help="push the export to the Hub after writing it")
    run.add_argument("--repo-id", help="Hub repo (overrides export.hub.repo_id)")
    run.add_argument("--private", action="store_true", help="create the Hub repo private")
    run.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    run.add_argument("--stream", action="store_true",
                     help="with --skip-verify: reduce shard by shard from a safetensors source (model never whole "
                     "in memory; same output)")
    _add_common(run)
    _add_verify_opts(run)

    apply_ = argparse.ArgumentParser(
        prog="laser-export apply",
        description="Reduce and export an already-verified recipe without scoring: shard by shard from a safetensors "
        "source (bounded memory, models larger than RAM), in memory otherwise (GGUF source, ONNX, device_map).")
    apply_.add_argument("recipe", help="recipe YAML")
    apply_.add_argument("--out", help="export folder (default: out/<recipe name>)")
    apply_.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    apply_.add_argument("--report", help="verify report JSON of this recipe (claims passed), carried to the card")
    apply_.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming")
    _add_common(apply_)

    check = argparse.ArgumentParser(prog="laser-export check", description="Validate recipes without loading weights.")
    check.add_argument("recipes", nargs="+")

    verify = argparse.ArgumentParser(prog="laser-export verify", description="Check a recipe's claims on its split.")
    verify.add_argument("recipe")
    verify.add_argument("--limit", type=int, help="score only N examples (reported; cannot satisfy a claim)")
    verify.add_argument("--report", help="report JSON path (default: reports/<name>.verify.json)")
    _add_common(verify)
    _add_verify_opts(verify)

    push = argparse.ArgumentParser(prog="laser-export push", description="Push an export folder to the Hub.")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--endpoint")

    search = argparse.ArgumentParser(
        prog="laser-export search",
        description="Sweep (layer, matrix, rho) on the validation split, compose greedily, score the choice on "
        "test and write a recipe (plus <out>.sweep.json, <out>.sweep.png and a resumable <out>.search.jsonl).",
    )
    search.add_argument("--model", help="model source (as model.source in a recipe)")
    search.add_argument("--benchmark", help="benchmark name (as benchmark.name)")
    search.add_argument("--template", help="recipe to take model/benchmark/storage/export/comments from; "
                        "its interventions and claims are replaced")
    search.add_argument("--benchmark-path", help="benchmark data file or archive")
    search.add_argument("--subsample", type=int, help="draw N examples (seeded) before splitting")
    search.add_argument("--max-examples", type=int, help="sweep on only the first N validation examples")
    search.add_argument("--layers", help="e.g. 20-29 or 24,26,28 (default: last third)")
    search.add_argument("--matrices", default="fc_in,fc_up,fc_out", help="aliases or groups, comma separated")
    search.add_argument("--rhos", default="0.01,0.05,0.1,0.25", help="comma separated fractions of rank kept")
    search.add_argument("--seed", type=int, help="split seed (default 0)")
    search.add_argument("--validation-fraction", type=float, help="default 0.2")
    search.add_argument("--batch-size", type=int, help="default 32")
    search.add_argument("--storage", choices=["dense", "factorised"], help="default dense (or the template's)")
    search.add_argument("--compose", type=int, default=3, help="max interventions stacked greedily (1: no stacking)")
    search.add_argument("--compose-tries", type=int, default=6, help="max stacking attempts")
    search.add_argument("--rank-by-snr", action="store_true", help="sweep matrices in order of data-free SNR")
    search.add_argument("--prune-snr", type=float, help="sweep only the top FRACTION of matrices by SNR")
    search.add_argument("--tolerance", type=float, default=0.005, help="claims tolerance written to the recipe")
    search.add_argument("--skip-test", action="store_true", help="no test scoring (writes sweep files, no recipe)")
    search.add_argument("--results", help="JSONL of candidate results (resumable; default next to --out)")
    search.add_argument("--name", help="recipe name (default: template's, else from --out)")
    search.add_argument("--out", required=True, help="recipe YAML to write")
    _add_common(search)
    return {"run": run, "check": check, "verify": verify, "push": push, "search": search, "apply": apply_}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = build_parser()
    commands = {"check": cmd_check, "verify": cmd_verify, "push": cmd_push, "search": cmd_search, "apply": cmd_apply}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return EXIT_OK if argv else EXIT_BAD_INPUT
    name = argv[0] if argv[0] in commands else "run"
    args = parsers[name].parse_args(argv[1:] if name != "run" else argv)
    try:
        return (commands.get(name) or cmd_run)(args)
    except _input_errors() as err:
        console.print(f"[red]error:[/] {err}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
