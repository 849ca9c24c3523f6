"""The recipe: a YAML file that names a model, its LASER interventions, storage, benchmark, claims
and export targets. Pydantic models with unknown fields forbidden; every error names its field path
(``interventions[1].rho: ...``)."""

from __future__ import annotations

from .errors import InputError
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)


def _no_bool(v):
    """YAML ``true`` is not a number: pydantic's lax mode would read it as 1 / 1.0."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


def _size(v) -> int:
    """``max_shard_size`` as bytes: an integer, or <number><unit> with B, KB, MB, GB, TB (powers of 1000) or
    KiB, MiB, GiB, TiB (powers of 1024), case-insensitive. Converted here, once, so that every writer gets
    the same integer (transformers' own parser refuses "1.5GB" and reads "5Gb" as bits)."""
    want = f"expected a size such as 500MB, 2GB or 5GiB (or bytes as an integer), got {v!r}"
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(want)
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"must be a positive number of bytes, got {v}")
        return v
    m = _SIZE.match(v)
    if not m:
        raise ValueError(want)
    size = int(float(m["n"]) * _UNITS[(m["unit"] or "B").upper()])
    if size < 1:
        raise ValueError(f"must be a positive number of bytes, got {v!r}")
    return size


def _language(v):
    """``model.language``: an ISO 639-1 (``en``) or ISO 639-3 (``eng``, ``yue``) code, or a list of them, as the
    Hub's card metadata takes them; checked against pycountry's ISO 639 table."""
    if v is None:
        return v
    import pycountry

    codes = [v] if isinstance(v, str) else v
    if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
        raise ValueError(f"expected a language code or a list of them (ISO 639-1/639-3, e.g. en), got {v!r}")
    for c in codes:
        key = {2: "alpha_2", 3: "alpha_3"}.get(len(c))
        if c != c.lower() or key is None or pycountry.languages.get(**{key: c}) is None:
            raise ValueError(f"{c!r} is not an ISO 639-1 or ISO 639-3 language code (lowercase, e.g. en, fr, yue)")
    if len(set(codes)) != len(codes):
        raise ValueError(f"language codes must be distinct, got {codes}")
    return v


def _rank(v):
    """An explicit rank: a positive integer, or ``auto`` (the Marchenko–Pastur rule)."""
    if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"expected a positive integer or auto, got {v!r}")


#: int fields refuse booleans and strings ("3"); float fields refuse booleans (ints are fine).
Int = Annotated[StrictInt, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Bool = StrictBool

_SIZE = re.compile(r"^\s*(?P<n>\d+(\.\d+)?)\s*(?P<unit>B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.I)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: a Hub repo id: namespace/name (huggingface_hub.utils.validate_repo_id rules, with the namespace required)
_REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(?<![.-])$")


#: a recipe name: it names out/<name>/ and reports/<name>.verify.json, so it is a safe, short file name
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_MAX = 200


def check_name(name: str) -> str | None:
    """None when ``name`` can name a recipe (and its files); else why not."""
    if not re.fullmatch(NAME_PATTERN, name):
        return f"{name!r} should be letters, digits, '.', '_' and '-', starting with a letter or digit"
    if len(name) > NAME_MAX:
        return f"{len(name)} characters; at most {NAME_MAX} (it names files)"
    return None


def check_repo_id(repo_id: str) -> str | None:
    """None when ``repo_id`` is a valid ``namespace/name``; else why not."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        return f"{repo_id!r} is not a Hub repo id (namespace/name: letters, digits, '-', '_', '.')"
    return None


class RecipeError(InputError):
    """A recipe problem. ``str()`` is one line per problem, each starting with its field path."""

    def __init__(self, problems: list[str], file: str | Path | None = None):
        self.problems = problems
        self.file = str(file) if file else None
        where = f"{self.file}: " if self.file else ""
        super().__init__("\n".join(f"{where}{p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(_Strict):
    source: str = Field(
        description="Hub id (org/name, optional @revision), local folder, path to a .gguf file, "
        "or package:PKG/FILE for a file inside an installed Python package"
    )
    revision: str | None = Field(None, description="Hub revision (commit sha, tag or branch)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="dtype the weights are loaded (and exported) in; auto: the checkpoint's own "
        "(no whole-model copy; a GGUF file is de-quantized to float32)",
    )
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="dtype the forward passes (scoring) run in, module by module; the weights stay in `dtype` "
        "and are reduced and exported as such. auto: the weights' dtype, except float16 on a CPU (no native "
        "fp16 arithmetic): float32, which keeps every fp16 value exact. bfloat16 rounds fp16 weights while "
        "computing (fast on CPUs with AVX512-BF16). Recorded in the report, manifest and card",
    )
    base_model: str | None = Field(None, description="Hub id of the original model, for the model card")
    license: str | None = Field(None, description="license of the source weights, carried to the model card")
    language: Annotated[str | list[str] | None, BeforeValidator(_language)] = Field(
        None, description="language(s) of the model, ISO 639-1/639-3 codes (en, [en, fr]), carried to the model card")
    trust_remote_code: Bool = False
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="accelerate device map for models bigger than one device: 'auto', 'balanced', "
        "'sequential' or {module: device} with devices like 0, 'cpu', 'disk'; replaces `device`",
    )
    offload_folder: str | None = Field(None, description="folder for weights a device_map sends to 'disk'")
    model_type: str | None = Field(
        None, description="expected config.model_type; lets `check` validate without the weights"
    )
    num_layers: Int | None = Field(None, ge=1, description="expected number of layers (checked like model_type)")


class Intervention(_Strict):
    layer: Int = Field(ge=0)
    matrix: str = Field(description="alias (fc_in, fc_up, fc_out, q, k, v, o, qkv) or group (mlp, attn)")
    rho: Float | None = Field(None, description="fraction of the maximum rank kept, in (0, 1]")
    rank: Annotated[int | Literal["auto"] | None, BeforeValidator(_rank)] = Field(
        None,
        description="explicit rank instead of rho, or auto: the singular values above the Marchenko–Pastur "
        "noise edge of the matrix")
    experts: Literal["all"] | list[Int] | None = Field(
        None, description="MoE: which experts' matrices to reduce (each on its own): all (the default) or a list of indices"
    )

    @field_validator("experts")
    @classmethod
    def _experts(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one expert index (or all)")
            if any(e < 0 for e in v) or len(set(v)) != len(v):
                raise ValueError(f"expert indices must be distinct and >= 0, got {v}")
        return v

    @field_validator("rho")
    @classmethod
    def _rho_range(cls, v):
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1] (fraction of max rank kept), got {v}")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if (self.rho is None) == (self.rank is None):
            raise ValueError("give exactly one of rho (fraction of max rank kept) or rank")
        return self


class Reduction(_Strict):
    method: Literal["exact", "randomized"] = "exact"
    svd_dtype: Literal["float32", "float64"] = "float32"
    oversampling: Int = Field(10, ge=0)
    power_iterations: Int = Field(4, ge=0)
    seed: Int = 0


class BenchmarkSpec(_Strict):
    name: str = Field(description="a benchmark of laser_export.benchmarks.BENCHMARKS (README: Benchmarks and metrics)")
    path: str | None = Field(None, description="data file/archive/URL; default lookup per benchmark")
    split: Literal["validation", "test", "all"] = Field(
        "test", description="all: score every example (no validation part; validation_fraction is not used)")
    seed: Int | None = Field(0, description="seed of the split; null = the paper's unshuffled split")
    validation_fraction: Float = Field(0.2, gt=0, lt=1)
    subsample: Int | None = Field(
        None, ge=2, description="draw N examples (whole groups) at random with `seed` before splitting"
    )
    metric: str = "top1"
    batch_size: Int = Field(16, ge=1)


class PerplexitySpec(_Strict):
    """Collateral cost: perplexity on general text, measured by verify before and after the reduction."""

    dataset: str = Field("wikitext", description="Hub dataset id with a `text` column")
    config: str | None = Field("wikitext-2-raw-v1", description="its config (subset)")
    split: str = "test"
    path: str | None = Field(None, description="local .txt file, folder of .txt files, or Hub-layout copy")
    max_tokens: int = Field(20_000, ge=2, description="score the first N tokens of the joined text")
    context: int = Field(1024, ge=2, description="window length (capped at the model's max positions)")
    stride: int = Field(512, ge=1, description="window step; each token is predicted once")

    @model_validator(mode="after")
    def _stride(self):
        if self.stride > self.context:
            raise ValueError(f"stride ({self.stride}) must be <= context ({self.context})")
        return self


class LmEvalSpec(_Strict):
    """lm-evaluation-harness tasks that verify measures before and after the reduction (collateral cost, with
    paired-bootstrap CIs over the same documents). Needs the ``laser-export[lm-eval]`` extra."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names (e.g. arc_easy, hellaswag)")
    num_fewshot: Int | None = Field(None, ge=0, description="few-shot examples per prompt (null: each task's default)")
    limit: Int | None = Field(None, ge=1, description="score only the first N documents of each task")
    batch_size: Int = Field(1, ge=1)
    include_path: str | None = Field(None, description="folder of extra lm-eval task YAMLs (local tasks)")

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, v):
        blank = [i for i, t in enumerate(v) if not t.strip()]
        if blank:
            raise ValueError(f"task names must not be empty (item {blank[0]})")
        if len(set(v)) != len(v):
            raise ValueError(f"task names must be distinct, got {v}")
        return v


class Claim(_Strict):
    accuracy: Float = Field(ge=0, le=1)


class Claims(_Strict):
    baseline: Claim
    reduced: Claim
    tolerance: Float = Field(0.01, ge=0, le=1)


class HubSpec(_Strict):
    repo_id: str
    private: Bool = False

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v):
        why = check_repo_id(v)
        if why:
            raise ValueError(why)
        return v


class ExportSpec(_Strict):
    formats: list[Literal["safetensors", "onnx", "gguf"]] = ["safetensors"]
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of the exported tensors (default: the dtype the model is loaded in, model.dtype)"
    )
    max_shard_size: Annotated[int, BeforeValidator(_size)] = Field(
        2 * 10**9, description="safetensors shard size: bytes, or 500MB / 2GB / 5GiB (read as bytes)"
    )
    onnx_with_past: Bool = True
    onnx_tolerance: Float = Field(
        1e-4, gt=0, description="max |logit difference| onnxruntime vs torch (fp32) for the export to pass"
    )
    onnx_quantized: Bool = Field(False, description="also write onnx/model_quantized.onnx (8-bit dynamic, "
                                 "onnxruntime's quantizer): the file transformers.js loads by default")
    gguf_types: list[Literal["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]] = Field(
        [], description="quantized GGUF variants written next to the export-dtype file (<name>-Q8_0.gguf)")
    hub: HubSpec | None = None

    @model_validator(mode="after")
    def _variants_need_their_format(self):
        if self.gguf_types and "gguf" not in self.formats:
            raise ValueError("export.gguf_types needs gguf in export.formats")
        if self.onnx_quantized and "onnx" not in self.formats:
            raise ValueError("export.onnx_quantized needs onnx in export.formats")
        if self.dtype == "bfloat16" and "onnx" in self.formats:
            raise ValueError("export.dtype: bfloat16 ONNX does not run in onnxruntime's CPU provider (no bf16 "
                             "kernels); use float16 or float32 with onnx")
        return self


class Recipe(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX)
    description: str | None = None
    model: ModelSpec
    interventions: list[Intervention] = Field(min_length=1)
    reduction: Reduction = Reduction()
    storage: Literal["dense", "factorised"] = "dense"
    benchmark: BenchmarkSpec | None = None
    claims: Claims | None = None
    perplexity: PerplexitySpec | None = None
    lm_eval: LmEvalSpec | None = None
    export: ExportSpec = ExportSpec()

    @model_validator(mode="after")
    def _claims_need_benchmark(self):
        if self.claims is not None and self.benchmark is None:
            raise ValueError("claims need a benchmark to be verified on")
        return self

    @model_validator(mode="after")
    def _gguf_is_dense(self):
        if "gguf" in self.export.formats and self.storage == "factorised":
            raise ValueError("export.formats: gguf holds dense weights only (llama.cpp has no factorised layers); "
                             "use storage: dense, or drop gguf")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<recipe>"


def format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{_path(loc)}: {msg}")
    return problems


def parse_recipe(data: object, file: str | Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(["<recipe>: expected a mapping at the top level"], file)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err), file) from None


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """Read and validate a recipe file; returns (recipe, yaml_text)."""
    from .inputs import InputFileError, read_regular

    path = Path(path)
    try:
        raw = read_regular(path, "recipe", limit=16 << 20)
    except InputFileError as err:
        reason = err.reason.replace("cannot read:", "cannot read recipe:")
        raise RecipeError([f"<file>: {reason}"], path) from None
    if b"\0" in raw:
        raise RecipeError(["<file>: not a text file (binary data); a recipe is a YAML file"], path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError([f"<file>: not UTF-8 text (byte {err.start}); save the recipe as UTF-8"], path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError([f"<yaml>: {' '.join(str(err).split())}"], path) from None
    except RecursionError:
        raise RecipeError(["<yaml>: nested too deeply"], path) from None
    return parse_recipe(data, path), text
