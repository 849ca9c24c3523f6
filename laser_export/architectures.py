"""Architecture knowledge as data: one validated JSON file per model family in ``laser_export/families/``.

Each family says, relative to the model's *base model* (``model.base_model``, e.g. ``LlamaModel``
inside ``LlamaForCausalLM``), where the list of transformer blocks lives and, relative to one
block, which module each matrix alias names. Aliases follow the paper: ``fc_in`` (the MLP's first
matrix: GPT-J ``fc_in``, Llama ``gate_proj``), ``fc_up`` (Llama's ``up_proj``), ``fc_out``, and
attention ``q``/``k``/``v``/``o`` (``qkv`` where a family fuses them). Groups expand to every alias
of that kind that the family has.

A family file also carries the *capabilities* the rest of the package reads instead of testing
model-type strings: ``task`` (causal-lm | masked-lm), ``auto_class``, ``pipeline_tag``, ``onnx``
(our ONNX exporter supports it), ``gguf_arch`` (llama.cpp architecture name that our GGUF writer supports and tests, or null),
``scorers`` (the scorers of :mod:`laser_export.evaluate` that apply) and ``weight_layout``
(``linear``: weight stored (out, in); ``conv1d``: GPT-2 style (in, out)). ``per_model_type``
overrides any of ``layers``, ``final_norm``, ``gguf_arch`` for one model type of the family
(Gemma-3's multimodal checkpoint keeps its blocks under ``language_model.layers``).

A matrix alias names a module (``"mlp.gate_proj"``: its ``weight``) or, for fused tensors, a
:class:`MatrixSpec` object: ``{"module": "mlp.gate_up_proj", "split": [1, 1], "part": 0}`` is the first
of two equal row blocks of that Linear's weight (Phi-3's gate rows); ``split`` entries are integers or
config attribute names (``["num_attention_heads", "num_key_value_heads", "num_key_value_heads"]`` splits a
fused q/k/v by head counts). ``{"module": "mlp.experts", "tensor": "gate_up_proj", "experts":
"num_local_experts", ...}`` names a fused 3-D expert tensor ``[experts, out, in]`` (transformers 5's
Mixtral/Qwen3-MoE layout): the alias means one (out, in) matrix per expert, the config attribute gives
their number. A spec alias is reduced block by block (:mod:`laser_export.fused`), dense or factorised per block.
The ``router`` alias (the MoE gate) belongs to no group: it is reduced only when named.

Adding an architecture = adding one ``families/<name>.json`` file (and one row of the tiny-model
table in ``tests/tinymodels.py``).
"""

from __future__ import annotations

from .errors import InputError
import json
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

#: Matrix aliases a family may define (the paper's names).
ALIASES = ("fc_in", "fc_up", "fc_out", "q", "k", "v", "qkv", "o", "router")

#: Groups of aliases; each expands to the members the family actually has.
GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("fc_in", "fc_up", "fc_out"),
    "attn": ("q", "k", "v", "qkv", "o"),
}

#: Scorer names (see :mod:`laser_export.evaluate`): ``causal`` next-token top-k and teacher-forced
#: log-probs, ``masked`` the prediction at a mask token, ``generate`` greedy decoding,
#: ``masked_generate`` the argmax at a fixed number of mask tokens (a masked LM's "generation").
SCORERS = ("causal", "masked", "generate", "masked_generate")
_MASKED_SCORERS = {"masked", "masked_generate"}

_TASK_CLASSES = {
    "causal-lm": ("AutoModelForCausalLM", "text-generation"),
    "masked-lm": ("AutoModelForMaskedLM", "fill-mask"),
}


class MatrixSpec(BaseModel):
    """A matrix that is part of a parameter: a row block of a fused 2-D weight and/or one expert's
    slice of a fused 3-D ``[experts, out, in]`` tensor (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str = Field(description="module path relative to one block")
    tensor: str = Field("weight", description="parameter of that module")
    split: tuple[int | str, ...] | None = Field(None, min_length=2, description="row-block weights: ints or config attributes")
    part: int | None = Field(None, ge=0, description="which row block of `split`")
    experts: str | None = Field(None, description="config attribute with the number of experts (dim 0 of the tensor)")

    @model_validator(mode="after")
    def _split_part(self):
        if (self.split is None) != (self.part is None):
            raise ValueError("split and part go together")
        if self.split is not None and self.part >= len(self.split):
            raise ValueError(f"part {self.part} out of range for a split into {len(self.split)} blocks")
        return self


class _Override(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: str | None = None
    final_norm: str | None = None
    gguf_arch: str | None = None


class Family(BaseModel):
    """One model family (validated from its JSON file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    model_types: tuple[str, ...] = Field(min_length=1)
    layers: str = Field(description="ModuleList of blocks, relative to the base model")
    matrices: dict[str, str | MatrixSpec] = Field(description="alias -> module path relative to one block (or a MatrixSpec)")
    final_norm: str | None = Field(description="relative to the base model (null: post-LN models)")
    task: Literal["causal-lm", "masked-lm"]
    auto_class: Literal["AutoModelForCausalLM", "AutoModelForMaskedLM"]
    pipeline_tag: Literal["text-generation", "fill-mask"]
    weight_layout: Literal["linear", "conv1d"] = "linear"
    onnx: bool = False
    gguf_arch: str | None = None
    scorers: tuple[Literal["causal", "masked", "generate", "masked_generate"], ...] = Field(min_length=1)
    per_model_type: dict[str, _Override] = Field(default_factory=dict)
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self):
        unknown = [a for a in self.matrices if a not in ALIASES]
        if unknown:
            raise ValueError(f"matrices: unknown alias(es) {unknown}; aliases are {', '.join(ALIASES)}")
        if not self.matrices:
            raise ValueError("matrices: at least one alias")
        auto, tag = _TASK_CLASSES[self.task]
        if self.auto_class != auto or self.pipeline_tag != tag:
            raise ValueError(f"task {self.task} needs auto_class {auto} and pipeline_tag {tag}")
        if self.task == "masked-lm" and set(self.scorers) - _MASKED_SCORERS:
            raise ValueError("a masked-lm family can only use the masked and masked_generate scorers")
        if self.task == "causal-lm" and set(self.scorers) & _MASKED_SCORERS:
            raise ValueError("a causal-lm family cannot use the masked scorers")
        stray = set(self.per_model_type) - set(self.model_types)
        if stray:
            raise ValueError(f"per_model_type: {sorted(stray)} not in model_types")
        return self

    def for_model_type(self, model_type: str) -> "Family":
        """This family with the overrides of ``model_type`` applied (itself when there are none)."""
        over = self.per_model_type.get(model_type)
        if over is None:
            return self
        return self.model_copy(update=over.model_dump(exclude_unset=True))

    def __hash__(self) -> int:  # dict fields: hash by identity of the data file
        return hash((self.name, self.layers, self.final_norm))


class ArchitectureError(InputError):
    """A model, layer or matrix that the architecture table cannot resolve."""


def _read_family(text: str, where: str) -> Family:
    try:
        return Family.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise ArchitectureError(f"{where}: invalid family file: {err}") from None
    except ValidationError as err:
        why = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<family>'}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
        )
        raise ArchitectureError(f"{where}: invalid family file: {why}") from None


@lru_cache(maxsize=1)
def _load_table() -> tuple[Family, ...]:
    files = sorted(
        (f for f in resources.files("laser_export.families").iterdir() if f.name.endswith(".json")),
        key=lambda f: f.name,
    )
    table = []
    seen: dict[str, str] = {}
    for f in files:
        fam = _read_family(f.read_text(encoding="utf-8"), f"laser_export/families/{f.name}")
        if f.name != f"{fam.name}.json":
            raise ArchitectureError(f"laser_export/families/{f.name}: name {fam.name!r} must match the file name")
        for mt in fam.model_types:
            if mt in seen:
                raise ArchitectureError(f"model_type {mt!r} is claimed by both {seen[mt]} and {fam.name}")
            seen[mt] = fam.name
        table.append(fam)
    return tuple(table)


_TABLE: tuple[Family, ...] = _load_table()
FAMILIES: MappingProxyType[str, Family] = MappingProxyType({f.name: f for f in _TABLE})
_BY_MODEL_TYPE = {mt: f for f in _TABLE for mt in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str) -> Family:
    """The family of ``model_type``, with that model type's overrides applied."""
    try:
        return _BY_MODEL_TYPE[model_type].for_model_type(model_type)
    except KeyError:
        raise ArchitectureError(
            f"unknown architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        ) from None


def families_with(**capabilities) -> list[Family]:
    """Families whose fields equal the given values (``families_with(onnx=True)``)."""
    return [f for f in _TABLE if all(getattr(f, k) == v for k, v in capabilities.items())]


def model_types_with(**capabilities) -> list[str]:
    return sorted(mt for f in families_with(**capabilities) for mt in f.model_types)


def expand_matrix(family: Family, matrix: str) -> list[str]:
    """An alias or a group name -> the list of aliases it means for this family."""
    if matrix in GROUPS:
        return [a for a in GROUPS[matrix] if a in family.matrices]
    if matrix in family.matrices:
        return [matrix]
    known = ", ".join(list(family.matrices) + [g for g in GROUPS if expand_matrix(family, g)])
    hint = f" ({family.notes})" if family.notes else ""
    raise ArchitectureError(f"{family.name} has no matrix {matrix!r}; choose one of: {known}{hint}")


def num_layers(config) -> int:
    """Number of transformer blocks from a transformers config (num_hidden_layers is aliased
    to n_layer/num_layers by the configs that use other names)."""
    text = getattr(config, "text_config", None) or config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError(f"cannot tell the number of layers of model_type {config.model_type!r}")


def base_prefix(model: nn.Module) -> str:
    """Qualified-name prefix of the base model inside ``model`` ('' when model is the base)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def matrix_spec(family: Family, alias: str) -> MatrixSpec:
    """The alias as a :class:`MatrixSpec` (a plain module path becomes ``MatrixSpec(module=path)``)."""
    spec = family.matrices[alias]
    return MatrixSpec(module=spec) if isinstance(spec, str) else spec


def is_fused(family: Family, alias: str) -> bool:
    """True when the alias is given as a :class:`MatrixSpec` (a row block, experts, or a module such as a
    router that is not a plain linear layer): reduced by :mod:`laser_export.fused` (dense write-back, or per-block factors)."""
    return not isinstance(family.matrices[alias], str)


def _config_int(config, attr: str, what: str) -> int:
    text = getattr(config, "text_config", None) or config
    value = getattr(text, attr, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArchitectureError(f"{what}: config of model_type {config.model_type!r} has no positive integer {attr!r}")
    return value


def num_experts(family: Family, alias: str, config) -> int | None:
    """How many experts the alias has in this config (None: not an expert tensor)."""
    spec = matrix_spec(family, alias)
    return None if spec.experts is None else _config_int(config, spec.experts, f"{family.name} {alias}")


def row_block(family: Family, alias: str, config, rows: int) -> tuple[int, int] | None:
    """(start, stop) of the alias's row block in a fused matrix of ``rows`` rows (None: every row)."""
    spec = matrix_spec(family, alias)
    if spec.split is None:
        return None
    what = f"{family.name} {alias}"
    weights = [w if isinstance(w, int) else _config_int(config, w, what) for w in spec.split]
    total = sum(weights)
    if rows % total:
        raise ArchitectureError(f"{what}: {rows} rows do not split as {list(spec.split)} = {weights}")
    unit = rows // total
    start = unit * sum(weights[: spec.part])
    return start, start + unit * weights[spec.part]


def module_name(model: nn.Module, family: Family, layer: int, alias: str) -> str:
    """Qualified name of the module holding the alias's matrix (for a fused alias, the fused module)."""
    return f"{base_prefix(model)}{family.layers}.{layer}.{matrix_spec(family, alias).module}"


def layer_modules(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(f"{base_prefix(model)}{family.layers}")
