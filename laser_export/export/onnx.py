"""ONNX export of a (possibly LASER-reduced) model, with an onnxruntime parity check.

Exporter: transformers 5's own ``transformers.exporters.OnnxExporter`` (torch.export + dynamo
``torch.onnx.export`` + its ONNX patches). It takes a transformers 5 ``DynamicCache`` as a traced
input (flattened to one tensor per layer and key/value) and traces ``LowRankLinear`` as two plain
``MatMul``s, so no custom symbolic is needed. Shapes are exported with ``Dim.AUTO`` on every input
axis; batch, sequence and past length come out dynamic, heads and head size are specialised.

Graph I/O, renamed after export to the usual ONNX-LM names:

* causal LM, ``with_past=True``: ``input_ids``, ``attention_mask`` (batch, past + sequence),
  ``position_ids`` (when the model's forward takes them), ``past_key_values.{i}.key|value``
  (batch, kv_heads, past, head_dim; a past of length 0 is the prefill) -> ``logits``,
  ``present.{i}.key|value``.
* causal LM, ``with_past=False``: ``input_ids``, ``attention_mask``, ``position_ids`` -> ``logits``.
* masked LM (RoBERTa/BERT): ``input_ids``, ``attention_mask`` -> ``logits``.

The file is written in the model's (export) dtype: fp32 ``model.onnx`` or fp16 ``model_fp16.onnx``
(bf16 is refused: onnxruntime's CPU provider has no bf16 kernels); on request also
``model_quantized.onnx`` (onnxruntime's 8-bit dynamic quantization), the transformers.js file names.

After saving, :func:`check_onnx_parity` runs the file in onnxruntime on a padded batch (left padding
for causal LMs) and, with past, one decoding step fed with the presents onnxruntime returned, and
compares its logits with torch's fp32 logits of the same weights at the non-padded positions only.
A failure raises :class:`OnnxParityError`; the caller must then not publish the file.
"""

from __future__ import annotations

from ..errors import CheckFailed
import contextlib
import inspect
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laser_export.architectures import ArchitectureError, families_with, family_for, model_types_with

from . import ort_runtime

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
#: file per export dtype (the names transformers.js loads for dtype fp32 / fp16 / q8)
ONNX_FILES = {"float32": ONNX_FILE, "float16": "model_fp16.onnx"}
QUANTIZED_FILE = "model_quantized.onnx"
#: external weights next to ``model.onnx``: ``model.onnx_data`` (transformers.js / onnx-community layout)
EXTERNAL_DATA_SUFFIX = "_data"
#: fp16 ONNX passes within this fraction of the largest |logit| (or the fp32 tolerance, whichever is larger)
FP16_RELATIVE_TOLERANCE = 1e-2
#: protobuf's hard limit is 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2

#: Families whose data file says ``onnx: true`` (supported and tested by this exporter).
ONNX_FAMILIES = tuple(f.name for f in families_with(onnx=True))

DEFAULT_SAMPLE_TEXTS = [
    "The capital of France is",
    "Low-rank approximations of weight matrices can improve reasoning in language models.",
    "Hello",
]

#: onnxruntime's type names of the float tensors a graph takes
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PAST_RE = re.compile(r"^(?:input\.|output\.)?(?:past_key_values|cache)\.layers\.(\d+)\.(keys|values)$")


class OnnxExportError(CheckFailed):
    label = "ONNX export failed, nothing exported:"
    """The model could not be exported to ONNX."""


class UnsupportedOnnxArchitecture(ArchitectureError):
    """The model's architecture (model_type) has no supported ONNX export."""


class OnnxParityError(OnnxExportError):
    """onnxruntime's logits differ from torch's by more than the tolerance: do not publish the file."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# Architecture / task


def onnx_task(model) -> str:
    """'causal-lm' or 'masked-lm' for a supported model; raises UnsupportedOnnxArchitecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedOnnxArchitecture(
            f"{type(model).__name__} has no config.model_type: ONNX export needs a transformers model"
        )
    try:
        family = family_for(model_type)
    except ArchitectureError as err:
        raise UnsupportedOnnxArchitecture(f"ONNX export: {err}") from None
    supported = model_types_with(onnx=True)
    if not family.onnx:
        raise UnsupportedOnnxArchitecture(
            f"ONNX export is not supported for model_type {model_type!r} (family {family.name!r}); "
            f"supported model types: {', '.join(supported)}"
        )
    import transformers

    try:  # the class the family's Auto class builds for this config
        expected = getattr(transformers, family.auto_class)._model_mapping[type(config)]
    except (KeyError, AttributeError):
        expected = None
    if expected is not None and not isinstance(model, expected):
        raise UnsupportedOnnxArchitecture(
            f"ONNX export of model_type {model_type!r} needs the {family.task} model {family.auto_class} builds "
            f"({expected.__name__}), got {type(model).__name__}"
        )
    return family.task


def _takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


# --------------------------------------------------------------------------------------------
# Sample inputs


def _position_ids(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Positions counted over the attended tokens only (what ``generate`` does for left padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, past_length:]


def _empty_past(model, batch: int, layers: int, dtype=np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Zero-length past (batch, kv_heads, 0, head_dim) per layer, shaped like the model's cache."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=_device(model)), use_cache=True)
    past = []
    for layer in _cache_layers(out.past_key_values)[:layers]:
        k, v = layer
        past.append(
            (
                np.zeros((batch, k.shape[1], 0, k.shape[3]), dtype),
                np.zeros((batch, v.shape[1], 0, v.shape[3]), dtype),
            )
        )
    return past


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]  # legacy tuple of tuples


def _export_inputs(model, task: str, with_past: bool) -> dict[str, Any]:
    """Traced example inputs. Sizes are all distinct and > 1 so that Dim.AUTO keeps them dynamic
    (a size of 1 would be specialised); a padded row keeps the masking path in the graph."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    batch, past_len, seq_len = 2, 3, 5
    low = 3 if vocab > 8 else 0  # keep clear of small special ids (RoBERTa pad is 1)
    dev = _device(model)
    ids = torch.randint(low, vocab, (batch, seq_len), generator=gen).to(dev)
    if task == "masked-lm":
        mask = torch.ones(batch, seq_len, dtype=torch.long, device=dev)
        mask[1, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    total = past_len + seq_len if with_past else seq_len
    mask = torch.ones(batch, total, dtype=torch.long, device=dev)
    mask[0, :2] = 0
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if _takes_position_ids(model):
        inputs["position_ids"] = _position_ids(mask, total - seq_len)
    if with_past:
        with torch.no_grad():
            prefill = model(
                input_ids=torch.randint(low, vocab, (batch, past_len), generator=gen).to(dev),
                attention_mask=mask[:, :past_len],
                use_cache=True,
            )
        inputs["past_key_values"] = prefill.past_key_values
        inputs["use_cache"] = True
    else:
        inputs["use_cache"] = False
    return inputs


def _sample_batch(tokenizer, texts: list[str], task: str, vocab: int) -> dict[str, torch.Tensor]:
    """Padded batch (left padding for causal LMs), restoring the tokenizer's settings afterwards."""
    if len(texts) < 2:
        raise ValueError("the parity check needs at least 2 sample texts (a padded batch)")
    saved = (tokenizer.padding_side, tokenizer.pad_token)
    try:
        tokenizer.padding_side = "left" if task == "causal-lm" else "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = saved[0]
        if saved[1] is None:
            tokenizer.pad_token = None
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(ids.max()) >= vocab:
        raise ValueError(f"tokenizer produced id {int(ids.max())} >= the model's vocab_size {vocab}")
    if bool((mask.sum(-1) == mask.shape[-1]).all()):
        raise ValueError("sample texts must have different lengths so that the batch is padded")
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _fp32_eval(model):
    """Export and compare in fp32 and eval mode; the model's dtype and mode are restored."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    training = model.training
    if dtype != torch.float32:
        model.to(torch.float32)
    model.eval()
    try:
        yield
    finally:
        if dtype != torch.float32:
            model.to(dtype)
        model.train(training)


@contextlib.contextmanager
def _quiet_transformers():
    """The exporter warns about version drift and Dim.AUTO on every call: keep errors only."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _rename_io(graph, task: str, with_past: bool) -> None:
    """Usual ONNX-LM names (past_key_values.{i}.key / present.{i}.key) and named dynamic axes."""
    import onnx_ir as ir

    def static(dim):
        # torch.export leaves specialised axes (heads, head_dim, vocab) as symbols named "2", "8"
        value = getattr(dim, "value", dim)
        return int(value) if isinstance(value, str) and value.isdigit() else dim

    def sym(value, dims):
        if value.shape is not None and len(value.shape) == len(dims):
            value.shape = ir.Shape([d if d is not None else static(old) for d, old in zip(dims, value.shape)])

    seq = "sequence_length"
    total = "total_sequence_length" if with_past else seq
    for value in graph.inputs:
        m = _PAST_RE.match(value.name)
        if m:
            value.name = f"past_key_values.{m.group(1)}.{m.group(2)[:-1]}"
            sym(value, ["batch_size", None, "past_sequence_length", None])
        elif value.name == "input_ids":
            sym(value, ["batch_size", seq])
        elif value.name == "attention_mask":
            sym(value, ["batch_size", total])
        elif value.name == "position_ids":
            sym(value, ["batch_size", seq])
    for value in graph.outputs:
        m = _PAST_RE.match(value.name)
        if m:
            value.name = f"present.{m.group(1)}.{m.group(2)[:-1]}"
            sym(value, ["batch_size", None, total, None])
        elif value.name == "logits":
            sym(value, ["batch_size", seq, None])


def _initializer_bytes(model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def _float_dtype(model) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _eval_in(model, dtype: str):
    """Trace in ``dtype`` and eval mode; the model's dtype and mode are restored."""
    before = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    training = model.training
    want = getattr(torch, dtype)
    if before != want:
        model.to(want)
    model.eval()
    try:
        yield
    finally:
        if before != want:
            model.to(before)
        model.train(training)


def _export_graph(model, task: str, with_past: bool, opset: int, path: Path) -> bool:
    """Trace ``model`` (in its current dtype) to ``path``; weights go to ``<file>_data`` over 2 GB (the name
    transformers.js and onnxruntime-web look for). Returns whether external data was written."""
    import onnx_ir as ir

    try:
        from transformers.exporters import OnnxConfig, OnnxExporter
    except ImportError as err:  # pragma: no cover - depends on the installed transformers
        raise OnnxExportError(f"transformers.exporters (transformers>=5) is required: {err}") from err
    inputs = _export_inputs(model, task, with_past)
    try:
        with torch.no_grad(), _quiet_transformers():
            exported = OnnxExporter().export(model, inputs, OnnxConfig(dynamic=True, opset_version=opset))
    except Exception as err:
        raise OnnxExportError(
            f"ONNX export of model_type {model.config.model_type!r} failed: {type(err).__name__}: {err}"
        ) from err
    program = exported.program
    _rename_io(program.graph, task, with_past)
    _drop_stack_traces(program)
    external = _initializer_bytes(program) > EXTERNAL_DATA_THRESHOLD
    for stale in (path, path.with_name(path.name + EXTERNAL_DATA_SUFFIX)):
        stale.unlink(missing_ok=True)
    if external:
        ir.save(program, str(path), external_data=path.name + EXTERNAL_DATA_SUFFIX)
    else:
        ir.save(program, str(path))
    return external


#: node metadata torch.onnx records: the Python stack of each node, with the absolute paths of the local
#: environment's source files (e.g. a virtual environment under the home folder); never published
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(program) -> None:
    """Remove :data:`STACK_TRACE_KEY` from every node (graph, subgraphs, functions) of an onnx_ir model."""
    import onnx_ir as ir

    for graph in (program.graph, *program.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE_KEY, None)


def _tolerance(dtype: str, tolerance: float, max_abs_logit: float) -> float:
    """fp32: ``tolerance``; fp16: also :data:`FP16_RELATIVE_TOLERANCE` of the largest |logit| (fp16 arithmetic)."""
    if dtype == "float16":
        return max(tolerance, FP16_RELATIVE_TOLERANCE * max_abs_logit)
    return tolerance


def export_onnx(
    model,
    tokenizer,
    out_dir,
    *,
    with_past: bool = True,
    opset: int = 18,
    tolerance: float = 1e-4,
    sample_texts: list[str] | None = None,
    dtype: str | None = None,
    quantized: bool = False,
) -> dict:
    """Export ``model`` (dense or with ``LowRankLinear`` modules) to ``out_dir`` in ``dtype`` (default: the model's
    own: the export dtype) and check onnxruntime against torch (fp32 logits of the same weights, padded batch, and
    one decoding step with past). float32 → ``model.onnx``, float16 → ``model_fp16.onnx`` (transformers.js names);
    bfloat16 is refused (onnxruntime's CPU provider has no bf16 kernels). ``quantized``: also
    ``model_quantized.onnx`` (8-bit dynamic quantization of the fp32 graph, onnxruntime's quantizer), measured
    against torch and recorded (``quantized`` entry), not held to ``tolerance``.

    ``with_past`` only applies to causal LMs; encoders have no cache and report ``with_past=False``.
    Weights go to ``<file>_data`` only when they exceed the 2 GB protobuf limit (``transformers_js_config`` then
    says so; merge it into config.json with :func:`write_transformers_js_config`).
    Raises :class:`UnsupportedOnnxArchitecture` for an unsupported model_type,
    :class:`OnnxExportError` when tracing/conversion fails or the dtype has no onnxruntime kernels, and
    :class:`OnnxParityError` when the parity check fails (the file is left in ``out_dir``: do not publish it).
    """
    task = onnx_task(model)
    dtype = dtype or _float_dtype(model)
    if dtype not in ONNX_FILES:
        raise OnnxExportError(f"export.dtype: {dtype} ONNX does not run in onnxruntime's CPU provider (no {dtype} "
                              "kernels); export float16 or float32 ONNX (set export.dtype)")
    if why := ort_runtime.missing():
        raise OnnxExportError(f"export.formats: onnx: {why}")
    if why := ort_runtime.conflict():
        log.warning(why)
    with_past = bool(with_past) and task == "causal-lm"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_FILES[dtype]
    with _eval_in(model, dtype):
        external = _export_graph(model, task, with_past, opset, path)
    report = check_onnx_parity(model, tokenizer, path, with_past=with_past, tolerance=math.inf,
                               sample_texts=sample_texts, raise_on_failure=False)
    tol = _tolerance(dtype, tolerance, report["max_abs_logit"])
    result = _result(report, path.name, dtype, with_past, tol, external, task)
    if report["opset"] != opset:
        raise OnnxExportError(f"requested opset {opset} but the exported graph uses opset {report['opset']}")
    if not result["passed"]:
        raise OnnxParityError(_parity_message({**report, "tolerance": tol}, path), result)
    if quantized:
        result["quantized"] = _quantized(model, tokenizer, out_dir, path if dtype == "float32" else None,
                                         task=task, with_past=with_past, opset=opset, sample_texts=sample_texts)
    result["transformers_js_config"] = transformers_js_config(result)
    return result


def _result(report: dict, file: str, dtype: str, with_past: bool, tol: float, external: bool, task: str) -> dict:
    return {
        "file": file,
        "dtype": dtype,
        "opset": report["opset"],
        "with_past": with_past,
        "max_abs_diff": report["max_abs_diff"],
        "tolerance": tol,
        "passed": bool(report["max_abs_diff"] <= tol),
        "inputs": report["inputs"],
        "outputs": report["outputs"],
        "external_data": (file + EXTERNAL_DATA_SUFFIX) if external else None,
        "exporter": "transformers.exporters.OnnxExporter",
        "task": task,
        "checks": report["checks"],
        "providers": report["providers"],
        "max_abs_logit": report["max_abs_logit"],
    }


def _quantized(model, tokenizer, out_dir: Path, fp32_graph: Path | None, *, task, with_past, opset,
               sample_texts) -> dict:
    """``model_quantized.onnx``: onnxruntime's 8-bit dynamic quantization (int8 weights, activations quantized at
    run time) of the fp32 graph (traced again, in a scratch folder, when the export is fp16). Its parity against
    torch is measured and recorded: quantization error is expected, there is no pass/fail tolerance."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    scratch = out_dir / ".fp32-for-quantization"
    try:
        if fp32_graph is None:
            scratch.mkdir(exist_ok=True)
            fp32_graph = scratch / ONNX_FILES["float32"]
            with _eval_in(model, "float32"):
                _export_graph(model, task, with_past, opset, fp32_graph)
        target = out_dir / QUANTIZED_FILE
        external = fp32_graph.with_name(fp32_graph.name + EXTERNAL_DATA_SUFFIX).exists()
        quantize_dynamic(fp32_graph, target, weight_type=QuantType.QInt8, use_external_data_format=external)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if external:
        _relocate_external_data(target)
    report = check_onnx_parity(model, tokenizer, target, with_past=with_past, tolerance=math.inf,
                               sample_texts=sample_texts, raise_on_failure=False)
    return {"file": QUANTIZED_FILE, "dtype": "q8", "weight_type": "int8 (dynamic)",
            "max_abs_diff": report["max_abs_diff"], "max_abs_logit": report["max_abs_logit"],
            "checks": report["checks"], "external_data": (QUANTIZED_FILE + EXTERNAL_DATA_SUFFIX) if external else None}


def _relocate_external_data(path: Path) -> None:
    """Rewrite ``path``'s external data into ``<file>_data`` (onnxruntime's quantizer names it otherwise)."""
    import onnx

    before = {p for p in path.parent.iterdir() if p != path}
    m = onnx.load(str(path), load_external_data=True)
    written = path.name + EXTERNAL_DATA_SUFFIX
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=written)
    for stale in before:
        if stale.name.startswith(path.name) and stale.name != written and stale.is_file():
            stale.unlink()


def transformers_js_config(info: dict) -> dict:
    """The ``transformers.js_config`` entries of config.json for the files in ``info`` (an :func:`export_onnx`
    result): external data per file (a > 2 GB model), and for an fp16 export its dtype and kv-cache dtype."""
    config: dict = {}
    external = {e["file"]: True for e in (info, info.get("quantized") or {}) if e.get("external_data")}
    if external:
        config["use_external_data_format"] = external
    if info.get("dtype") == "float16":
        config["dtype"] = "fp16"
        config["kv_cache_dtype"] = {"fp16": "float16"}
    return config


def write_transformers_js_config(folder: Path, info: dict) -> None:
    """Merge :func:`transformers_js_config` into ``folder/config.json`` (atomic write); nothing when empty."""
    import json

    from ..atomic import write_text

    entries = info.get("transformers_js_config") or transformers_js_config(info)
    if not entries:
        return
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["transformers.js_config"] = {**config.get("transformers.js_config", {}), **entries}
    write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Parity check


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _make_session(path: Path, provider: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def _run_session(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One onnxruntime run, outputs by name (a seam the tests monkeypatch)."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def _masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """max |a - b| over positions where mask == 1 (NaN/inf anywhere there counts as +inf)."""
    keep = mask.astype(bool)
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))[keep]
    if d.size == 0:
        raise ValueError("no non-padded position to compare")
    if not np.all(np.isfinite(d)):
        return math.inf
    return float(d.max())


def _parity_message(report: dict, path) -> str:
    worst = ", ".join(f"{k}={v:.3g}" for k, v in report["checks"].items())
    return (
        f"ONNX parity check failed for {path}: max |onnxruntime - torch| logits = "
        f"{report['max_abs_diff']:.3g} > tolerance {report['tolerance']:.3g} ({worst}; "
        f"max |logit| {report['max_abs_logit']:.3g}); do not publish it"
    )


def check_onnx_parity(
    model,
    tokenizer,
    onnx_path,
    *,
    with_past: bool = True,
    tolerance: float = 1e-4,
    sample_texts: list[str] | None = None,
    raise_on_failure: bool = True,
) -> dict:
    """Compare an exported file's logits (onnxruntime) with ``model``'s (torch, fp32).

    Causal LMs: a left-padded batch (with past: fed with a zero-length past) and, with past, one
    greedy decoding step fed with onnxruntime's own presents (torch with its own cache). Masked LMs:
    a right-padded batch. Only non-padded positions are compared. Every available provider
    (CUDA, CPU) is checked; the worst difference is reported.
    """
    task = onnx_task(model)
    with_past = bool(with_past) and task == "causal-lm"
    texts = list(sample_texts) if sample_texts is not None else list(DEFAULT_SAMPLE_TEXTS)
    batch = _sample_batch(tokenizer, texts, task, int(model.config.vocab_size))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bsz = ids.shape[0]
    path = Path(onnx_path)

    with _fp32_eval(model), torch.no_grad():
        checks: dict[str, float] = {}
        providers: dict[str, dict[str, float]] = {}
        session_inputs: list[str] = []
        session_outputs: list[str] = []
        opset = None
        logit_scale = 0.0
        for provider in _providers():
            session = _make_session(path, provider)
            session_inputs = [i.name for i in session.get_inputs()]
            session_outputs = [o.name for o in session.get_outputs()]
            opset = _session_opset(session, path)
            per, scale = _compare(model, session, task, with_past, ids, mask, bsz, session_inputs)
            logit_scale = max(logit_scale, scale)
            providers[provider] = per
            for name, value in per.items():
                checks[name] = max(checks.get(name, 0.0), value)
            del session
    worst = max(checks.values())
    report = {
        "opset": opset,
        "with_past": with_past,
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "passed": bool(worst <= tolerance),
        "inputs": session_inputs,
        "outputs": session_outputs,
        "checks": checks,
        "providers": providers,
        "sample_shape": list(ids.shape),
        "max_abs_logit": logit_scale,
    }
    if raise_on_failure and not report["passed"]:
        raise OnnxParityError(_parity_message(report, path), report)
    return report


def _session_opset(session, path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _compare(model, session, task, with_past, ids, mask, bsz, input_names) -> dict[str, float]:
    checks = {}
    feed: dict[str, np.ndarray] = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    uses_pos = "position_ids" in input_names
    if uses_pos:
        pos = _position_ids(mask)
        feed["position_ids"] = pos.numpy()
        kwargs["position_ids"] = pos
    past_names = sorted(
        (n for n in input_names if n.startswith("past_key_values.")),
        key=lambda n: (int(n.split(".")[1]), n),
    )
    if with_past:
        if not past_names:
            raise OnnxExportError("with_past=True but the ONNX graph has no past_key_values inputs")
        n_layers = len(past_names) // 2
        past_type = next(i.type for i in session.get_inputs() if i.name == past_names[0])
        for i, (k, v) in enumerate(_empty_past(model, bsz, n_layers, _NP_TYPES.get(past_type, np.float32))):
            feed[f"past_key_values.{i}.key"] = k
            feed[f"past_key_values.{i}.value"] = v
        kwargs["use_cache"] = True
    elif task == "causal-lm":
        kwargs["use_cache"] = False
    unknown = set(input_names) - set(feed)
    if unknown:
        raise OnnxExportError(f"cannot feed ONNX inputs {sorted(unknown)}")
    ort_out = _run_session(session, {k: v for k, v in feed.items() if k in input_names})
    dev = _device(model)
    ref = model(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in kwargs.items()})
    ref_logits = ref.logits.float().cpu().numpy()
    checks["padded_batch"] = _masked_max_diff(ort_out["logits"], ref_logits, mask.numpy())
    scale = float(np.abs(ref_logits[mask.numpy().astype(bool)]).max())

    if with_past:
        # one greedy decoding step: torch continues from its cache, onnxruntime from its presents
        next_ids = ref.logits[:, -1].argmax(-1, keepdim=True).cpu()
        mask2 = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype)], dim=1)
        feed2 = {"input_ids": next_ids.numpy(), "attention_mask": mask2.numpy()}
        kwargs2: dict[str, Any] = {
            "input_ids": next_ids,
            "attention_mask": mask2,
            "past_key_values": ref.past_key_values,
            "use_cache": True,
        }
        if uses_pos:
            pos2 = _position_ids(mask2, mask.shape[1])
            feed2["position_ids"] = pos2.numpy()
            kwargs2["position_ids"] = pos2
        for name in past_names:
            i, kind = name.split(".")[1:]
            feed2[name] = ort_out[f"present.{i}.{kind}"]
        ort_out2 = _run_session(session, feed2)
        ref2 = model(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in kwargs2.items()})
        ref2_logits = ref2.logits.float().cpu().numpy()
        checks["decode_step"] = _masked_max_diff(
            ort_out2["logits"], ref2_logits, np.ones(ref2_logits.shape[:2], np.int64)
        )
        scale = max(scale, float(np.abs(ref2_logits).max()))
    return checks, scale


__all__ = [
    "ONNX_FAMILIES",
    "OnnxExportError",
    "OnnxParityError",
    "UnsupportedOnnxArchitecture",
    "check_onnx_parity",
    "export_onnx",
    "transformers_js_config",
    "write_transformers_js_config",
    "onnx_task",
]
