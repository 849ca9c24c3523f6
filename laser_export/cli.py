"""``laser-export`` command line: argparse, error lines and exit codes (no other module reads argparse
or picks an exit code). The flags of every command are generated from the fields of its options
dataclass (:mod:`laser_export.options`): one source of truth for
flags, defaults, help and validation.

Importing this module imports neither torch nor transformers (so ``--help`` is instant), and every
output path and environment setting is checked before the library (torch) is imported.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError, exit_code_for

USAGE = """\
usage: laser-export COMMAND [ARGS] [--debug]

LASER (layer-selective rank reduction): reduce transformer weight matrices, verify the recipe's
claims, export to safetensors/ONNX/GGUF and push to the Hugging Face Hub.

commands:
  run RECIPE [--out DIR]         reduce -> verify the claims -> export (-> push); `laser-export RECIPE`
                                 is the same command
  check RECIPE [RECIPE ...]      validate recipes without loading weights
  verify RECIPE [--limit N]      measure baseline and reduced on the split, compare with the claims
  apply RECIPE [--out DIR]       reduce + export a verified recipe shard by shard (no scoring)
  push FOLDER --repo-id ORG/NAME push an export folder (also the retry after a failed --push)
  search --model SRC --benchmark NAME --out RECIPE
                                 sweep (layer, matrix, rho), compose, write a recipe
  scan SOURCE --out SCAN_JSON    data-free spectrum scan, one matrix at a time without loading the model

`laser-export COMMAND --help` lists a command's options and defaults. --debug (any command) shows the
traceback of an unexpected error. --version prints the version.

exit codes: 0 success; 1 a check failed (a claim, ONNX/GGUF parity, an export read-back, the push)
or an unexpected error; 2 bad input (recipe, model source, data, output path, option, environment
setting), answered before any weights load; 130 interrupted.
"""

COMMANDS = ("run", "check", "verify", "push", "apply", "search", "scan")
DESCRIPTIONS = {
    "run": "Run a LASER recipe: reduce, verify the claims, export (and push). `laser-export RECIPE` is the "
           "same command.",
    "apply": "Reduce and export an already-verified recipe without scoring: shard by shard from a safetensors "
             "source (bounded memory, models larger than RAM), in memory otherwise (GGUF source, ONNX/GGUF "
             "formats, device_map).",
    "check": "Validate recipes without loading weights.",
    "verify": "Check a recipe's claims on its split (baseline and reduced); exit 1 if a claim fails.",
    "push": "Push an export folder to the Hub as one commit (also the retry after a failed --push).",
    "search": "Sweep (layer, matrix, rho) on the validation split, compose greedily, score the choice on test "
              "and write a recipe (plus <out>.sweep.json, <out>.sweep.png and a resumable <out>.search.jsonl).",
    "scan": "Data-free spectrum scan, one matrix at a time without loading the model (safetensors shard by shard, "
            "GGUF tensor by tensor): top singular values, Marchenko-Pastur edge, SNR, auto rank, energy kept per rho "
            "(JSON, plus a PNG heatmap of SNR by layer x matrix next to it).",
}


def _say(text: str) -> None:
    """Print an error line on stderr: the first word in red (rich, markup-safe, once a command has
    loaded it), else plain."""
    mod = sys.modules.get("laser_export.progress")
    if mod is None:
        print(text, file=sys.stderr)
        return
    from rich.markup import escape

    head, _, rest = text.partition(" ")
    mod.console.print(f"[red]{escape(head)}[/] {escape(rest)}")


# ------------------------------------------------------------------------------------------- parsers


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit 2 (its own default prints usage too)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")

    def print_help(self, file=None):
        """The help, written so that a failed write (``--help > /dev/full``) raises (argparse's own printing
        swallows OSError: the help was lost with exit 0); :func:`main` reports it."""
        out = file or sys.stdout
        out.write(self.format_help())
        out.flush()


def _argtype(check, name: str):
    """An argparse ``type`` from an option's check: its ValueError message becomes the usage error."""

    def convert(text: str):
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def _help(f, meta) -> str:
    text = meta.help
    if f.default not in (None, False, True, MISSING, "") and "default" not in text:
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


def add_fields(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse argument per field of ``cls`` that carries a flag (:func:`laser_export.options.option`)."""
    from .options import flag_name

    for f in fields(cls):
        meta = f.metadata.get("cli")
        if meta is None:
            continue
        kind = Path if "Path" in str(f.type) else None
        conv = _argtype(meta.check, f.name) if meta.check else kind
        if meta.positional:
            parser.add_argument(f.name, type=conv, help=meta.help, metavar=meta.metavar)
        elif f.default is True or f.default is False:
            parser.add_argument(flag_name(f), dest=f.name, action="store_false" if f.default else "store_true",
                                help=meta.help)
        else:
            parser.add_argument(flag_name(f), dest=f.name, type=conv, metavar=meta.metavar, choices=meta.choices,
                                nargs=meta.nargs, const=meta.const, required=f.default is MISSING,
                                default=None if meta.default_from or f.default is MISSING else f.default,
                                help=_help(f, meta))


def options_class(name: str):
    if name == "scan":
        from .scan import ScanOptions

        return ScanOptions
    from . import options

    return {"run": options.RunOptions, "verify": options.VerifyOptions, "apply": options.ApplyOptions,
            "push": options.PushOptions, "search": options.SearchOptions}.get(name)


def build_parser(name: str | None = None):
    """The parser of one command, or (no ``name``) a dict of every command's parser."""
    if name is None:
        return {n: build_parser(n) for n in COMMANDS}
    parser = _Parser(prog=f"laser-export {name}", description=DESCRIPTIONS[name])
    if name == "check":
        parser.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE", help="recipe YAML files")
    else:
        add_fields(parser, options_class(name))
    return parser


# ------------------------------------------------------------------------------------------- commands


def cmd_check(args) -> int:
    from rich.markup import escape

    from .pipeline import plan
    from .progress import console, count
    from .recipe import load_recipe

    status = EXIT_OK
    for path in args.recipes:
        try:
            recipe, text = load_recipe(path)
            p = plan(recipe, text, weights_free=True)
        except InputError as err:
            line = " ".join(str(err).split()) if "\n" not in str(err) else str(err)
            named = line if line.startswith(str(path)) else f"{path}: {line}"
            console.print(f"[red]✗[/] {escape(named)}")
            status = EXIT_BAD_INPUT
            continue
        from .intervene import describe_targets

        how = "recipe hints" if p.config_from_hints else "model config"
        sites = describe_targets(p.targets, p.family)
        # an MoE site from hints: its expert count is not known yet, so these are sites, not matrices
        how_many = f"{len(p.targets)} sites" if "[all experts]" in sites else count(len(p.targets), "matrix", "matrices")
        console.print(
            f"[green]✓[/] {escape(str(path))}: {p.family.name}, {how_many} "
            f"({escape(sites)}), checked against the {how}"
        )
    return status


def _print_planned(result) -> None:
    from rich.markup import escape

    from .progress import console

    for line in result.planned:
        console.print(escape(line))
    console.print("dry run: no weights loaded, nothing written")


def cmd_run(opts) -> int:
    from .policy import precheck

    precheck(opts.recipe, out=opts.out or "", overwrite=opts.overwrite, report=opts.report,
             verifying=not opts.skip_verify)
    from .runner import run

    result = run(opts)
    if opts.dry_run:
        _print_planned(result)
    return EXIT_OK


def cmd_verify(opts) -> int:
    from .policy import precheck

    precheck(opts.recipe, report=opts.report)
    from .runner import verify

    result = verify(opts)
    if opts.dry_run:
        _print_planned(result)
    return EXIT_OK


def cmd_push(opts) -> int:
    from .runner import push

    push(opts)
    return EXIT_OK


def cmd_apply(opts) -> int:
    from .policy import precheck

    precheck(opts.recipe, out=opts.out or "", overwrite=opts.overwrite, verifying=False)  # apply writes no report
    from .runner import apply

    apply(opts)
    return EXIT_OK


def cmd_search(opts) -> int:
    from .search.command import check_outputs, search

    check_outputs(opts)
    search(opts)
    return EXIT_OK


def cmd_scan(opts) -> int:
    from .progress import console
    from .scan import scan

    result = scan(opts)
    console.print(f"wrote {opts.out} ({len(result['matrices'])} matrices) and {result.get('plot')}")
    return EXIT_OK


HANDLERS = {"run": cmd_run, "check": cmd_check, "verify": cmd_verify, "push": cmd_push, "apply": cmd_apply,
            "search": cmd_search, "scan": cmd_scan}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `laser-export --help | head`: the reader left; no traceback
        _quiet_stdout()
        return EXIT_OK
    except OSError as err:  # `--help > /dev/full`: stdout cannot be written
        if err.errno not in (errno.ENOSPC, errno.EIO, errno.EPIPE):
            raise
        _quiet_stdout()
        _say(f"error: cannot write the output: {err.strerror}")
        return EXIT_FAILED


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's own flush at exit raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _parse(argv: list[str]):
    """(command name, parsed arguments or options) or an exit code when argparse already answered."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        sys.stdout.flush()
        return None, EXIT_OK if argv else EXIT_BAD_INPUT
    if argv[0] == "--version":
        from . import __version__

        sys.stdout.write(f"laser-export {__version__}\n")
        sys.stdout.flush()
        return None, EXIT_OK
    name = argv[0] if argv[0] in COMMANDS else "run"
    rest = argv[1:] if argv[0] in COMMANDS else argv
    try:
        args = build_parser(name).parse_args(rest)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed
        sys.stdout.flush()
        return None, int(stop.code or 0)
    return name, args


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    name, args = _parse([a for a in argv if a != "--debug"])
    if name is None:
        return args
    try:
        from .defaults import check_environment
        from .options import from_namespace

        check_environment()  # LASER_EXPORT_* settings: refused now, not after the expensive part
        cls = options_class(name)
        opts = args if cls is None else from_namespace(cls, args)
        if getattr(opts, "progress", True) is False or not sys.stderr.isatty():
            # --no-progress, or output into a file or a pipe: tqdm bars would print a line per refresh there
            from .progress import quiet_third_party_bars

            quiet_third_party_bars()
        from ._warnings import quiet_third_party

        quiet_third_party()
        return HANDLERS[name](opts)
    except KeyboardInterrupt:
        _say("interrupted: nothing was replaced (a partial export is removed)")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
        return _report(err, debug)


def _report(err: Exception, debug: bool) -> int:
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
