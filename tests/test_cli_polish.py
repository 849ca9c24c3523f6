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


def test_no_progress_silences_transformers_and_hub_bars(tiny, tmp_path, capsys):
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    enable_progress_bars()
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
