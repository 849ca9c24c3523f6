"""Streaming reduction: safetensors shards in, safetensors shards out, the model never in memory whole.

For models larger than RAM (and, since the output is identical, for any ``--skip-verify`` export
whose source is a safetensors checkpoint). Modelled on mergekit's lazy tensor loader / tensor writer:

* the source's shards are opened one at a time with :func:`safetensors.safe_open` (lazy, memory
  mapped) and read tensor by tensor;
* a module-name → checkpoint-key map comes from the model built on the ``meta`` device (no weights),
  so the architecture table and Conv1D layouts are handled exactly as in memory;
* every target matrix is reduced with the same functions as the in-memory path
  (:func:`laser_export.intervene.truncation_error`, :class:`~laser_export.lowrank.TruncatedSVD`
  ``reconstruct``/``factors``), every other tensor is copied through (cast to ``model.dtype`` when
  the recipe asks for another dtype);
* the output shards are planned up front (every output shape is known from the headers and ranks),
  so each shard's safetensors header is written first and tensors are streamed into the file one at a
  time: no output buffer. Peak memory ≈ the pages of the shard being read + the matrix being reduced
  and its SVD temporaries.

The source is the set of files transformers loads (``model.safetensors`` when present, else the shards
of ``model.safetensors.index.json``); any other ``*.safetensors`` in the folder is ignored, and said so.
:class:`StreamedWeights` is the streamed :class:`~laser_export.export.writer.Weights` writer: the folder
itself (all or nothing, read back, manifest, card) is :func:`laser_export.export.writer.write_export`'s,
the same as for a model loaded whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .artifacts import matrix_entry
from .atomic import write_text
from .errors import InputError
from .export.checkpoint import FROM_SAFETENSORS, INDEX, WEIGHTS
from .export.shards import OutTensor, parse_size, write_shards
from .intervene import SVDCache, frobenius_norm, truncation_error
from .lowrank import LowRankLinear, factorised_saves_bytes
from .progress import console
from .recipe import RecipeError


class StreamError(InputError):
    """The source cannot be streamed (not a safetensors checkpoint, unknown tensor names, ...)."""


# -------------------------------------------------------------------------------------------------
# source side
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceTensor:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def source_files(folder: Path) -> tuple[list[str], list[str]]:
    """(the safetensors files transformers loads from ``folder``, the other ``*.safetensors`` it ignores).

    ``model.safetensors`` when present (``from_pretrained`` looks for it before an index), else the shards of
    ``model.safetensors.index.json``. StreamError when there is neither, or the index names a missing file."""
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    if (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    elif (folder / INDEX).is_file():
        try:
            files = list(dict.fromkeys(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise StreamError(f"model.source: {folder / INDEX} is not a valid safetensors index") from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise StreamError(f"model.source: {folder / INDEX} names {missing[0]}, which does not exist")
    else:
        raise StreamError(f"model.source: {folder} has no {WEIGHTS} or {INDEX} (the files transformers loads)"
                          + (f"; found only {', '.join(present)}" if present else ""))
    return files, [f for f in present if f not in files]


def checkpoint_folder(source) -> Path:
    """The local folder of a folder/Hub source that holds safetensors files, else StreamError."""
    if source.kind == "folder":
        folder = Path(source.location)
    elif source.kind == "hub":
        from huggingface_hub import snapshot_download

        from .defaults import hub_timeout
        from .net import deadline, redact

        with deadline(hub_timeout()) as op:  # one bounded network operation (laser_export/net.py)
            try:
                folder = Path(snapshot_download(source.location, revision=source.revision,
                                                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
            except Exception as err:  # noqa: BLE001 - any hub failure: report it with the source
                failure = err
            else:
                failure = None
        if failure is not None:
            raise StreamError(f"model.source: cannot fetch {source.describe()} for streaming: "
                              f"{redact(str(failure))}{op.explain(failure)}") from failure
    else:
        raise StreamError(f"model.source: {source.describe()} is a {source.kind} source; streaming needs a "
                          "safetensors checkpoint (a local folder or Hub id)")
    source_files(folder)
    return folder


def list_tensors(folder: Path) -> list[SourceTensor]:
    """Every tensor of the checkpoint transformers would load, shard by shard in index order, from the headers."""
    from safetensors import safe_open

    out = []
    for name in source_files(folder)[0]:
        path = folder / name
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = FROM_SAFETENSORS.get(sl.get_dtype())
                if dtype is None:
                    raise StreamError(f"{path}: tensor {key} has dtype {sl.get_dtype()}, not supported for streaming")
                out.append(SourceTensor(key, path, dtype, tuple(int(d) for d in sl.get_shape())))
    return out


def meta_model(config, family, trust_remote_code: bool = False):
    """The model built from its config on the meta device (module names and types, no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM}[family.task]
    with init_empty_weights():
        return auto.from_config(config, trust_remote_code=trust_remote_code)


class _Reader:
    """Keeps at most one source shard open (lazy, memory mapped); switching shard closes the last."""

    def __init__(self):
        self._path, self._f = None, None

    def get(self, t: SourceTensor) -> torch.Tensor:
        from safetensors import safe_open

        if self._path != t.file:
            self.close()
            self._f = safe_open(str(t.file), framework="pt").__enter__()
            self._path = t.file
        return self._f.get_tensor(t.key)

    def close(self) -> None:
        if self._f is not None:
            self._f.__exit__(None, None, None)
        self._path, self._f = None, None


# -------------------------------------------------------------------------------------------------
# the streaming reduction
# -------------------------------------------------------------------------------------------------
@dataclass
class StreamOptions:
    """Typed options of :func:`stream_reduce`."""

    max_shard_size: str | int = "2GB"
    progress: Callable[[str], None] | None = None


@dataclass(frozen=True)
class _MatrixPlan:
    """One target as found in the checkpoint: its key, module name, layout, (out, in) shape and rank."""

    target: object
    key: str
    name: str
    conv: bool
    shape: tuple[int, int]
    rank: int


class _Source:
    """The source checkpoint as the reduction sees it: tensors by key, a reader, the output dtype."""

    def __init__(self, p):
        from .sources import DTYPES

        self.folder = checkpoint_folder(p.source)
        self.tensors = list_tensors(self.folder)
        self.by_key = {t.key: t for t in self.tensors}
        self.want = DTYPES[p.recipe.model.dtype]
        self.reader = _Reader()

    def out_dtype(self, t: SourceTensor) -> torch.dtype:
        return t.dtype if self.want == "auto" or not t.dtype.is_floating_point else self.want

    def read(self, key: str) -> torch.Tensor:
        t = self.by_key[key]
        return self.reader.get(t).to(self.out_dtype(t))


def _plan_matrices(p, model, src: _Source) -> dict[str, _MatrixPlan]:
    """target → checkpoint key, (out, in) shape and rank; every problem raised before anything is written."""
    from .architectures import module_name
    from .lowrank import is_conv1d

    from .architectures import is_fused

    plans, problems = {}, []
    prefix = getattr(model, "base_model_prefix", "")
    for t in p.targets:
        if is_fused(p.family, t.alias):  # a block of a fused tensor: laser_export.stream_fused
            continue
        name = module_name(model, p.family, t.layer, t.alias)
        key = f"{name}.weight"
        if key not in src.by_key and prefix and key.startswith(prefix + "."):
            key = key[len(prefix) + 1 :]
        if key not in src.by_key:
            raise StreamError(f"{src.folder}: checkpoint has no tensor {name}.weight (needed by {t.field}); "
                              "use the in-memory path")
        stored, conv = src.by_key[key].shape, is_conv1d(model.get_submodule(name))
        shape = (stored[1], stored[0]) if conv else (stored[0], stored[1])
        if t.is_auto:  # rank: auto reads its matrix once here, one target at a time
            w = src.read(key)
            t = t.with_auto_rank(w.t() if conv else w)
            del w
        k = t.rank_for(shape)
        if k > min(shape):
            problems.append(f"{t.field}.rank: {name} has shape {list(shape)}, max rank {min(shape)}, got {k}")
        plans[key] = _MatrixPlan(t, key, name, conv, shape, k)
    if problems:
        raise RecipeError(problems)
    return plans


class _Reducer:
    """Produces the reduced tensors of each planned matrix, lazily, recording its manifest entry."""

    def __init__(self, p, src: _Source, plans: dict[str, _MatrixPlan]):
        self.src, self.plans, self.storage = src, plans, p.recipe.storage
        self.cache = SVDCache(p.recipe.reduction, max_bytes=0)
        self.entries: dict[int, dict] = {}
        self.ranks: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}  # factorised: the left factor, written right after the right

    def _svd(self, mp: _MatrixPlan, storage: str):
        w = self.src.read(mp.key)  # in the output dtype, as the in-memory path sees it
        matrix = w.t() if mp.conv else w
        svd = self.cache.get(mp.name, matrix, mp.rank)
        err, norm = truncation_error(matrix, svd, mp.rank)
        self.entries[id(mp.target)] = matrix_entry(mp.target, mp.name, mp.shape, mp.rank, storage,
                                                   w.element_size(), err, norm).as_dict()
        return svd

    def tensors(self, src: SourceTensor) -> list[OutTensor]:
        """The output tensors standing for source tensor ``src``."""
        dtype, mp = self.src.out_dtype(src), self.plans.get(src.key)
        if mp is None or mp.rank == min(mp.shape):  # untouched, or full rank: a bit-exact copy
            return [OutTensor(src.key, dtype, src.shape, lambda key=src.key: self.src.read(key))]
        if not (self.storage == "factorised" and factorised_saves_bytes(mp.rank, mp.shape)):
            def dense():
                wk = self._svd(mp, "dense").reconstruct(mp.rank, dtype=dtype)
                return wk.t().contiguous() if mp.conv else wk

            return [OutTensor(src.key, dtype, src.shape, dense)]
        # factorised: LowRankLinear's right factor as <module>.weight (k, in), left as .weight_out (out, k)
        self.ranks[mp.name] = mp.rank

        def right():
            left, right_ = self._svd(mp, "factorised").factors(mp.rank)
            mod = LowRankLinear.from_factors(left, right_, None, dtype)  # the same casts as in memory
            self._pending[mp.key] = mod.weight_out.detach()
            return mod.weight.detach()

        base = src.key[: -len(".weight")]
        return [OutTensor(src.key, dtype, (mp.rank, mp.shape[1]), right),
                OutTensor(f"{base}.weight_out", dtype, (mp.shape[0], mp.rank), lambda: self._pending.pop(mp.key))]

    def ordered_entries(self, p) -> list[dict]:
        """One entry per target, in target order; untouched (full-rank) matrices measured here."""
        out = []
        for mp in self.plans.values():  # planned in target order
            e = self.entries.get(id(mp.target))
            if e is None:
                matrix = self.src.read(mp.key)
                e = matrix_entry(mp.target, mp.name, mp.shape, mp.rank, "dense", matrix.element_size(), 0.0,
                                 frobenius_norm(matrix)).as_dict()
            out.append(e)
        self.src.reader.close()
        return out


def _write_config(p, src: _Source, out_folder: Path, ranks: dict[str, int], fused: dict | None = None):
    """config.json (dtype, the ``laser`` quantization_config of a factorised export) and generation config."""
    from .hf import LaserConfig

    config = p.config
    if src.want != "auto":
        config.dtype = src.want
    elif getattr(config, "dtype", None) is None:
        floats = [t.dtype for t in src.tensors if t.dtype.is_floating_point]
        if floats:
            config.dtype = floats[0]
    if ranks or fused:
        config.quantization_config = LaserConfig(ranks, fused=fused)
    elif getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(out_folder)
    gen = src.folder / "generation_config.json"
    if gen.is_file():
        write_text(out_folder / gen.name, gen.read_text())
    return config


@dataclass
class Streamed:
    """What :func:`stream_reduce` wrote: entries in target order, shard files, config, the meta model, the
    ranks of factorised matrices and every tensor's expected shape (for the read-back)."""

    entries: list[dict]
    files: list[str]
    config: object
    model: object
    ranks: dict[str, int]
    expected: dict[str, list[int]]
    fused: dict = field(default_factory=dict)  # quantization_config.fused (factorised fused blocks)


def stream_reduce(p, out_folder: Path, options: StreamOptions | None = None) -> Streamed:
    """Reduce ``p``'s targets shard by shard from its safetensors source into ``out_folder``.

    ``p`` is a :class:`laser_export.pipeline.Plan`. Writes shards, index, config.json and generation config
    into ``out_folder`` (an existing, empty folder, normally the writer's temporary folder)."""
    options = options or StreamOptions()
    src = _Source(p)
    from .stream_fused import FusedStream

    model = meta_model(p.config, p.family, p.recipe.model.trust_remote_code)
    fused = FusedStream(p, model, src)  # MoE experts, row blocks of fused tensors
    reducer = _Reducer(p, src, _plan_matrices(p, model, src))
    if fused.fused_layout:  # factorised fused blocks: every tensor under its in-memory name, as in memory
        out = fused.fused_outputs(reducer)
    else:
        out = [o for t in src.tensors for o in (fused.source_tensors(t) or reducer.tensors(t))]
    try:
        files = write_shards(out_folder, out, parse_size(options.max_shard_size), options.progress)
    finally:
        src.reader.close()
    records = fused.records()
    config = _write_config(p, src, out_folder, reducer.ranks, records)
    return Streamed(_entries_in_order(p, reducer, fused), files, config, model, reducer.ranks,
                    {t.key: list(t.shape) for t in out}, records)


def _entries_in_order(p, reducer: _Reducer, fused) -> list[dict]:
    """One entry per target in recipe order: plain matrices from the reducer, fused blocks from ``fused``."""
    from .architectures import is_fused

    plain, blocks = iter(reducer.ordered_entries(p)), iter(fused.blocks)
    return [fused.entries[id(next(blocks).target)] if is_fused(p.family, t.alias) else next(plain)
            for t in p.targets]


def streamable(p) -> str | None:
    """None when ``p`` can be streamed; else the reason (a sentence)."""
    from .export.formats import formats_of

    if p.source.kind not in ("folder", "hub"):
        return f"the source is a {p.source.kind} file, not a safetensors checkpoint"
    for fmt in formats_of(p.recipe):
        if fmt.needs_model:
            return f"{fmt.name.upper()} export needs the model in memory"
    if p.recipe.export.dtype is not None:
        return "export.dtype (a cast after loading) applies to the in-memory path"
    if p.recipe.model.device_map is not None:
        return "model.device_map applies to the in-memory path"
    if p.source.kind == "folder":
        folder = Path(p.source.location)
        try:
            source_files(folder)
        except StreamError as err:
            return str(err).removeprefix("model.source: ")
        if json.loads((folder / "config.json").read_text()).get("quantization_config"):
            return "the source is already quantized/factorised"
    return None


# -------------------------------------------------------------------------------------------------
# the streamed weights of an export
# -------------------------------------------------------------------------------------------------
class StreamedWeights:
    """The :class:`~laser_export.export.writer.Weights` writer of a streamed export."""

    streamed = True

    def write(self, folder: Path, job):
        from .export.safetensors import finish_checkpoint
        from .export.writer import Written
        from .progress import bar as progress_bar

        p = job.plan
        source = checkpoint_folder(p.source)
        ignored = source_files(source)[1]
        if ignored:
            console.print(f"ignored {', '.join(ignored)} in {source.name}: not among the files transformers loads")
        with progress_bar("stream", enabled=job.progress, unit="tensors", eta=False) as bar:
            task = bar.add_task("", total=len(list_tensors(source)))
            streamed = stream_reduce(p, folder, StreamOptions(
                p.recipe.export.max_shard_size, lambda key: bar.update(task, advance=1, description=key)))
        p.loaded_dtype = str(streamed.config.dtype).removeprefix("torch.")
        from .pipeline import load_tokenizer

        tokenizer = load_tokenizer(p)
        tokenizer.save_pretrained(folder)
        checkpoint, auto_map = finish_checkpoint(folder, streamed.model, {**streamed.ranks, **streamed.fused},
                                                streamed.expected)
        return Written(streamed.entries, p.loaded_dtype, checkpoint, auto_map, True, None, tokenizer)


def export_streamed(job) -> object:
    """Stream-reduce ``job.plan`` into ``job.out`` (:func:`laser_export.export.writer.write_export`); returns the
    :class:`~laser_export.artifacts.Manifest`."""
    from .export.writer import write_export

    reason = streamable(job.plan)
    if reason is not None:
        raise StreamError(f"cannot stream this recipe: {reason}")
    return write_export(job, StreamedWeights())
