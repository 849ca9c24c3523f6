"""Hostile input, table-driven: every case runs the CLI in-process and asserts the exit code, a message
fragment, no traceback, and that nothing was written or lost (the workspace with the source model, the
data and an existing export is byte-identical afterwards; the test folder holds nothing new).

Areas: recipe, model source, data, output folder, injected failure at each export step, Hub faults.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from laser_export.cli import main
from tinymodels import save_tiny

WORDS = [f"w{i}" for i in range(4, 100)]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------- workspace


def _bench_lines(n=40):
    for i in range(n):
        a, b, c = WORDS[i % 90], WORDS[(3 * i + 1) % 90], WORDS[(7 * i + 2) % 90]
        yield json.dumps({"prompt": f"{a} {b} {c}", "answer": WORDS[(i * 11) % 90]})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Shared, never-modified inputs: tiny llama and opt folders, JSONL data, a factorised export."""
    root = tmp_path_factory.mktemp("hostile-ws")
    save_tiny("llama", root / "llama")
    save_tiny("opt", root / "opt")
    (root / "data").mkdir()
    (root / "data" / "bench.jsonl").write_text("\n".join(_bench_lines()) + "\n")
    recipe = root / "export.yaml"
    recipe.write_text(yaml.safe_dump(_base(root)))
    assert main([str(recipe), "--out", str(root / "export"), "--no-progress"]) == 0
    return root


def _base(ws: Path) -> dict:
    return {
        "name": "h",
        "model": {"source": str(ws / "llama")},
        "interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1}],
        "storage": "factorised",
        "benchmark": {"name": "jsonl", "path": str(ws / "data" / "bench.jsonl"), "split": "test", "seed": 0,
                      "validation_fraction": 0.25, "batch_size": 8},
    }


CLAIMS = {"baseline": {"accuracy": 0.5}, "reduced": {"accuracy": 0.5}, "tolerance": 0.01}


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@dataclass
class Ctx:
    ws: Path
    tmp: Path
    mp: pytest.MonkeyPatch
    recipe: Path
    out: Path
    data: dict = field(default_factory=dict)

    def write_recipe(self, recipe: dict, name: str = "r.yaml") -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    def copy_export(self, to: str = "out") -> Path:
        dest = self.tmp / to
        shutil.copytree(self.ws / "export", dest)
        return dest

    def model_copy(self, name: str = "m") -> Path:
        dest = self.tmp / name
        shutil.copytree(self.ws / "llama", dest)
        return dest


@dataclass
class Case:
    id: str
    code: int
    fragment: str
    recipe: dict | Callable[[Ctx], dict] | None = None  # top-level overrides of the base recipe
    argv: Callable[[Ctx], list[str]] | None = None  # default: run RECIPE --out OUT --no-progress
    setup: Callable[[Ctx], None] | None = None  # files / monkeypatches, before the snapshot
    check: Callable[[Ctx], None] | None = None  # extra assertions afterwards
    new: tuple[str, ...] = ()  # paths under the test folder allowed to appear (relative)
    traceback: bool = False
    env: dict = field(default_factory=dict)  # environment variables for the command (in-process and fresh)


def M(**kw):
    return lambda c: {"model": {"source": str(c.ws / "llama"), **kw}}


def B(**kw):
    return lambda c: {"benchmark": {**_base(c.ws)["benchmark"], **kw}, "claims": CLAIMS}


def IV(**kw):
    return {"interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1, **kw}]}


def DATA(text: str | bytes, name="d.jsonl", bench="jsonl"):
    """benchmark.path -> a file in the test folder holding ``text``."""

    def make(c: Ctx):
        p = c.tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return {"benchmark": {**_base(c.ws)["benchmark"], "name": bench, "path": str(p)}, "claims": CLAIMS}

    return make


def SRC(make: Callable[[Ctx], str]):
    """model.source -> whatever ``make`` builds in the test folder."""
    return lambda c: {"model": {"source": make(c)}}


def raw_recipe(data: bytes):
    def setup(c: Ctx):
        c.recipe.write_bytes(data)

    return setup


def run_args(*extra):
    return lambda c: [str(c.recipe), "--out", str(c.out), "--no-progress", *extra]


# ------------------------------------------------------------------------------------- source builders


def _model_with(c: Ctx, edit_config=None, files=None, drop=()) -> str:
    m = c.model_copy()
    if edit_config:
        cfg = json.loads((m / "config.json").read_text())
        edit_config(cfg)
        (m / "config.json").write_text(json.dumps(cfg))
    for name, data in (files or {}).items():
        (m / name).write_bytes(data)
    for name in drop:
        (m / name).unlink()
    return str(m)


def _tokenizer_drops(c: Ctx, char: str) -> str:
    """A model copy whose tokenizer normalises ``char`` away (an answer of only that character: no tokens)."""
    from tokenizers import normalizers

    from tinymodels import tiny_tokenizer

    m = c.model_copy()
    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace(char, "")
    tok.save_pretrained(m)
    return str(m)


def _truncate_weights(c: Ctx) -> str:
    m = c.model_copy()
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return str(m)


def _poison(value):
    def make(c: Ctx) -> str:
        m = c.model_copy()
        sd = load_file(m / "model.safetensors")
        sd["model.layers.2.mlp.gate_proj.weight"][3, 5] = value
        save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
        return str(m)

    return make


def _broken_factor(mode):
    def make(c: Ctx) -> str:
        e = c.tmp / "fexport"
        shutil.copytree(c.ws / "export", e)
        sd = load_file(e / "model.safetensors")
        key = "model.layers.2.mlp.gate_proj.weight_out"
        if mode == "missing":
            del sd[key]
        else:
            sd[key] = sd[key][:, :-1].contiguous()
        save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
        return str(e)

    return make


def _offline_hub(c: Ctx) -> None:
    import huggingface_hub.constants as hc

    c.mp.setenv("HF_HUB_OFFLINE", "1")
    c.mp.setattr(hc, "HF_HUB_OFFLINE", True)
    c.mp.setenv("HF_HOME", str(c.tmp / "hf"))
    c.mp.setenv("HF_HUB_CACHE", str(c.tmp / "hf" / "hub"))
    c.mp.setattr(hc, "HF_HUB_CACHE", str(c.tmp / "hf" / "hub"))


# ---------------------------------------------------------------------------------- injected failures


def _inject(target: str, exc_factory, after_copy=True):
    """Existing export at OUT (with --overwrite), then ``target`` raises: the old export must survive."""

    def setup(c: Ctx):
        if after_copy:
            c.copy_export()
        import importlib

        mod_name, attr = target.rsplit(".", 1)
        mod = importlib.import_module(mod_name)

        def boom(*a, **k):
            raise exc_factory()

        c.mp.setattr(mod, attr, boom)

    return setup


def _old_export_intact(c: Ctx):
    assert _snapshot(c.out) == _snapshot(c.ws / "export")


def _fail_second_replace(c: Ctx):
    """os.replace fails when the new export is renamed into place (after the old one moved aside)."""
    c.copy_export()
    import laser_export.policy as st  # where atomic_folder lives

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if Path(dst) == c.out.resolve() and ".tmp-" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    c.mp.setattr(st.os, "replace", replace)


def _appears_during_run(c: Ctx):
    """A folder with someone's file appears at OUT while the export is being written."""
    import laser_export.export.safetensors as st

    real = st.write_checkpoint

    def write(*a, **k):
        c.out.mkdir()
        (c.out / "precious.txt").write_text("mine")
        return real(*a, **k)

    c.mp.setattr(st, "write_checkpoint", write)


def _precious_intact(c: Ctx):
    assert [p.name for p in c.out.iterdir()] == ["precious.txt"]
    assert (c.out / "precious.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ Hub faults


class _TokenLeakHandler(BaseHTTPRequestHandler):
    def _answer(self):
        body = b'{"error": "bad credentials: Authorization: Bearer hf_SECRETSECRETSECRET12345 token=hf_OTHERSECRET99887766"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *a):
        pass


def _serve(c: Ctx, kind: str) -> str:
    if kind == "stall":  # accepts connections (kernel backlog) and never answers
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        c.data["closers"] = [sock.close]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
    if kind == "closed":  # nothing listens
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return f"http://127.0.0.1:{port}"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenLeakHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    c.data["closers"] = [server.shutdown, server.server_close]
    return f"http://127.0.0.1:{server.server_port}"


def _push_to(kind, *extra):
    def setup(c: Ctx):
        import huggingface_hub.constants as hc

        c.mp.delenv("HF_HUB_OFFLINE", raising=False)
        c.mp.setattr(hc, "HF_HUB_OFFLINE", False)
        c.mp.setenv("HF_TOKEN", "hf_SECRETSECRETSECRET12345")
        c.mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        c.data["endpoint"] = _serve(c, kind)
        c.data["t0"] = time.monotonic()

    def argv(c: Ctx):
        return ["push", str(c.ws / "export"), "--repo-id", "org/tiny", "--endpoint", c.data["endpoint"],
                "--hub-timeout", "1", *extra]

    return setup, argv


def _retry_named(c: Ctx):
    assert time.monotonic() - c.data["t0"] < 60  # a stalled server is given up on, not waited for forever


STALL = _push_to("stall")
CLOSED = _push_to("closed")
LEAK = _push_to("leak")


def _no_secret(c: Ctx):
    err = c.data["stderr"]
    assert "SECRETSECRET" not in err and "OTHERSECRET" not in err and "***" in err


# ----------------------------------------------------------------------------------------------- table

X = 2  # exit code for bad input

CASES: list[Case] = [
    # ---- recipe file
    Case("recipe-missing", X, "cannot read recipe", setup=lambda c: c.recipe.unlink()),
    Case("recipe-binary", X, "not a text file", setup=raw_recipe(b"name: x\n\x00\x01\x02")),
    Case("recipe-not-utf8", X, "not UTF-8", setup=raw_recipe(b"name: caf\xe9\n")),
    Case("recipe-bad-yaml", X, "<yaml>", setup=raw_recipe(b"name: [unclosed\n")),
    Case("recipe-deep-yaml", X, "<yaml>: nested too deeply", setup=raw_recipe(b"[" * 20000 + b"]" * 20000)),
    Case("recipe-list", X, "expected a mapping", setup=raw_recipe(b"- a\n- b\n")),
    Case("recipe-empty", X, "expected a mapping", setup=raw_recipe(b"")),
    Case("recipe-unknown-field", X, "colour: unknown field", recipe={"colour": "red"}),
    Case("recipe-no-name", X, "name: Field required", recipe={"name": None}),
    Case("recipe-bad-name", X, "name: String should match pattern", recipe={"name": "../x"}),
    Case("recipe-no-interventions", X, "interventions: Field required", recipe={"interventions": None}),
    Case("recipe-empty-interventions", X, "interventions: List should have at least 1", recipe={"interventions": []}),
    Case("layer-bool", X, "interventions[0].layer: expected a number, got the boolean true", recipe=IV(layer=True)),
    Case("layer-string", X, "interventions[0].layer: Input should be a valid integer", recipe=IV(layer="1")),
    Case("layer-negative", X, "interventions[0].layer: Input should be greater than or equal to 0", recipe=IV(layer=-1)),
    Case("layer-out-of-range", X, "interventions[0].layer: model has 3 layers (0..2), got 31", recipe=IV(layer=31)),
    Case("rho-zero", X, "interventions[0].rho: must be in (0, 1]", recipe=IV(rho=0)),
    Case("rho-big", X, "interventions[0].rho: must be in (0, 1]", recipe=IV(rho=1.5)),
    Case("rho-bool", X, "interventions[0].rho: expected a number, got the boolean true", recipe=IV(rho=True)),
    Case("rho-and-rank", X, "interventions[0]: give exactly one of rho", recipe=IV(rank=2)),
    Case("neither-rho-nor-rank", X, "give exactly one of rho",
         recipe={"interventions": [{"layer": 2, "matrix": "fc_in"}]}),
    Case("rank-zero", X, "interventions[0].rank: expected a positive integer or auto, got 0",
         recipe={"interventions": [{"layer": 2, "matrix": "fc_in", "rank": 0}]}),
    Case("rank-too-big", X, "interventions[0].rank: model.layers.2.mlp.gate_proj has shape [64, 32], max rank 32",
         recipe={"interventions": [{"layer": 2, "matrix": "fc_in", "rank": 1000}]}),
    Case("matrix-unknown", X, "interventions[0].matrix: llama has no matrix 'c_fc'", recipe=IV(matrix="c_fc")),
    Case("intervention-duplicate", X, "interventions[1]: layer 2 fc_in is already reduced by interventions[0]",
         recipe={"interventions": [{"layer": 2, "matrix": "fc_in", "rho": 0.1}, {"layer": 2, "matrix": "mlp", "rho": 0.2}]}),
    Case("storage-unknown", X, "storage: Input should be 'dense' or 'factorised'", recipe={"storage": "sparse"}),
    Case("reduction-method", X, "reduction.method:", recipe={"reduction": {"method": "magic"}}),
    Case("reduction-svd-dtype", X, "reduction.svd_dtype:", recipe={"reduction": {"svd_dtype": "float16"}}),
    Case("reduction-seed-float", X, "reduction.seed: Input should be a valid integer", recipe={"reduction": {"seed": 1.5}}),
    Case("benchmark-unknown", X, "benchmark.name: unknown benchmark 'nope'", recipe=B(name="nope")),
    Case("metric-unknown", X, "benchmark.metric: jsonl has no metric 'f1'", recipe=B(metric="f1")),
    Case("validation-fraction", X, "benchmark.validation_fraction: Input should be less than 1", recipe=B(validation_fraction=1.5)),
    Case("batch-size-zero", X, "benchmark.batch_size: Input should be greater than or equal to 1", recipe=B(batch_size=0)),
    Case("batch-size-bool", X, "benchmark.batch_size: expected a number, got the boolean true", recipe=B(batch_size=True)),
    Case("split-train", X, "benchmark.split: Input should be 'validation', 'test' or 'all'", recipe=B(split="train")),
    Case("subsample-one", X, "benchmark.subsample: Input should be greater than or equal to 2", recipe=B(subsample=1)),
    Case("claims-without-benchmark", X, "claims need a benchmark", recipe={"benchmark": None, "claims": CLAIMS}),
    Case("claim-above-one", X, "claims.reduced.accuracy: Input should be less than or equal to 1",
         recipe={"claims": {**CLAIMS, "reduced": {"accuracy": 1.5}}}),
    Case("claims-tolerance-negative", X, "claims.tolerance: Input should be greater than or equal to 0",
         recipe={"claims": {**CLAIMS, "tolerance": -0.1}}),
    Case("export-format", X, "export.formats[0]: Input should be 'safetensors', 'onnx' or 'gguf'", recipe={"export": {"formats": ["tflite"]}}),
    Case("shard-size-words", X, "export.max_shard_size: expected a size such as 500MB", recipe={"export": {"max_shard_size": "2 potatoes"}}),
    Case("shard-size-bool", X, "export.max_shard_size: expected a size", recipe={"export": {"max_shard_size": True}}),
    Case("shard-size-zero", X, "export.max_shard_size: must be a positive number of bytes", recipe={"export": {"max_shard_size": 0}}),
    Case("hub-repo-id", X, "export.hub.repo_id: 'no slash' is not a Hub repo id", recipe={"export": {"hub": {"repo_id": "no slash"}}}),
    Case("onnx-tolerance-zero", X, "export.onnx_tolerance: Input should be greater than 0", recipe={"export": {"onnx_tolerance": 0}}),
    Case("onnx-unsupported-family", X, "export.formats: ONNX export supports",
         recipe=lambda c: {"model": {"source": str(c.ws / "opt")}, "export": {"formats": ["safetensors", "onnx"]}}),
    Case("model-dtype", X, "model.dtype:", recipe=M(dtype="float8")),
    Case("model-device", X, "model.device:", recipe=M(device="tpu")),
    Case("trust-remote-code-string", X, "model.trust_remote_code: Input should be a valid boolean", recipe=M(trust_remote_code="yes")),
    Case("num-layers-hint-wrong", X, "model.num_layers: recipe says 5, the model has 3", recipe=M(num_layers=5)),
    Case("model-type-hint-wrong", X, "model.model_type: recipe says 'gpt2', the model is 'llama'", recipe=M(model_type="gpt2")),
    Case("model-no-source", X, "model.source: Field required", recipe={"model": {"dtype": "float32"}}),
    # ---- model source
    Case("source-missing-path", X, "model.source: local path '/no/such/model' does not exist", recipe={"model": {"source": "/no/such/model"}}),
    Case("source-no-config", X, "has no config.json", recipe=SRC(lambda c: _model_with(c, drop=["config.json"]))),
    Case("source-config-not-json", X, "cannot load config", recipe=SRC(lambda c: _model_with(c, files={"config.json": b"{not json"}))),
    Case("source-config-wrong-type", X, "Field 'num_hidden_layers' expected int, got str",
         recipe=SRC(lambda c: _model_with(c, edit_config=lambda cfg: cfg.update(num_hidden_layers="three")))),
    Case("source-config-hidden-size-bool", X, "'hidden_size' expected int, got bool",
         recipe=SRC(lambda c: _model_with(c, edit_config=lambda cfg: cfg.update(hidden_size=True)))),
    Case("source-unknown-family", X, "unknown architecture 'bloom'",
         recipe=SRC(lambda c: _model_with(c, files={"config.json": b'{"model_type": "bloom", "n_layer": 2}'}))),
    Case("source-truncated-safetensors", X, "is truncated or corrupt", recipe=SRC(_truncate_weights)),
    Case("source-garbage-safetensors", X, "is not a safetensors file",
         recipe=SRC(lambda c: _model_with(c, files={"model.safetensors": b"\xff" * 64}))),
    Case("source-missing-shard", X, "names shards that are missing: model-00002-of-00002.safetensors",
         recipe=SRC(lambda c: _model_with(c, files={"model.safetensors.index.json": json.dumps(
             {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()}))),
    Case("source-no-tokenizer", X, "has no tokenizer files",
         recipe=SRC(lambda c: _model_with(c, drop=["tokenizer.json"]))),
    Case("source-gguf-missing", X, "GGUF file", recipe={"model": {"source": "/no/such/model.gguf"}}),
    Case("source-gguf-garbage", X, "is not a GGUF file",
         recipe=SRC(lambda c: (c.tmp / "x.gguf").write_bytes(b"\x00" * 128) and str(c.tmp / "x.gguf"))),
    Case("source-gguf-truncated", X, "cannot load config",
         recipe=SRC(lambda c: (c.tmp / "t.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40) and str(c.tmp / "t.gguf"))),
    Case("source-package-missing", X, "Python package 'no_such_pkg_xyz' is not installed", recipe={"model": {"source": "package:no_such_pkg_xyz/m.gguf"}}),
    Case("source-package-malformed", X, "should look like package:PKG/FILE", recipe={"model": {"source": "package:pytest"}}),
    Case("source-package-no-file", X, "'nope.gguf' not found in package 'pytest'", recipe={"model": {"source": "package:pytest/nope.gguf"}}),
    Case("source-not-hub-id", X, "is neither an existing path nor a Hub id", recipe={"model": {"source": "a/b/c"}}),
    Case("source-revision-conflict", X, "revision 'v1' in the source disagrees with model.revision 'v2'",
         recipe={"model": {"source": "org/name@v1", "revision": "v2"}}),
    Case("source-hub-offline-uncached", X, "HF_HUB_OFFLINE is set", recipe={"model": {"source": "org/never-cached-model"}},
         setup=_offline_hub),
    Case("weights-inf", X, "model.layers.2.mlp.gate_proj (interventions[0], layer 2 fc_in) holds 1 non-finite values",
         recipe=SRC(_poison(float("inf")))),
    Case("weights-nan", X, "holds 1 non-finite values (inf/NaN)", recipe=SRC(_poison(float("nan")))),
    Case("factor-missing", X, "model.layers.2.mlp.gate_proj.weight_out is missing", recipe=SRC(_broken_factor("missing"))),
    Case("factor-wrong-shape", X, "model.layers.2.mlp.gate_proj.weight_out has shape [64, 2], rank 3 needs [64, 3]",
         recipe=SRC(_broken_factor("shape"))),
    # ---- data (claims present, so the data loads before the weights)
    Case("data-missing", X, "jsonl: file not found", recipe=B(path="/no/such/data.jsonl")),
    Case("data-not-utf8", X, "d.jsonl:2: not UTF-8 text", recipe=DATA(b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff"}\n')),
    Case("data-binary", X, "d.jsonl:1: binary data", recipe=DATA(b'\x00\x01{"prompt"}\n')),
    Case("data-bad-json", X, "d.jsonl:1: invalid JSON", recipe=DATA('{"prompt": \n')),
    Case("data-deep-json", X, "d.jsonl:1: JSON nested too deeply", recipe=DATA("[" * 100000 + "]" * 100000 + "\n")),
    Case("data-whitespace-prompt", X, "'prompt' must be a non-empty string (not only whitespace)", recipe=DATA('{"prompt": "   ", "answer": "x"}\n')),
    Case("data-label-range", X, "'label' must be an integer index into 'choices'",
         recipe=DATA('{"prompt": "p", "choices": ["a", "b"], "label": 5}\n')),
    Case("data-empty-file", X, "contains no examples", recipe=DATA("\n\n")),
    Case("data-answer-int", X, "'answer' must be a non-empty string", recipe=DATA('{"prompt": "p", "answer": 3}\n')),
    Case("data-single-choice", X, "has 1 choice; a choice task needs at least 2",
         recipe=DATA('{"prompt": "p", "choices": ["a"], "label": 0}\n')),
    Case("data-duplicate-choices", X, "lists the choice 'a' more than once",
         recipe=DATA('{"prompt": "p", "choices": ["a", "a", "b"], "label": 1}\n')),
    Case("data-answer-tokenises-to-nothing", X, "example 'line1': answer/choice '~' tokenises to nothing",
         recipe=lambda c: {**DATA('{"prompt": "w4 w5", "answer": "~"}\n' * 2)(c), "model": {"source": _tokenizer_drops(c, "~")}}),
    Case("data-prompt-tokenises-to-nothing", X, "prompt tokenises to nothing and the tokenizer adds no BOS",
         recipe=lambda c: {**DATA('{"prompt": "~", "answer": "w5"}\n' * 4)(c), "model": {"source": _tokenizer_drops(c, "~")}}),
    Case("data-prompt-too-long", X, "example 'line1': prompt is 1,000,001 characters (limit 1,000,000",
         recipe=DATA('{"prompt": "%s", "answer": "w5"}\n' % ("w" * 1_000_001))),
    Case("data-line-too-long", X, "d.jsonl:1: line longer than 16 MiB",
         recipe=DATA(b'{"prompt": "' + b"w4 " * (6 * 2**20) + b'", "answer": "w5"}\n')),
    Case("data-duplicate-ids", X, "duplicate example id 'a'",
         recipe=DATA('{"id": "a", "prompt": "p", "answer": "x"}\n{"id": "a", "prompt": "q", "answer": "y"}\n')),
    Case("counterfact-subject-type", X, "requested_rewrite.subject must be a non-empty string", recipe=DATA(json.dumps([
        {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": 7, "target_true": {"str": "Paris"}},
         "paraphrase_prompts": ["a", "b"]}]), name="cf.json", bench="counterfact")),
    Case("counterfact-not-list", X, "must contain a JSON list", recipe=DATA('{"a": 1}', name="cf.json", bench="counterfact")),
    Case("counterfact-record-number", X, "record #0 is a int, expected an object", recipe=DATA("[3]", name="cf.json", bench="counterfact")),
    Case("bigbench-score-type", X, "a record has a field of the wrong type", recipe=DATA(json.dumps(
        {"examples": [{"input": "x", "target_scores": {"a": "high", "b": 0}}]}), name="task.json", bench="fever")),
    Case("bigbench-target-type", X, "a record has a field of the wrong type", recipe=DATA(json.dumps(
        {"examples": [{"input": "x", "target": 5}]}), name="task.json", bench="qa_wikidata")),
    Case("split-empty", X, "benchmark.split: the test split is empty", recipe=B(validation_fraction=0.99)),
    Case("limit-zero", X, "--limit: expected a positive integer, got 0", recipe=B(), argv=run_args("--limit", "0")),
    Case("limit-negative", X, "--limit: expected a positive integer, got -3", recipe=B(), argv=run_args("--limit", "-3")),
    Case("limit-word", X, "--limit: expected a positive integer, got 'many'", argv=run_args("--limit", "many")),
    # ---- output folder and report path (all before any weights load)
    Case("out-cwd", X, "is the working directory or a parent of it", argv=lambda c: [str(c.recipe), "--out", ".", "--overwrite"]),
    Case("out-parent-of-cwd", X, "is the working directory or a parent of it", argv=lambda c: [str(c.recipe), "--out", "..", "--overwrite"]),
    Case("out-root", X, "is the working directory or a parent of it", argv=lambda c: [str(c.recipe), "--out", "/", "--overwrite"]),
    Case("out-home", X, "is the home folder or a parent of it",
         setup=lambda c: (c.mp.setenv("HOME", str(c.tmp / "home")), (c.tmp / "home").mkdir()),
         argv=lambda c: [str(c.recipe), "--out", str(c.tmp / "home"), "--overwrite"]),
    Case("out-is-source", X, "holds the model source or data", argv=lambda c: [str(c.recipe), "--out", str(c.ws / "llama"), "--overwrite"]),
    Case("out-holds-source", X, "holds the model source or data", argv=lambda c: [str(c.recipe), "--out", str(c.ws), "--overwrite"]),
    Case("out-holds-data", X, "holds the model source or data", recipe=B(),
         argv=lambda c: [str(c.recipe), "--out", str(c.ws / "data"), "--overwrite"]),
    Case("out-is-export-source", X, "holds the model source or data", recipe={"model": {"source": "SELF"}},
         setup=lambda c: (c.copy_export(), c.write_recipe({**_base(c.ws), "model": {"source": str(c.out)}})),
         argv=lambda c: [str(c.tmp / "r.yaml"), "--out", str(c.out), "--overwrite"]),
    Case("out-is-file", X, "exists and is not a folder", setup=lambda c: c.out.write_text("x")),
    Case("out-under-file", X, "is a file, not a folder", setup=lambda c: (c.tmp / "f").write_text("x"),
         argv=lambda c: [str(c.recipe), "--out", str(c.tmp / "f" / "sub")]),
    Case("out-foreign-folder-overwrite", X, "is not a laser-export export (no manifest.json)",
         setup=lambda c: (c.out.mkdir(), (c.out / "thesis.tex").write_text("years of work")), argv=run_args("--overwrite")),
    Case("out-foreign-manifest", X, "is not a laser-export export",
         setup=lambda c: (c.out.mkdir(), (c.out / "manifest.json").write_text('{"app": "other"}')), argv=run_args("--overwrite")),
    Case("out-existing-export", X, "already holds an export; pass --overwrite", recipe=B(), setup=lambda c: c.copy_export()),
    Case("out-read-only-parent", X, "cannot write in",
         setup=lambda c: pytest.skip("root ignores permissions") if IS_ROOT else ((c.tmp / "ro").mkdir(), (c.tmp / "ro").chmod(0o555)),
         argv=lambda c: [str(c.recipe), "--out", str(c.tmp / "ro" / "out")]),
    Case("report-is-folder", X, "--report", recipe=B(), setup=lambda c: (c.tmp / "rep").mkdir(),
         argv=lambda c: [str(c.recipe), "--out", str(c.out), "--report", str(c.tmp / "rep")]),
    Case("report-under-file", X, "is a file, not a folder", recipe=B(), setup=lambda c: (c.tmp / "f").write_text("x"),
         argv=lambda c: [str(c.recipe), "--out", str(c.out), "--report", str(c.tmp / "f" / "r.json")]),
    Case("verify-report-is-folder", X, "is a folder", recipe=B(), setup=lambda c: (c.tmp / "rep").mkdir(),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "rep")]),
    # verify without claims measures (exit 0): tests/test_measure.py
    Case("appears-during-run", X, "is not a laser-export export", setup=_appears_during_run, check=_precious_intact,
         new=("out", "out/precious.txt")),
    Case("debris-tmp-removed", 0, "incomplete export left by a killed run",
         setup=lambda c: ((c.tmp / ".out.tmp-999999999-abc").mkdir(), (c.tmp / ".out.tmp-999999999-abc" / "x").write_text("half")),
         check=lambda c: (not (c.tmp / ".out.tmp-999999999-abc").exists()) or pytest.fail("debris left"),
         new=("out", "out/*")),
    Case("debris-old-restored", X, "restored the previous export",
         setup=lambda c: ((c.tmp / ".out.old-999999999-x").mkdir(), shutil.copytree(c.ws / "export", c.tmp / ".out.old-999999999-x" / "old")),
         check=_old_export_intact, new=("out", "out/*")),
    Case("debris-old-restored-pid-reused", X, "restored the previous export",  # pid 1 runs, but started long before
         setup=lambda c: ((c.tmp / ".out.old-1t2-x").mkdir(), shutil.copytree(c.ws / "export", c.tmp / ".out.old-1t2-x" / "old")),
         check=_old_export_intact, new=("out", "out/*")),
    Case("debris-old-of-a-live-run-mentioned", 0, "moved aside by a run that still runs",
         setup=lambda c: ((c.tmp / f".out.old-{os.getpid()}-x").mkdir(),
                          shutil.copytree(c.ws / "export", c.tmp / f".out.old-{os.getpid()}-x" / "old")),
         argv=run_args("--dry-run")),
    Case("dry-run-plan", 0, "dry run: no weights loaded, nothing written", recipe=B(), argv=run_args("--dry-run"),
         check=lambda c: "would write:" in c.data["stderr"] and "verify report; 30 examples scored with the reduced model" in c.data["stderr"]
         and "baseline cache holds it" in c.data["stderr"] and "LASER_EXPORT_PREFIX_CACHE_GB" in c.data["stderr"] or pytest.fail(c.data["stderr"])),
    Case("dry-run-verify", 0, "would write:", recipe=B(), argv=lambda c: ["verify", str(c.recipe), "--dry-run"]),
    Case("dry-run-still-checks-out", X, "already holds an export", setup=lambda c: c.copy_export(), argv=run_args("--dry-run")),
    Case("dry-run-reports-debris", 0, "would remove",
         setup=lambda c: (c.tmp / ".out.tmp-999999999-abc").mkdir(), argv=run_args("--dry-run")),
    # ---- injected failure at each export step (an existing export at OUT, --overwrite): it survives
    Case("fail-reduce", 1, "unexpected RuntimeError: injected (rerun with --debug for the traceback)",
         setup=_inject("laser_export.pipeline.apply", lambda: RuntimeError("injected")),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-write-checkpoint-disk-full", X, "cannot write the export: No space left on device",
         setup=_inject("laser_export.export.safetensors.write_checkpoint", lambda: OSError(errno.ENOSPC, "No space left on device")),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-write-checkpoint-read-only", X, "cannot write the export: Read-only file system",
         setup=_inject("laser_export.export.safetensors.write_checkpoint", lambda: OSError(errno.EROFS, "Read-only file system")),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-onnx", 1, "ONNX export failed, nothing exported",
         recipe={"export": {"formats": ["safetensors", "onnx"]}},
         setup=lambda c: (c.copy_export(), c.mp.setattr(__import__("laser_export.export.onnx", fromlist=["x"]), "export_onnx",
                                                        _raiser(lambda: __import__("laser_export.export.onnx", fromlist=["x"]).OnnxParityError("injected parity", {})))),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-card", 1, "unexpected ValueError: injected card",
         setup=_inject("laser_export.export.card.render_card", lambda: ValueError("injected card")),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-manifest-write", X, "cannot write",
         setup=lambda c: (c.copy_export(), c.mp.setattr(__import__("laser_export.atomic", fromlist=["x"]).os, "fdopen",
                                                        _raiser(lambda: OSError(errno.ENOSPC, "No space left on device")))),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-interrupt", 130, "interrupted",
         setup=_inject("laser_export.export.safetensors.write_checkpoint", lambda: KeyboardInterrupt()),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-final-rename", 1, "unexpected OSError", setup=_fail_second_replace,
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("fail-debug-shows-traceback", 1, "Traceback (most recent call last)",
         setup=_inject("laser_export.pipeline.apply", lambda: RuntimeError("injected"), after_copy=False),
         argv=run_args("--debug"), traceback=True),
    # ---- CLI / Hub
    Case("push-without-repo", X, "--push needs a repo", argv=run_args("--push")),
    Case("run-bad-repo-id", X, "--repo-id: 'bad id!' is not a Hub repo id", argv=run_args("--repo-id", "bad id!")),
    Case("push-not-export", X, "is not an export folder (no config.json)",
         argv=lambda c: ["push", str(c.tmp), "--repo-id", "org/x"]),
    Case("push-bad-repo-id", X, "--repo-id: 'a/b/c' is not a Hub repo id",
         argv=lambda c: ["push", str(c.ws / "export"), "--repo-id", "a/b/c"]),
    Case("push-bad-timeout", X, "--hub-timeout: expected a positive number",
         argv=lambda c: ["push", str(c.ws / "export"), "--repo-id", "org/x", "--hub-timeout", "0"]),
    Case("hub-stalled-server", 1, "Retry with: laser-export push", setup=STALL[0], argv=STALL[1], check=_retry_named),
    Case("hub-stalled-server-says-timeout", 1, "1 s Hub timeout", setup=STALL[0], argv=STALL[1]),
    Case("hub-connection-refused", 1, "The local export at", setup=CLOSED[0], argv=CLOSED[1]),
    Case("hub-error-redacts-token", 1, "push failed", setup=LEAK[0], argv=LEAK[1], check=_no_secret),
    Case("hub-offline", 1, "HF_HUB_OFFLINE is set", setup=lambda c: (_offline_hub(c), c.data.update(endpoint="http://127.0.0.1:9")),
         argv=lambda c: ["push", str(c.ws / "export"), "--repo-id", "org/tiny", "--endpoint", c.data["endpoint"]]),
    Case("search-batch-size-zero", X, "--batch-size: expected a positive integer, got 0", argv=lambda c: SEARCH(c, "--batch-size", "0")),
    Case("search-validation-fraction", X, "--validation-fraction: expected a number in (0, 1), got 1.5",
         argv=lambda c: SEARCH(c, "--validation-fraction", "1.5")),
    Case("search-layers-reversed", X, "--layers: range '2-1' is empty", argv=lambda c: SEARCH(c, "--layers", "2-1")),
    Case("search-layers-out-of-range", X, "--layers: model has 3 layers (0..2), got [9]", argv=lambda c: SEARCH(c, "--layers", "9")),
    Case("search-rhos", X, "--rhos: ρ is the fraction of the max rank kept, in (0, 1]", argv=lambda c: SEARCH(c, "--rhos", "0,2")),
    Case("search-prune-snr", X, "--prune-snr: expected a number in (0, 1], got 3.0", argv=lambda c: SEARCH(c, "--prune-snr", "3")),
    Case("search-compose-zero", X, "--compose: expected a positive integer, got 0", argv=lambda c: SEARCH(c, "--compose", "0")),
    Case("unknown-option", X, "unrecognized arguments: --frobnicate", argv=run_args("--frobnicate")),
    # ---- issue 21: every path the tool writes goes through the output policy, refused before any weights load
    Case("report-is-model-config", X, "is inside an input of this run", recipe=B(),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.ws / "llama" / "config.json")]),
    Case("run-report-is-model-config", X, "is inside an input of this run", recipe=B(),
         argv=lambda c: [str(c.recipe), "--out", str(c.out), "--report", str(c.ws / "llama" / "config.json")]),
    Case("report-is-benchmark-data", X, "is an input of this run", recipe=B(),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.ws / "data" / "bench.jsonl")]),
    Case("report-is-the-recipe", X, "is an input of this run", recipe=B(),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.recipe)]),
    Case("report-is-a-fifo", X, "is not a regular file", recipe=B(), setup=lambda c: os.mkfifo(c.tmp / "fifo.json"),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "fifo.json")]),
    Case("report-inside-out", X, "is inside --out", recipe=B(),
         argv=lambda c: [str(c.recipe), "--out", str(c.out), "--report", str(c.out / "extra.json")]),
    Case("out-is-the-reports-folder", X, "is inside --out reports", recipe=B(),
         argv=lambda c: [str(c.recipe), "--out", "reports"]),
    Case("out-name-too-long", X, "longer than 255 bytes", argv=lambda c: [str(c.recipe), "--out", str(c.tmp / ("a" * 300))]),
    Case("out-symlink-loop", X, "cannot be resolved", setup=lambda c: os.symlink("out", c.out), new=("out",)),
    Case("out-manifest-fifo-overwrite", X, "is not a laser-export export",
         setup=lambda c: (c.out.mkdir(), os.mkfifo(c.out / "manifest.json")), argv=run_args("--overwrite"), new=("out/manifest.json",)),
    Case("out-manifest-deeply-nested", X, "is not a laser-export export (its manifest.json is not ours)",
         setup=lambda c: (c.out.mkdir(), (c.out / "manifest.json").write_text("[" * 100000 + "]" * 100000)), argv=run_args("--overwrite")),
    Case("recipe-fifo", X, "is not a regular file (a FIFO", setup=lambda c: (c.recipe.unlink(), os.mkfifo(c.recipe)),
         new=("r.yaml",)),
    Case("recipe-name-too-long", X, "name: String should have at most 200 characters", recipe={"name": "n" * 256}),
    Case("apply-report-not-an-object", X, "holds a JSON list, expected an object",
         setup=lambda c: (c.tmp / "rep.json").write_text("[]"),
         argv=lambda c: ["apply", str(c.recipe), "--out", str(c.out), "--report", str(c.tmp / "rep.json")]),
    Case("apply-report-deeply-nested", X, "JSON nested too deeply",
         setup=lambda c: (c.tmp / "rep.json").write_text("[" * 100000 + "]" * 100000),
         argv=lambda c: ["apply", str(c.recipe), "--out", str(c.out), "--report", str(c.tmp / "rep.json")]),
    Case("env-prefix-cache-word", X, "LASER_EXPORT_PREFIX_CACHE_GB='abc': expected a number >= 0", recipe=B(),
         env={"LASER_EXPORT_PREFIX_CACHE_GB": "abc"}),
    Case("env-prefix-cache-nan", X, "LASER_EXPORT_PREFIX_CACHE_GB='nan'", recipe=B(), env={"LASER_EXPORT_PREFIX_CACHE_GB": "nan"}),
    Case("env-prefix-cache-inf", X, "LASER_EXPORT_PREFIX_CACHE_GB='inf'", recipe=B(), env={"LASER_EXPORT_PREFIX_CACHE_GB": "inf"}),
    Case("env-hub-timeout-word", X, "LASER_EXPORT_HUB_TIMEOUT='abc': expected a positive number",
         env={"LASER_EXPORT_HUB_TIMEOUT": "abc"}, argv=lambda c: ["push", str(c.ws / "export"), "--repo-id", "org/x"]),
    Case("works-shard-size-decimal", 0, "exported", recipe={"export": {"max_shard_size": "1.5GB"}}, new=("out", "out/*")),
    Case("works-shard-size-gib", 0, "exported", recipe={"export": {"max_shard_size": "5GiB"}}, new=("out", "out/*")),
    Case("fail-write-checkpoint-safetensors-disk-full", X, "cannot write the export: No space left on device",
         setup=_inject("laser_export.export.safetensors.write_checkpoint", lambda: __import__("safetensors").SafetensorError(
             'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')),
         argv=run_args("--overwrite"), check=_old_export_intact, new=("out", "out/*")),
    Case("verify-report-disk-full", X, "cannot write: No space left on device", recipe=B(),
         setup=lambda c: c.mp.setattr(__import__("laser_export.atomic", fromlist=["x"]).os, "fdopen",
                                      _raiser(lambda: OSError(errno.ENOSPC, "No space left on device"))),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "rep.json"), "--no-cache"]),
    Case("perplexity-not-utf8", X, "p.txt: not UTF-8 text",
         recipe=lambda c: {**B()(c), "perplexity": {"path": str(c.tmp / "p.txt")}},
         setup=lambda c: (c.tmp / "p.txt").write_bytes(b"caf\xe9 w4 w5 w6\n"),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "rep.json")]),
    Case("search-out-root", X, "--out /: is a folder", argv=lambda c: SEARCH(c)[:-2] + ["--out", "/"]),
    Case("search-out-in-model", X, "is inside an input of this run",
         argv=lambda c: SEARCH(c)[:-2] + ["--out", str(c.ws / "llama" / "config.json")]),
    Case("search-results-in-model", X, "--results", argv=lambda c: SEARCH(c, "--results", str(c.ws / "llama" / "config.json"))),
    Case("search-results-is-data", X, "is an input of this run",
         argv=lambda c: SEARCH(c, "--results", str(c.ws / "data" / "bench.jsonl"))),
    Case("search-results-foreign-file", X, "is not a laser-export search log",
         setup=lambda c: (c.tmp / "notes.txt").write_text("my notes\n"), argv=lambda c: SEARCH(c, "--results", str(c.tmp / "notes.txt"))),
    Case("search-template-is-out", X, "is an input of this run",
         argv=lambda c: ["search", "--template", str(c.recipe), "--benchmark-path", str(c.ws / "data" / "bench.jsonl"),
                         "--out", str(c.recipe)]),
    Case("search-out-trailing-slash", X, "ends with '/', a folder", argv=lambda c: SEARCH(c)[:-2] + ["--out", str(c.tmp / "newdir") + "/"]),
    Case("report-trailing-slash", X, "ends with '/', a folder", recipe=B(),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "reps") + "/"]),
    Case("search-name-bad", X, "--name:", argv=lambda c: SEARCH(c, "--name", "../x")),
    Case("search-name-too-long", X, "--name:", argv=lambda c: SEARCH(c, "--name", "n" * 300)),
    Case("search-svd-cache-inf", X, "--svd-cache-gb: expected a finite number >= 0, got inf",
         argv=lambda c: SEARCH(c, "--svd-cache-gb", "inf")),
    # ---- issue 21 re-trial (H12): what still failed late or wrote where it must not
    Case("search-prompt-tokenises-to-nothing", X, "prompt tokenises to nothing", argv=lambda c: [
        "search", "--model", _tokenizer_drops(c, "~"), "--benchmark", "jsonl", "--benchmark-path", _tilde_data(c),
        "--out", str(c.tmp / "found.yaml"), "--layers", "2", "--matrices", "fc_in", "--rhos", "0.5"]),
    Case("scan-out-is-model-config", X, "is inside an input of this run",
         argv=lambda c: ["scan", str(c.ws / "llama"), "--out", str(c.ws / "llama" / "config.json")]),
    Case("scan-out-in-model", X, "is inside an input of this run",
         argv=lambda c: ["scan", str(c.ws / "llama"), "--out", str(c.ws / "llama" / "scan.json")]),
    Case("scan-plot-is-the-gguf-source", X, "--out (x.png)",
         setup=lambda c: (c.tmp / "x.png").write_bytes(b"GGUF"),
         argv=lambda c: ["scan", str(c.tmp / "x.png"), "--out", str(c.tmp / "x.json")]),
    Case("scan-out-is-its-own-heatmap", X, "would replace the scan JSON",
         argv=lambda c: ["scan", str(c.ws / "llama"), "--out", str(c.tmp / "x.png")]),
    Case("scan-out-is-a-folder", X, "is a folder", argv=lambda c: ["scan", str(c.ws / "llama"), "--out", str(c.tmp)]),
    Case("out-inside-source", X, "is inside an input of this run", argv=lambda c: [str(c.recipe), "--out", str(c.ws / "llama" / "sub")]),
    Case("apply-out-inside-source", X, "is inside an input of this run",
         argv=lambda c: ["apply", str(c.recipe), "--out", str(c.ws / "llama" / "sub")]),
    Case("works-apply-out-reports", 0, "exported", recipe=B(), argv=lambda c: ["apply", str(c.recipe), "--out", "reports"],
         new=("reports", "reports/*")),  # apply writes no report: reports/<name>.verify.json is no reason to refuse
    Case("search-out-is-the-scan", X, "is an input of this run", setup=lambda c: (c.tmp / "scan.json").write_text("{}"),
         argv=lambda c: SEARCH(c)[:-2] + ["--from-scan", str(c.tmp / "scan.json"), "--out", str(c.tmp / "scan.json")]),
    Case("perplexity-one-token", X, "p.txt: the text has 1 tokens; perplexity needs at least 2",
         recipe=lambda c: {**B()(c), "perplexity": {"path": str(c.tmp / "p.txt")}},
         setup=lambda c: (c.tmp / "p.txt").write_text("w4\n"),
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "rep.json")]),
    Case("perplexity-missing", X, "perplexity.path: ", recipe=lambda c: {**B()(c), "perplexity": {"path": str(c.tmp / "no.txt")}},
         argv=lambda c: ["verify", str(c.recipe), "--report", str(c.tmp / "rep.json")]),
    Case("perplexity-fifo", X, "perplexity.path: ", recipe=lambda c: {**B()(c), "perplexity": {"path": str(c.tmp / "p.txt")}},
         setup=lambda c: os.mkfifo(c.tmp / "p.txt"), argv=lambda c: [str(c.recipe), "--out", str(c.out), "--report", str(c.tmp / "rep.json")]),
]


def _tilde_data(c: Ctx) -> str:
    """Benchmark data whose every fourth prompt is '~' (a tokenizer that drops '~' makes it empty)."""
    path = c.tmp / "tilde.jsonl"
    path.write_text("".join(json.dumps({"prompt": "~" if i % 4 == 0 else f"w{4 + i} w5", "answer": "w6"}) + "\n"
                            for i in range(24)))
    return str(path)


#: case-id prefixes whose error must come before any weights load (load_model raises in those tests)
BEFORE_WEIGHTS = ("recipe-", "layer-", "rho-", "neither-", "rank-zero", "rank-too-big", "matrix-", "intervention-", "storage-",
                  "reduction-", "benchmark-", "metric-", "validation-", "batch-", "split-", "subsample-", "claim",
                  "export-", "shard-", "hub-repo", "onnx-", "model-", "trust-", "num-layers", "source-", "data-",
                  "counterfact-", "bigbench-", "limit-", "out-", "report-", "verify-no", "verify-report-is", "push-",
                  "run-", "dry-run", "apply-", "env-", "search-", "perplexity-", "scan-")


def SEARCH(c: Ctx, *extra):
    return ["search", "--model", str(c.ws / "llama"), "--benchmark", "jsonl", "--benchmark-path",
            str(c.ws / "data" / "bench.jsonl"), "--out", str(c.tmp / "found.yaml"), *extra]


def _raiser(factory):
    def boom(*a, **k):
        raise factory()

    return boom


def test_table_is_large_enough():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


def _allowed(rel: str, patterns: tuple[str, ...]) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(rel, p) for p in patterns)


def _prepare(case: Case, ws: Path, tmp: Path, mp) -> tuple[Ctx, list[str]]:
    """The case's recipe, files and environment in ``tmp``; returns the context and the command line."""
    ctx = Ctx(ws=ws, tmp=tmp, mp=mp, recipe=tmp / "r.yaml", out=tmp / "out")
    recipe = _base(ws)
    over = case.recipe(ctx) if callable(case.recipe) else (case.recipe or {})
    for k, v in over.items():
        if v is None:
            recipe.pop(k, None)
        else:
            recipe[k] = v
    ctx.write_recipe(recipe)
    for name, value in case.env.items():
        mp.setenv(name, value)
    if case.setup:
        case.setup(ctx)
    argv = case.argv(ctx) if case.argv else run_args()(ctx)
    if "--no-progress" not in argv and argv[0] not in ("push",):
        argv.append("--no-progress")
    return ctx, argv


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, ws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default out/ and reports/ would land here and be seen
    ctx, argv = _prepare(case, ws, tmp_path, monkeypatch)
    if case.id.startswith(BEFORE_WEIGHTS):  # these must be refused before any weights load
        import laser_export.pipeline as pipeline
        import laser_export.runner as runner

        monkeypatch.setattr(runner, "load_model", _raiser(lambda: AssertionError("weights were loaded")))
        monkeypatch.setattr(pipeline, "load_model", _raiser(lambda: AssertionError("weights were loaded")))  # search
    ws_before = _snapshot(ws)
    tmp_before = _snapshot(tmp_path)
    try:
        code = main(argv)
    finally:
        for close in ctx.data.get("closers", []):
            close()
    err = capsys.readouterr().err
    ctx.data["stderr"] = err
    assert code == case.code, err[-3000:]
    assert case.fragment in " ".join(err.split()), err[-3000:]
    if not case.traceback:
        assert "Traceback" not in err
    assert _snapshot(ws) == ws_before, "the shared workspace (source, data, export) changed"
    after = _snapshot(tmp_path)
    lost = {k for k in tmp_before if k not in after and not k.startswith(".out.")}
    assert not lost, f"lost: {sorted(lost)}"
    changed = {k for k in tmp_before if k in after and after[k] != tmp_before[k] and not _allowed(k, case.new)}
    assert not changed, f"changed: {sorted(changed)}"
    added = {k for k in after if k not in tmp_before and not _allowed(k, case.new)}
    assert not added, f"written: {sorted(added)}"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and "999999999" not in p.name], "debris left"
    if case.check:
        case.check(ctx)


# ----------------------------------------------------------------------- the same cases, fresh processes


class _NeedsInProcess(Exception):
    """The case patches the library itself: it runs in-process only."""


class _EnvOnly:
    """What a case's setup may do to a fresh process: environment variables (recorded), nothing else."""

    def __init__(self):
        self.env: dict[str, str] = {}
        self.unset: list[str] = []

    def setenv(self, name, value, prepend=None):
        self.env[name] = str(value)

    def delenv(self, name, raising=True):
        self.unset.append(name)

    def __getattr__(self, name):
        raise _NeedsInProcess(name)


#: Runs every job in its own process, forked from one that imported torch and transformers but nothing of
#: laser_export: each command starts as `laser-export` does (no laser_export module loaded), so its error is
#: classified without help from modules an earlier case imported; the fork saves ~3 s of imports per case.
_FRESH_DRIVER = r"""
import json, os, signal, sys, time
jobs = json.loads(open(sys.argv[1]).read())
import torch, transformers, safetensors.torch, yaml, rich.console  # noqa: E401,F401 - third-party only
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError  # noqa
from pydantic import field_validator, model_validator  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - what plan() uses
import transformers.quantizers.auto  # noqa: F401
import transformers.models.llama.modeling_llama, transformers.models.opt.modeling_opt  # noqa: E401,F401 - the tiny models
assert not [m for m in sys.modules if m.startswith("laser_export")]


def child(job):
    signal.alarm(120)  # a command that blocks (a FIFO) is killed, not waited on
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    for name in job["unset"]:
        os.environ.pop(name, None)
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from laser_export.cli import main
    code = main(job["argv"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


codes, running, todo = {}, {}, list(jobs)
width = max(1, min(4, os.cpu_count() or 1))
while todo or running:
    while todo and len(running) < width:
        job = todo.pop(0)
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = (job["id"], time.monotonic())
    pid, status = os.wait()
    name, t0 = running.pop(pid)
    codes[name] = [os.waitstatus_to_exitcode(status), round(time.monotonic() - t0, 2)]
print(json.dumps(codes))
"""


def test_bad_input_exit_codes_in_fresh_processes(ws, tmp_path):
    """Every bad-input (exit 2) row of the table again, each in a fresh process: exit code 2, its message,
    no traceback. Rows whose setup patches the library (not only the environment) run in-process only."""
    import subprocess
    import sys

    jobs, cases = [], {}
    for case in (c for c in CASES if c.code == X):
        tmp = tmp_path / case.id
        tmp.mkdir()
        rec = _EnvOnly()
        try:
            _, argv = _prepare(case, ws, tmp, rec)
        except _NeedsInProcess:
            continue
        except pytest.skip.Exception:
            continue
        jobs.append({"id": case.id, "argv": argv, "cwd": str(tmp), "env": rec.env, "unset": rec.unset,
                     "log": str(tmp_path / f"{case.id}.log")})
        cases[case.id] = case
    assert len(jobs) >= 120, len(jobs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run([sys.executable, "-c", _FRESH_DRIVER, str(tmp_path / "jobs.json")], capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    codes = json.loads(res.stdout.strip().splitlines()[-1])
    wrong = []
    for job in jobs:
        case, log = cases[job["id"]], Path(job["log"]).read_text()
        code, seconds = codes[job["id"]]
        if code != X or case.fragment not in " ".join(log.split()) or "Traceback" in log:
            wrong.append(f"{job['id']}: exit {code} after {seconds} s: {log[-500:]}")
    assert not wrong, "\n".join(wrong)


def test_report_folder_is_bad_input_in_a_fresh_process(ws, tmp_path):
    """Issue 20's reproduction, exactly as a user runs it: `python -m laser_export verify r.yaml --report
    <a folder>` printed "unexpected OutputError" and exited 1. Answered before torch loads."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**_base(ws), "claims": CLAIMS}))
    (tmp_path / "rep").mkdir()
    code = ("import sys; from laser_export.cli import main\n"
            "rc = main(sys.argv[1:]); print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    for cmd in ([sys.executable, "-m", "laser_export"], [sys.executable, "-c", code]):
        res = subprocess.run([*cmd, "verify", str(recipe), "--report", str(tmp_path / "rep")], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path, env=env)
        assert res.returncode == 2, res.stderr
        assert "is a folder" in res.stderr and "unexpected" not in res.stderr and "Traceback" not in res.stderr
    assert res.stdout.strip() == "no torch"


# ------------------------------------------------------------------------ numbered cases of issue 8


def test_factorised_export_as_source_is_reduced_on_the_product(ws, tmp_path):
    """Issue 8 case 3: an export with factorised storage used as the source of a new recipe."""
    from transformers import AutoModelForCausalLM

    from laser_export.lowrank import LowRankLinear

    src = AutoModelForCausalLM.from_pretrained(ws / "export").eval()
    name = "model.layers.2.mlp.gate_proj"
    product = src.get_submodule(name).dense_matrix().detach().clone()
    assert isinstance(src.get_submodule(name), LowRankLinear)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    for storage, rank in (("dense", 2), ("factorised", 2), ("dense", 3)):
        recipe = {**_base(ws), "model": {"source": str(ws / "export")}, "storage": storage,
                  "interventions": [{"layer": 2, "matrix": "fc_in", "rank": rank}, {"layer": 0, "matrix": "fc_out", "rank": 4}]}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        out = tmp_path / f"out-{storage}-{rank}"
        assert main([str(tmp_path / "r.yaml"), "--out", str(out), "--no-progress"]) == 0
        got = AutoModelForCausalLM.from_pretrained(out).eval()
        mod = got.get_submodule(name)
        w = mod.dense_matrix() if isinstance(mod, LowRankLinear) else mod.weight
        U, S, Vh = torch.linalg.svd(product.double())
        expected = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        torch.testing.assert_close(w.double(), expected, atol=1e-5, rtol=0)
        assert isinstance(mod, LowRankLinear) == (storage == "factorised")
        # rank 3 of a rank-3 product is the product itself: logits unchanged at that module
        if rank == 3:
            torch.testing.assert_close(w.double(), product.double(), atol=1e-5, rtol=0)
        # the other, untouched factorised source module stays factorised with its values
        assert isinstance(got.get_submodule("model.layers.0.mlp.down_proj"), LowRankLinear) == (storage == "factorised")
        with torch.no_grad():
            assert torch.isfinite(got(x).logits).all()


def test_factorised_checkpoint_with_missing_factor_fails_loudly(ws, tmp_path):
    """Issue 8 case 5: from_pretrained itself refuses (not only the CLI)."""
    from transformers import AutoModelForCausalLM

    import laser_export  # noqa: F401

    shutil.copytree(ws / "export", tmp_path / "e")
    sd = load_file(tmp_path / "e" / "model.safetensors")
    del sd["model.layers.2.mlp.gate_proj.weight"]
    save_file(sd, tmp_path / "e" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.gate_proj.weight is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "e")


def test_counterfact_cache_is_keyed_by_full_url(tmp_path, monkeypatch):
    """Issue 8 case 6: two URLs ending in counterfact.json are two cache entries."""
    import functools
    import http.server

    from laser_export.benchmarks import load_examples

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rec = lambda answer: [{"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "X",  # noqa: E731
                                                               "target_true": {"str": answer}}, "paraphrase_prompts": ["a", "b"]}]
    for d, answer in (("a", "Paris"), ("b", "Rome")):
        (tmp_path / "srv" / d).mkdir(parents=True)
        (tmp_path / "srv" / d / "counterfact.json").write_text(json.dumps(rec(answer)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        first = load_examples("counterfact", f"{base}/a/counterfact.json")
        second = load_examples("counterfact", f"{base}/b/counterfact.json")
        again = load_examples("counterfact", f"{base}/a/counterfact.json")
    finally:
        server.shutdown()
        server.server_close()
    assert [e.answers for e in first] == [("Paris",)] * 3
    assert [e.answers for e in second] == [("Rome",)] * 3
    assert again == first
    assert len(list((tmp_path / "home").rglob("counterfact.json"))) == 2


def test_weights_identity_changes_with_the_weights_not_the_path(ws, tmp_path):
    """The identity search results are keyed by: same weights elsewhere -> same id; new weights -> new id."""
    from laser_export.identity import weights_identity

    a = weights_identity(str(ws / "llama"))
    shutil.copytree(ws / "llama", tmp_path / "copy")
    assert weights_identity(str(tmp_path / "copy")) == a
    sd = load_file(tmp_path / "copy" / "model.safetensors")
    sd["model.layers.2.mlp.gate_proj.weight"] += 1e-3  # same shapes, same header, new values
    save_file(sd, tmp_path / "copy" / "model.safetensors", metadata={"format": "pt"})
    assert weights_identity(str(tmp_path / "copy")) != a
    assert weights_identity(str(ws / "opt")) != a
