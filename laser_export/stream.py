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

The folder is written through :func:`laser_export.export.safetensors.atomic_folder` (all or nothing)
and holds what the in-memory export holds: config (with the ``laser`` quantization_config for a
factorised export), generation config, tokenizer, shards + index, recipe, manifest and model card.
"""

from __future__ import annotations

from .errors import InputError
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .atomic import write_json, write_text
from .intervene import SVDCache, _matrix_entry, truncation_error
from .lowrank import LowRankLinear, factorised_saves_bytes
from .recipe import RecipeError

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"


class StreamError(InputError):
    """The source cannot be streamed (not a safetensors checkpoint, unknown tensor names, ...)."""


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '10KB' / int bytes → bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


# -------------------------------------------------------------------------------------------------
# source side
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceTensor:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def checkpoint_folder(source) -> Path:
    """The local folder of a folder/Hub source that holds safetensors files, else StreamError."""
    if source.kind == "folder":
        folder = Path(source.location)
    elif source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source.location, revision=source.revision,
                                            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as err:  # noqa: BLE001 - any hub failure: report it with the source
            raise StreamError(f"model.source: cannot fetch {source.describe()} for streaming: {err}") from err
    else:
        raise StreamError(f"model.source: {source.describe()} is a {source.kind} source; streaming needs a "
                          "safetensors checkpoint (a local folder or Hub id)")
    if not list(folder.glob("*.safetensors")):
        raise StreamError(f"model.source: {folder} has no *.safetensors files to stream")
    return folder


def list_tensors(folder: Path) -> list[SourceTensor]:
    """Every tensor of the checkpoint, shard by shard in index order, from the headers only."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    out = []
    for name in files:
        path = folder / name
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _FROM_ST.get(sl.get_dtype())
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


# -------------------------------------------------------------------------------------------------
# output side: safetensors written tensor by tensor under a header planned in advance
# -------------------------------------------------------------------------------------------------
@dataclass
class OutTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes one safetensors file whose header (names, dtypes, shapes, offsets) is known up front,
    then receives the tensors in that order, one at a time."""

    def __init__(self, path: Path, tensors: list[OutTensor]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.expected = path, list(tensors)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        t = self.expected[self._next]
        if key != t.key or tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
            raise StreamError(f"{self.path.name}: expected {t.key} {t.dtype} {t.shape}, got {key} {tensor.dtype} "
                              f"{tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.expected):
            raise StreamError(f"{self.path.name}: {len(self.expected) - self._next} tensors were not written")


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(current)
    return shards


def write_shards(folder: Path, tensors: list[OutTensor], max_shard_size: int,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """Write the tensors (produced lazily, in order) as shards + index like save_pretrained does."""
    shards = plan_shards(tensors, max_shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        w = ShardWriter(folder / name, shard)
        try:
            for t in shard:
                if progress:
                    progress(t.key)
                w.write(t.key, t.produce())
                weight_map[t.key] = name
        finally:
            w._f.close()
        w.close()
    if n > 1:
        total = sum(t.nbytes for t in tensors)
        write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)
    return names


# -------------------------------------------------------------------------------------------------
# the streaming reduction
# -------------------------------------------------------------------------------------------------
@dataclass
class StreamOptions:
    """Typed options of :func:`stream_reduce`."""

    max_shard_size: str | int = "2GB"
    progress: Callable[[str], None] | None = None


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


def stream_reduce(p, out_folder: Path, options: StreamOptions | None = None) -> tuple[list[dict], list[str], object]:
    """Reduce ``p``'s targets shard by shard from its safetensors source into ``out_folder``.

    ``p`` is a :class:`laser_export.pipeline.Plan`. Writes shards, index and config.json into
    ``out_folder`` (an existing, empty folder, normally from ``atomic_folder``). Returns
    (manifest entries in target order, shard file names, the config written)."""
    from .architectures import module_name
    from .hf import LaserConfig
    from .lowrank import is_conv1d
    from .sources import DTYPES

    options = options or StreamOptions()
    recipe = p.recipe
    folder = checkpoint_folder(p.source)
    source = list_tensors(folder)
    by_key = {t.key: t for t in source}
    model = meta_model(p.config, p.family, recipe.model.trust_remote_code)
    want = DTYPES[recipe.model.dtype]

    def out_dtype(t: SourceTensor) -> torch.dtype:
        return t.dtype if want == "auto" or not t.dtype.is_floating_point else want

    # target → checkpoint key, matrix shape (out, in), rank; all checked before anything is written
    plans, problems, targets = {}, [], []
    prefix = getattr(model, "base_model_prefix", "")
    auto_reader = _Reader()  # rank: auto reads its matrix once here (one target at a time)
    for t in p.targets:
        name = module_name(model, p.family, t.layer, t.alias)
        module = model.get_submodule(name)
        key = f"{name}.weight"
        if key not in by_key and prefix and key.startswith(prefix + "."):
            key = key[len(prefix) + 1 :]
        if key not in by_key:
            raise StreamError(f"{folder}: checkpoint has no tensor {name}.weight (needed by {t.field}); "
                              "use the in-memory path")
        src = by_key[key]
        conv = is_conv1d(module)
        shape = (src.shape[1], src.shape[0]) if conv else (src.shape[0], src.shape[1])
        if t.is_auto:
            w = auto_reader.get(src).to(out_dtype(src))
            t = t.with_auto_rank(w.t() if conv else w)
            del w
        targets.append(t)
        k = t.rank_for(shape)
        if k > min(shape):
            problems.append(f"{t.field}.rank: {name} has shape {list(shape)}, max rank {min(shape)}, got {k}")
        bias_key = f"{key[: -len('.weight')]}.bias"
        plans[key] = (t, name, conv, shape, k, bias_key if bias_key in by_key else None)
    auto_reader.close()
    if problems:
        raise RecipeError(problems)

    cache = SVDCache(recipe.reduction, max_bytes=0)
    reader = _Reader()
    entries: dict[int, dict] = {}
    ranks: dict[str, int] = {}
    state: dict[str, tuple] = {}  # key -> (svd, k) of the matrix being written (factorised: two tensors)

    def copy(src: SourceTensor):
        return lambda: reader.get(src).to(out_dtype(src))

    def reduced_matrix(key: str):
        """SVD of the target (in the output dtype, as the in-memory path sees it), entry recorded."""
        t, name, conv, shape, k, _ = plans[key]
        src = by_key[key]
        w = reader.get(src).to(out_dtype(src))
        matrix = w.t() if conv else w
        svd = cache.get(name, matrix, k)
        err, norm = truncation_error(matrix, svd, k)
        return t, name, conv, shape, k, svd, err, norm, w.element_size()

    out: list[OutTensor] = []
    for src in source:
        if src.key not in plans:
            out.append(OutTensor(src.key, out_dtype(src), src.shape, copy(src)))
            continue
        t, name, conv, shape, k, bias_key = plans[src.key]
        dtype = out_dtype(src)
        if k == min(shape):  # full rank: bit-exact copy (as in memory)
            out.append(OutTensor(src.key, dtype, src.shape, copy(src)))
            entries[id(t)] = {"full": True}
            continue
        factorised = recipe.storage == "factorised" and factorised_saves_bytes(k, shape)
        if not factorised:
            def dense(key=src.key, dtype=dtype):
                t, name, conv, shape, k, svd, err, norm, itemsize = reduced_matrix(key)
                entries[id(t)] = _matrix_entry(t, name, shape, k, t.rho, "dense", itemsize, err, norm)
                wk = svd.reconstruct(k, dtype=dtype)
                return wk.t().contiguous() if conv else wk

            out.append(OutTensor(src.key, dtype, src.shape, dense))
            continue
        # factorised: LowRankLinear's right factor as <module>.weight (k, in), left as .weight_out (out, k)
        ranks[name] = k
        base = src.key[: -len(".weight")]

        def right(key=src.key, dtype=dtype):
            t, name, conv, shape, k, svd, err, norm, itemsize = reduced_matrix(key)
            entries[id(t)] = _matrix_entry(t, name, shape, k, t.rho, "factorised", itemsize, err, norm)
            left, right_ = svd.factors(k)
            mod = LowRankLinear.from_factors(left, right_, None, dtype)  # the same casts as in memory
            state[key] = (mod.weight_out.detach(),)
            return mod.weight.detach()

        def left(key=src.key):
            (w_out,) = state.pop(key)
            return w_out

        out.append(OutTensor(src.key, dtype, (k, shape[1]), right))
        out.append(OutTensor(f"{base}.weight_out", dtype, (shape[0], k), left))

    try:
        files = write_shards(out_folder, out, parse_size(options.max_shard_size), options.progress)
    finally:
        reader.close()

    config = p.config
    if want != "auto":
        config.dtype = want
    elif getattr(config, "dtype", None) is None:
        floats = [t.dtype for t in source if t.dtype.is_floating_point]
        if floats:
            config.dtype = floats[0]
    if ranks:
        config.quantization_config = LaserConfig(ranks)
    elif getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(out_folder)
    if ranks:  # factorised: ship the loading code, as the in-memory export does
        from .export.remote_code import write_remote_code

        write_remote_code(out_folder, model)
    gen = folder / "generation_config.json"
    if gen.is_file():
        write_text(out_folder / gen.name, gen.read_text())

    ordered = []
    for t in targets:
        e = entries.get(id(t))
        if e is None or e.get("full"):
            key = next(k for k, v in plans.items() if v[0] is t)
            _, name, conv, shape, k, _ = plans[key]
            src = by_key[key]
            matrix = reader.get(src).to(out_dtype(src))
            from .intervene import frobenius_norm

            e = _matrix_entry(t, name, shape, k, t.rho, "dense", matrix.element_size(), 0.0, frobenius_norm(matrix))
            reader.close()
        ordered.append(e)
    return ordered, files, config


def streamable(p) -> str | None:
    """None when ``p`` can be streamed; else the reason (a sentence)."""
    if p.source.kind not in ("folder", "hub"):
        return f"the source is a {p.source.kind} file, not a safetensors checkpoint"
    if "onnx" in p.recipe.export.formats:
        return "ONNX export needs the model in memory"
    if "gguf" in p.recipe.export.formats:
        return "GGUF export needs the model in memory"
    if p.recipe.export.dtype is not None:
        return "export.dtype (a cast after loading) applies to the in-memory path"
    if p.recipe.model.device_map is not None:
        return "model.device_map applies to the in-memory path"
    from .architectures import is_fused

    if any(is_fused(p.family, t.alias) for t in p.targets):
        return "row blocks of fused tensors and MoE experts are reduced in memory"
    if p.source.kind == "folder" and not list(Path(p.source.location).glob("*.safetensors")):
        return "the source folder has no *.safetensors files"
    if p.source.kind == "folder" and json.loads((Path(p.source.location) / "config.json").read_text()).get(
            "quantization_config"):
        return "the source is already quantized/factorised"
    return None


# -------------------------------------------------------------------------------------------------
# export folder and the `apply` command
# -------------------------------------------------------------------------------------------------
@dataclass
class StreamExportOptions:
    """Typed options of :func:`export_streamed` (``laser-export apply`` / ``run --stream``)."""

    out: Path
    overwrite: bool = False
    report: dict | None = None  # a verify report of this recipe (from `laser-export verify`), carried to the card
    skip_verify: bool = True  # the card says the claims were not verified in this run
    repo_id: str | None = None
    private: bool = False
    progress: bool = True
    protect: tuple[Path, ...] | list[Path] = ()  # folders the export must never replace (the source, the data)


def export_streamed(p, options: StreamExportOptions) -> dict:
    """Stream-reduce ``p`` into ``options.out`` (atomic) with the same files as the in-memory export:
    shards + index, config, generation config, tokenizer, recipe.yaml, manifest.json, README.md
    (and verify_report.json when a report is given). Returns the manifest."""
    from .export.card import render_card
    from .policy import atomic_folder
    from .export.safetensors import MANIFEST, RECIPE, checkpoint_tensor_bytes
    from .pipeline import build_manifest
    from .progress import bar as progress_bar
    from .sources import DTYPES

    recipe = p.recipe
    reason = streamable(p)
    if reason is not None:
        raise StreamError(f"cannot stream this recipe: {reason}")
    n_tensors = len(list_tensors(checkpoint_folder(p.source)))
    with atomic_folder(options.out, overwrite=options.overwrite, protect=options.protect) as tmp, progress_bar(
        "stream", enabled=options.progress, unit="tensors", eta=False,
    ) as bar:
        task = bar.add_task("", total=n_tensors)

        def step(key: str) -> None:
            bar.update(task, advance=1, description=key)

        entries, files, config = stream_reduce(p, tmp, StreamOptions(recipe.export.max_shard_size, step))
        if DTYPES[recipe.model.dtype] == "auto":
            p.loaded_dtype = str(config.dtype).removeprefix("torch.")
        tokenizer = p.source.load_tokenizer(trust_remote_code=recipe.model.trust_remote_code)
        tokenizer.save_pretrained(tmp)
        manifest = build_manifest(p, entries)
        manifest["streamed"] = True
        auto_map = json.loads((tmp / "config.json").read_text()).get("auto_map")
        if auto_map:
            manifest["auto_map"] = auto_map
        manifest["checkpoint"] = {"tensor_bytes": checkpoint_tensor_bytes(tmp), "files": sorted(files)}
        write_text(tmp / RECIPE, p.yaml_text)
        if options.report is not None:
            write_json(tmp / "verify_report.json", options.report)
        write_json(tmp / MANIFEST, manifest)
        recipe_dict = recipe.model_dump(mode="json")
        if options.repo_id:
            recipe_dict["export"]["hub"] = {"repo_id": options.repo_id, "private": bool(options.private)}
        card = render_card(recipe_dict, p.yaml_text, manifest, options.report,
                           skip_verify=bool(options.skip_verify and recipe.claims is not None))
        write_text(tmp / "README.md", str(card))
    return manifest


def load_report(path: Path, recipe) -> dict:
    """A verify report for ``recipe`` whose claims passed, else RecipeError naming the file."""
    from .inputs import read_json_object

    report = read_json_object(path, "--report")
    if report.get("recipe") != recipe.name:
        raise RecipeError([f"--report: {path} is the report of recipe {report.get('recipe')!r}, not {recipe.name!r}"])
    if report.get("claims") and not report.get("passed"):  # no claims: measured only
        raise RecipeError([f"--report: {path} says the claims did not hold; nothing to apply"])
    return report
