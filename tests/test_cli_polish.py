"""CLI polish: `run` subcommand, instant help with a help text for every option (and each in the README),
--no-progress silences every bar, third-party warnings, typed options for the library."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from laser_export.cli import build_parser, main
from tinymodels import save_tiny

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("polish")
    save_tiny("llama", root / "model")
    recipe = {"name": "p", "model": {"source": str(root / "model")},
              "interventions": [{"layer": 1, "matrix": "fc_in", "rho": 0.25}], "storage": "dense"}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root


def test_run_subcommand_and_bare_recipe_are_the_same_command(tiny, tmp_path):
    assert main(["run", str(tiny / "r.yaml"), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main([str(tiny / "r.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["matrices"] == b["matrices"] and a["matrices"][0]["rank"] == 8
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", ["run", "check", "verify", "push", "search"])
def test_every_option_has_help_text(command):
    for action in _options(build_parser()[command]):
        assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)


@pytest.mark.parametrize("command", ["run", "verify", "push"])
def test_every_option_is_in_the_readme(command):
    for action in _options(build_parser()[command]):
        for flag in action.option_strings:
            assert f"`{flag}" in README, (command, flag)


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time, io, contextlib; t = time.perf_counter(); import laser_export.cli as c\n"
            "with contextlib.redirect_stdout(io.StringIO()): rc = c.main(['run', '--help'])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "False", "False"]


def test_import_laser_export_still_registers_the_factorised_loader():
    code = ("import laser_export\nfrom transformers import AutoModelForCausalLM\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\nprint('laser' in AUTO_QUANTIZER_MAPPING)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr[-2000:]


def test_no_progress_silences_transformers_and_hub_bars(tiny, tmp_path, capsys, monkeypatch):
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    enable_progress_bars()
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: third-party bars stay (not a log file)
    assert main([str(tiny / "r.yaml"), "--out", str(tmp_path / "with")]) == 0
    noisy = capsys.readouterr().err
    assert "it/s]" in noisy  # transformers' own tqdm bar ("Writing model shards ...")
    assert main([str(tiny / "r.yaml"), "--out", str(tmp_path / "without"), "--no-progress"]) == 0
    quiet = capsys.readouterr().err
    assert "it/s]" not in quiet and "%|" not in quiet and "exported" in quiet


def test_harmless_third_party_warnings_are_dropped_others_are_one_line():
    code = (
        "import warnings\nfrom laser_export._warnings import quiet_third_party\nquiet_third_party()\n"
        "warnings.warn('torchvision is not installed, some features are off', UserWarning)\n"
        "for _ in range(2):\n    warnings.warn('something   actionable\\nacross lines', UserWarning)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torchvision" not in res.stderr
    assert res.stderr == "warning (UserWarning): something actionable across lines\n"


def test_library_takes_typed_options_not_argparse():
    import inspect

    from laser_export import runner

    for fn, opts in ((runner.run, runner.RunOptions), (runner.verify, runner.VerifyOptions),
                     (runner.push, runner.PushOptions)):
        (param,) = inspect.signature(fn).parameters.values()
        assert param.annotation in (opts, opts.__name__)
    src = Path(runner.__file__).read_text()
    assert "import argparse" not in src and "Namespace" not in src and "EXIT_" not in src and "sys.exit" not in src


def test_library_raises_typed_errors_that_the_cli_maps_to_exit_codes(tiny, tmp_path):
    from laser_export.policy import OutputError
    from laser_export.runner import RunOptions, run

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not a laser-export export"):
        run(RunOptions(recipe=tiny / "r.yaml", out=tmp_path / "x", overwrite=True, progress=False))
    result = run(RunOptions(recipe=tiny / "r.yaml", out=tmp_path / "y", progress=False))
    assert result.out == tmp_path / "y" and result.manifest["matrices"][0]["rank"] == 8


@pytest.mark.slow
def test_onnx_run_with_no_progress_prints_only_our_lines(tiny, tmp_path):
    """torch.onnx's "[torch.onnx] ..." steps, torchvision/TReal registration warnings and transformers'
    deprecation notes are not shown; what is left is laser-export's own summary."""
    recipe = yaml.safe_load((tiny / "r.yaml").read_text())
    recipe["export"] = {"formats": ["safetensors", "onnx"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = subprocess.run([sys.executable, "-m", "laser_export.cli", str(tmp_path / "r.yaml"), "--out",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["p:", "ONNX", "exported"], lines


def test_help_into_a_closed_pipe_is_not_a_traceback():
    """`laser-export --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the writer starts: every write fails with EPIPE
    try:
        res = subprocess.run([sys.executable, "-m", "laser_export", "--help"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 0


# ------------------------------------------------------------------ issue 20: options, usage, first run


def test_usage_text_not_the_developer_docstring(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: laser-export COMMAND")
    assert "exit codes:" in out and "the only module" not in out and "argparse" not in out


def test_search_help_shows_every_default(capsys):
    assert main(["search", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: fc_in,fc_up,fc_out)" in out and "(default: 0.01,0.05,0.1,0.25)" in out
    assert "(default: 3)" in out and "(default: 2.0)" in out


@pytest.mark.parametrize("command", ["run", "verify", "apply", "push", "search"])
def test_flags_are_generated_from_the_option_fields(command):
    """One source of truth: every field of the options dataclass is a flag of the command and back."""
    from dataclasses import fields

    from laser_export.cli import options_class

    cls = options_class(command)
    dests = {a.dest for a in _options(build_parser()[command])}
    assert dests == {f.name for f in fields(cls)}
    for f in fields(cls):
        assert f.metadata["cli"].help, f.name


def test_library_callers_get_the_same_checks_as_the_command_line():
    from laser_export.options import OptionError, RunOptions
    from laser_export.options import SearchOptions

    with pytest.raises(OptionError, match=r"--limit: expected a positive integer, got 0"):
        RunOptions(recipe=Path("r.yaml"), limit=0)
    with pytest.raises(OptionError, match=r"--prune-snr: expected a number in \(0, 1\], got 3"):
        SearchOptions(out="x.yaml", prune_snr=3)
    with pytest.raises(OptionError, match=r"--svd-cache-gb: expected a finite number >= 0, got inf"):
        SearchOptions(out="x.yaml", svd_cache_gb=float("inf"))
    assert main(["search", "--out", "x.yaml", "--prune-snr", "3"]) == 2


def test_each_default_and_check_is_defined_once():
    """--prune-snr is checked in one place; the Hub timeout default is one constant."""
    pkg = Path(__file__).parent.parent / "laser_export"
    sources = {p: p.read_text() for p in pkg.rglob("*.py")}
    assert [p.name for p, t in sources.items() if "HUB_TIMEOUT = " in t or "DEFAULT_TIMEOUT = 60" in t] == ["defaults.py"]
    assert [p.name for p, t in sources.items() if "LASER_EXPORT_HUB_TIMEOUT\")" in t] == []  # read in one place
    assert sum(t.count("unit_interval") for t in sources.values()) == 2  # defined, used by --prune-snr


def test_bad_hub_timeout_setting_is_bad_input_not_a_silent_default(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LASER_EXPORT_HUB_TIMEOUT", "abc")
    assert main(["push", str(tmp_path), "--repo-id", "org/x"]) == 2
    assert "LASER_EXPORT_HUB_TIMEOUT='abc': expected a positive number" in capsys.readouterr().err
    monkeypatch.setenv("LASER_EXPORT_HUB_TIMEOUT", "7")
    from laser_export.cli import options_class
    from laser_export.options import from_namespace

    opts = from_namespace(options_class("push"), build_parser("push").parse_args([str(tmp_path), "--repo-id", "o/x"]))
    assert opts.hub_timeout == 7.0


def test_check_names_the_recipe_file_of_every_error(tmp_path, capsys):
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "gemma-3-270m-q4_k_m-qa-wikidata.yaml").read_text())
    recipe["model"]["source"] = str(tmp_path / "not-installed.gguf")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check", str(tmp_path / "g.yaml")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'g.yaml'}: model.source: GGUF file" in err


def test_refusing_an_existing_out_needs_no_torch(tiny, tmp_path):
    """Bad output paths are answered from the recipe alone: no torch, no model load (was 19 s / 490 MB)."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    code = ("import sys; from laser_export.cli import main\n"
            "rc = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, str(tiny / "r.yaml"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "is not a laser-export export" in res.stderr, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["run", "-h"], ["check", "--help"]])
def test_help_into_a_full_device_is_one_line_not_a_traceback(argv):
    """A command's help (argparse's) was lost with exit 0: argparse swallows the OSError of its own write."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "laser_export", *argv], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 1 and "No space left on device" in res.stderr


def test_counts_are_singular_or_plural():
    from laser_export.progress import count

    assert count(1, "matrix", "matrices") == "1 matrix" and count(3, "matrix", "matrices") == "3 matrices"
    assert count(0, "example") == "0 examples"
