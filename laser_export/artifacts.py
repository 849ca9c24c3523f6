"""Typed artifacts: the export manifest, one reduced-matrix entry, and the verify report.

They are written as JSON (``manifest.json``, ``verify_report.json``); these pydantic models are their
schema. ``python -m laser_export.artifacts`` (re)writes the JSON Schemas to ``laser_export/schemas/``
(a test checks they are current). Readers (the model card) validate the JSON into these models and use
attributes, never ``dict.get``. Unknown keys are kept (``extra="allow"``), so a newer writer's additions
survive a round trip through an older reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .atomic import write_text

SCHEMA_DIR = Path(__file__).parent / "schemas"


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------------------------- manifest
class MatrixEntry(_Artifact):
    """One reduced matrix (manifest ``matrices[]``, verify report ``interventions[]``)."""

    name: str = Field(description="qualified module name, e.g. model.layers.28.mlp.up_proj")
    intervention: int | None = Field(None, description="index of the recipe intervention it comes from")
    layer: int
    matrix: str = Field(description="alias: fc_in, fc_up, fc_out, q, k, v, o, qkv")
    shape: list[int] = Field(description="[out, in]")
    rho: float | None = None
    rank: int
    max_rank: int
    frobenius_error: float | None = None
    relative_error: float | None = Field(None, description="||W - W_k||_F / ||W||_F")
    storage: Literal["dense", "factorised"] = "dense"
    bytes_dense: int | None = None
    bytes_stored: int | None = None
    bytes_saved: int = 0
    expert: int | None = Field(None, description="MoE: the expert of a fused expert tensor (absent otherwise)")

    def as_dict(self) -> dict:
        """The entry as written to JSON: ``expert`` only for an expert's matrix."""
        return self.model_dump(mode="json", exclude={"expert"} if self.expert is None else set())


def matrix_entry(target, name: str, shape, k: int, storage: str, itemsize: int, err: float,
                 norm: float) -> "MatrixEntry":
    """The entry of one reduced matrix (``target``: an :class:`~laser_export.intervene.Target`): rank, shape,
    Frobenius error, bytes in ``storage`` at ``itemsize`` bytes per element. The only place entries are built."""
    m, n = (int(d) for d in shape)
    dense_bytes = m * n * itemsize
    stored = k * (m + n) * itemsize if storage == "factorised" else dense_bytes
    return MatrixEntry(name=name, intervention=target.index, layer=target.layer, matrix=target.alias, shape=[m, n],
                       rho=target.rho, rank=k, max_rank=min(m, n), frobenius_error=err,
                       relative_error=err / norm if norm else 0.0, storage=storage, bytes_dense=dense_bytes,
                       bytes_stored=stored, bytes_saved=dense_bytes - stored, expert=getattr(target, "expert", None),
                       **(target.auto.manifest() if getattr(target, "auto", None) else {}))  # rank: auto's edge


class SourceInfo(_Artifact):
    """Where the weights came from and in which form they were loaded."""

    source: str = Field(description="model.source as written in the recipe (a local path: its file or folder name)")
    revision: str | None = None
    architecture: str | None = Field(None, description="laser-export family name")
    model_type: str | None = None
    base_model: str | None = Field(None, description="Hub id of the original model")
    license: str | None = None
    language: str | list[str] | None = Field(None, description="model.language, else the source model card's "
                                             "`language` (ISO 639 codes)")
    dtype: str | None = Field(None, description="dtype the weights were loaded (and reduced) in")
    format: Literal["gguf", "transformers"] | None = Field(None, description="file format of the source")
    gguf_file: str | None = None
    gguf_quantization: str | None = Field(None, description="GGUF file type, e.g. Q4_1 (dequantized on load)")
    tensor_bytes: int | None = Field(None, description="bytes of the source's tensors as stored (the files "
                                     "transformers loads), when known")


class OnnxInfo(_Artifact):
    file: str
    max_abs_diff: float
    tolerance: float
    passed: bool


class GgufInfo(_Artifact):
    file: str
    arch: str
    dtype: str
    tokenizer: bool = Field(False, description="tokenizer metadata copied from the source GGUF")
    tensor_bytes: int | None = None
    max_abs_diff: float | None = Field(None, description="max |logits| difference, GGUF read back vs safetensors")
    tolerance: float | None = None


class Totals(_Artifact):
    n_matrices: int = 0
    bytes_saved: int = 0


class CheckpointInfo(_Artifact):
    """The safetensors checkpoint of the export, as read back after writing."""

    tensor_bytes: int
    files: list[str]


class Manifest(_Artifact):
    """``manifest.json`` of an export."""

    laser_export_version: str = ""
    recipe: str | None = None
    model: SourceInfo | None = None
    storage: Literal["dense", "factorised"] = "dense"
    export_dtype: str | None = Field(None, description="dtype of the exported tensors")
    reduction: dict[str, Any] | None = None
    matrices: list[MatrixEntry] = []
    totals: Totals = Totals()
    checkpoint: CheckpointInfo | None = Field(None, description="tensor_bytes and files of the safetensors")
    auto_map: dict[str, str] | None = Field(None, description="remote-code classes of a factorised export")
    onnx: OnnxInfo | None = None
    gguf: GgufInfo | None = None
    streamed: bool | None = Field(None, description="written shard by shard (laser_export.stream) rather than "
                                  "from a model loaded whole; the files are the same either way")

    def to_json(self) -> dict:
        """The manifest as written to ``manifest.json`` (unset optional sections left out)."""
        data = self.model_dump(mode="json", exclude_none=False)
        data["matrices"] = [m.as_dict() for m in self.matrices]
        for key in ("checkpoint", "auto_map", "onnx", "gguf", "export_dtype", "streamed"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


# --------------------------------------------------------------------------------------------- report
class BenchmarkInfo(_Artifact):
    name: str
    split: str = "test"
    seed: int | None = None
    validation_fraction: float | None = None
    subsample: int | None = None
    sizes: dict[str, int] = {}
    n_scored: int | None = None
    examples_sha256: str | None = None
    limit: int | None = None
    hub_dataset: str | None = Field(None, description="Hub dataset id the examples correspond to")
    hub_config: str | None = None
    hub_revision: str | None = None
    hub_split: str | None = Field(None, description="the Hub dataset's split(s) the examples are drawn from")
    examples_from: str | None = Field(None, description="where the examples were read")


class Delta(_Artifact):
    estimate: float | None = None
    ci95: list[float] | None = None
    n: int | None = None


class ClaimResult(_Artifact):
    name: str
    metric: str
    claimed: float
    measured: float | None = None
    tolerance: float
    passed: bool
    why: str | None = None


class PrefixCacheInfo(_Artifact):
    status: Literal["hit", "miss", "skipped"] = Field(
        description="hit: the reduced pass replayed a prefix read from the cache; miss: none usable, the baseline "
        "pass captured it (``path``: where it was stored, if it was); skipped: not stored / not used (``reason``)")
    reason: str | None = None
    path: str | None = None
    bytes: int | None = Field(default=None, description="size of the stored prefix file (or of the skipped prefix)")


class BaselineCacheInfo(_Artifact):
    hit: bool = Field(description="the baseline came from the cache (not scored in this run)")
    key: str
    path: str | None = None
    prefix: PrefixCacheInfo | None = None


class VerifyReport(_Artifact):
    """``verify_report.json`` (also ``reports/<name>.verify.json``)."""

    recipe: str | None = None
    benchmark: BenchmarkInfo | None = None
    metrics: dict[str, dict[str, float]] = {}
    delta: dict[str, Delta] = {}
    claims: list[ClaimResult] = []
    interventions: list[MatrixEntry] = []
    passed: bool = False
    skip_verify: bool = False
    # choice tasks: majority-class rate and prediction concentration per side (laser_export.answer_balance)
    answer_balance: dict[str, dict[str, Any] | None] | None = None
    prefix_cache: bool | None = None
    baseline_cache: BaselineCacheInfo | None = None
    seconds: dict[str, float] = {}


SCHEMAS: dict[str, type[BaseModel]] = {
    "manifest": Manifest,
    "matrix_entry": MatrixEntry,
    "verify_report": VerifyReport,
}


def schema_text(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in SCHEMAS.items():
        path = folder / f"{name}.schema.json"
        write_text(path, schema_text(model))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_schemas():
        print(p)
