"""One path for data: recipe → model source → targets → reduction → (verify) → exporters.

:func:`plan` does everything that needs no weights (source resolution, config, architecture,
layer/matrix checks). :func:`load_reduced` loads the weights and applies the interventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from rich.console import Console

from . import __version__
from .architectures import Family, family_for
from .intervene import SVDCache, Target, apply, plan_targets
from .recipe import Recipe, RecipeError
from .sources import ResolvedSource, SourceError, resolve_source

console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Plan:
    recipe: Recipe
    yaml_text: str
    source: ResolvedSource
    config: object
    family: Family
    targets: list[Target]
    config_from_hints: bool = False
    loaded_dtype: str | None = None  # the dtype the weights were loaded in (model.dtype "auto" resolved)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    entries: list[dict] = field(default_factory=list)


def _config_from_hints(recipe: Recipe):
    m = recipe.model
    if m.model_type is None or m.num_layers is None:
        return None
    return SimpleNamespace(model_type=m.model_type, num_hidden_layers=m.num_layers)


def _check_hints(recipe: Recipe, config) -> None:
    from .architectures import num_layers

    m, problems = recipe.model, []
    if m.model_type is not None and m.model_type != config.model_type:
        problems.append(f"model.model_type: recipe says {m.model_type!r}, the model is {config.model_type!r}")
    if m.num_layers is not None and m.num_layers != num_layers(config):
        problems.append(f"model.num_layers: recipe says {m.num_layers}, the model has {num_layers(config)}")
    if problems:
        raise RecipeError(problems)


def plan(recipe: Recipe, yaml_text: str = "", *, weights_free: bool = False) -> Plan:
    """Resolve the source and check the interventions against the model's config.

    ``weights_free=True`` (``laser-export check``): for a Hub source, only the local cache is
    consulted, and when the config is not there the recipe's ``model.model_type`` and
    ``model.num_layers`` hints stand in for it.
    """
    source = resolve_source(recipe.model.source, recipe.model.revision)
    config, from_hints = None, False
    if weights_free and source.kind == "hub":
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source.location, revision=source.revision, local_files_only=True)
        except (OSError, ValueError):
            config = _config_from_hints(recipe)
            from_hints = True
            if config is None:
                raise SourceError(
                    f"model.source: {source.describe()} is not in the local Hugging Face cache; add "
                    "model.model_type and model.num_layers to the recipe so it can be checked offline"
                ) from None
    else:
        config = source.load_config(trust_remote_code=recipe.model.trust_remote_code)
    try:
        family = family_for(config.model_type)
    except ValueError as err:
        raise RecipeError([f"model.source: {err}"]) from None
    if not from_hints:
        _check_hints(recipe, config)
    targets = plan_targets(recipe.interventions, config, family)
    if "onnx" in recipe.export.formats:
        from .export.onnx import ONNX_FAMILIES

        if family.name not in ONNX_FAMILIES:
            raise RecipeError([
                f"export.formats: ONNX export supports {', '.join(ONNX_FAMILIES)}; not {family.name} "
                f"(model_type {config.model_type!r})"
            ])
    if recipe.benchmark is not None:
        from .benchmarks import BENCHMARKS

        if recipe.benchmark.name not in BENCHMARKS:
            raise RecipeError([
                f"benchmark.name: unknown benchmark {recipe.benchmark.name!r}; known: {', '.join(sorted(BENCHMARKS))}"
            ])
    return Plan(recipe, yaml_text, source, config, family, targets, from_hints)


def load_model(p: Plan) -> Loaded:
    m = p.recipe.model
    with console.status(f"loading {p.source.describe()}"):
        tokenizer = p.source.load_tokenizer(trust_remote_code=m.trust_remote_code)
        model = p.source.load_model(p.family, m.dtype, trust_remote_code=m.trust_remote_code, device=m.device,
                                    device_map=m.device_map, offload_folder=m.offload_folder)
    p.loaded_dtype = str(model.dtype).removeprefix("torch.")
    return Loaded(model, tokenizer)


def reduce_loaded(p: Plan, loaded: Loaded, cache: SVDCache | None = None, progress: bool = True) -> Loaded:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # one matrix's SVD at a time: nothing is kept between matrices, originals are released as replaced
    cache = SVDCache(p.recipe.reduction, max_bytes=0) if cache is None else cache
    with Progress(
        TextColumn("[bold]reduce[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, disable=not progress, transient=False,
    ) as bar:
        task = bar.add_task("", total=len(p.targets))

        def step(msg: str) -> None:
            bar.update(task, description=msg)

        entries = []
        for t in p.targets:
            entries += apply(loaded.model, [t], family=p.family, storage=p.recipe.storage, cache=cache,
                             undoable=False, progress=step).entries
            bar.advance(task)
    loaded.entries = entries
    return loaded


def build_manifest(p: Plan, entries: list[dict]) -> dict:
    m = p.recipe.model
    return {
        "laser_export_version": __version__,
        "recipe": p.recipe.name,
        "model": {
            "source": m.source,
            "revision": p.source.revision,
            "architecture": p.family.name,
            "model_type": p.config.model_type,
            "base_model": m.base_model,
            "license": m.license,
            "dtype": p.loaded_dtype or m.dtype,
        },
        "storage": p.recipe.storage,
        "reduction": p.recipe.reduction.model_dump(),
        "matrices": entries,
        "totals": {
            "n_matrices": len(entries),
            "bytes_saved": sum(e["bytes_saved"] for e in entries),
        },
    }
