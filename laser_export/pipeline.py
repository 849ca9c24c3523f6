"""The steps of the run path: plan → load → reduce (→ measure → export, see :mod:`laser_export.runner`).

:func:`plan` does everything that needs no weights (source resolution, config, architecture,
layer/matrix checks). :func:`load_model` loads the weights; :func:`reduce_loaded` applies the
interventions, an explicit step that sets the undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from .architectures import Family, family_for
from .intervene import Applied, SVDCache, Target, apply, plan_targets
from .progress import bar, console, status
from .recipe import Recipe, RecipeError
from .sources import ResolvedSource, SourceError, check_config, resolve_source

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
    compute_dtype: str | None = None  # the dtype the forward passes run in (model.compute_dtype resolved)
    tokenizer: object = None  # loaded before the weights when the examples are checked (runner._select)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    entries: list[dict] = field(default_factory=list)  # set by the reduce step (reduce_loaded)
    undo: object = None  # set by the reduce step: call it to restore the model (when reduced undoably)


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
    source.check_files()
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
        check_config(config, source.describe())
    try:
        family = family_for(config.model_type)
    except ValueError as err:
        raise RecipeError([f"model.source: {err}"]) from None
    if not from_hints:
        _check_hints(recipe, config)
    targets = plan_targets(recipe.interventions, config, family, storage=recipe.storage)
    if not from_hints:
        check_ranks_without_weights(config, family, targets, trust_remote_code=recipe.model.trust_remote_code)
    _check_formats(recipe, family, config)
    if recipe.perplexity is not None and family.task != "causal-lm":
        raise RecipeError([
            f"perplexity: measured for causal LMs; {family.name} (model_type {config.model_type!r}) is {family.task}"
        ])
    if recipe.lm_eval is not None:
        from .lm_eval_block import lm_eval_missing

        if family.task != "causal-lm":
            raise RecipeError([f"lm_eval: lm-eval's HFLM scores causal LMs; {family.name} is {family.task}"])
        if why := lm_eval_missing():
            raise RecipeError([f"lm_eval: {why}"])
    if recipe.benchmark is not None:
        from .benchmarks import BENCHMARKS

        bench = recipe.benchmark
        spec = BENCHMARKS.get(bench.name)
        if spec is None:
            raise RecipeError([
                f"benchmark.name: unknown benchmark {bench.name!r}; known: {', '.join(sorted(BENCHMARKS))}"
            ])
        from .selection import scorer_for

        if bench.metric not in spec.metrics:
            raise RecipeError([
                f"benchmark.metric: {bench.name} has no metric {bench.metric!r}; available: {', '.join(spec.metrics)}"
            ])
        try:
            scorer_for(family, spec, bench.metric)
        except ValueError as err:
            raise RecipeError([f"{err} (model_type {config.model_type!r}, {family.task})"]) from None
    return Plan(recipe, yaml_text, source, config, family, targets, from_hints)


def check_ranks_without_weights(config, family: Family, targets: list[Target], trust_remote_code: bool = False) -> None:
    """Check each target's rank against its matrix shape on a weightless (meta-device) skeleton of the
    model, so a too-large rank is a recipe error before any weights load. Skipped (the same check runs
    after loading) when the skeleton cannot be built from the config."""
    try:
        import torch
        import transformers

        from .intervene import target_matrix

        auto = getattr(transformers, family.auto_class)
        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
        shapes = {}
        for t in targets:
            name, matrix = target_matrix(skeleton, family, t)
            shapes[t] = (name, tuple(int(d) for d in matrix.shape))
    except Exception:  # noqa: BLE001 - an unusual config: leave the check to after loading
        return
    problems = []
    for t, (name, shape) in shapes.items():
        if t.is_auto:  # found from the weights; never above the max rank
            continue
        k = t.rank_for(shape)
        if k > min(shape):
            problems.append(f"{t.field}.rank: {name} has shape {list(shape)}, max rank {min(shape)}, got {k}")
    if problems:
        raise RecipeError(problems)


def _check_formats(recipe: Recipe, family: Family, config) -> None:
    """Export formats the family's capability fields (``onnx``, ``gguf_arch``) do not allow."""
    from .architectures import FAMILIES

    problems = []
    for fmt, ok, able in (
        ("onnx", family.onnx, [f.name for f in FAMILIES.values() if f.onnx]),
        ("gguf", family.gguf_arch is not None, [f.name for f in FAMILIES.values() if f.gguf_arch]),
    ):
        if fmt in recipe.export.formats and not ok:
            problems.append(f"export.formats: {fmt.upper()} export supports {', '.join(able)}; not {family.name} "
                            f"(model_type {config.model_type!r})")
    from .export import ort_runtime

    if "onnx" in recipe.export.formats and (why := ort_runtime.missing()):
        problems.append(f"export.formats: onnx: {why}")
    from .export.gguf import llama_cpp_missing

    if why := llama_cpp_missing(recipe.export.gguf_types):
        problems.append(f"export.gguf_types: {why}")
    if problems:
        raise RecipeError(problems)


def load_tokenizer(p: Plan):
    """The source's tokenizer, loaded once per plan (the examples are tokenised with it before the weights load,
    and the load reuses it)."""
    if p.tokenizer is None:
        p.tokenizer = p.source.load_tokenizer(trust_remote_code=p.recipe.model.trust_remote_code)
    return p.tokenizer


def load_model(p: Plan, progress: bool = True) -> Loaded:
    m = p.recipe.model
    with status(f"loading {p.source.describe()}", progress):
        tokenizer = load_tokenizer(p)
        model = p.source.load_model(p.family, m.dtype, trust_remote_code=m.trust_remote_code, device=m.device,
                                    device_map=m.device_map, offload_folder=m.offload_folder)
    p.loaded_dtype = str(model.dtype).removeprefix("torch.")
    _check_converted_finite(p, model)
    _set_compute_dtype(p, model)
    densify_targets(p, model)
    check_finite_targets(p, model)
    return Loaded(model, tokenizer)


def _check_converted_finite(p: Plan, model) -> None:
    """Weights converted on load to a narrower dtype (``model.dtype: float16`` of a float32/bfloat16 checkpoint)
    hold inf where a value is beyond its range: a SourceError naming the first such weight and ``model.dtype``,
    before any scoring (it gave NaN log-probs). A checkpoint loaded in its own dtype is not read here."""
    from .finite import first_nonfinite

    stored = str(getattr(p.config, "dtype", None) or getattr(p.config, "torch_dtype", None) or "").removeprefix("torch.")
    if p.loaded_dtype != "float16" or stored in ("", "float16"):
        return
    if found := first_nonfinite(model.named_parameters()):
        name, bad = found
        raise SourceError(f"model.dtype: float16: {name} holds {bad} values beyond the float16 range once converted "
                          f"from the checkpoint's {stored} (inf); load it in bfloat16 or float32")


def _set_compute_dtype(p: Plan, model) -> None:
    """Resolve ``model.compute_dtype`` (see :mod:`laser_export.compute_dtype`); say it in one line."""
    from . import compute_dtype
    from .evaluate import _model_device

    if p.recipe.model.device_map is not None:  # accelerate's offload hooks own the parameters
        p.compute_dtype = p.loaded_dtype
        return
    dtype, notice = compute_dtype.resolve(p.recipe.model.compute_dtype, model.dtype, _model_device(model))
    if notice:
        console.print(notice)
    p.compute_dtype = str(dtype).removeprefix("torch.")
    if dtype != model.dtype:
        compute_dtype.install(model, dtype)


def densify_targets(p: Plan, model) -> list[str]:
    """A factorised source (a laser-export export) holds LowRankLinear modules whose ``weight`` is the
    thin right factor. Each one a target names is turned back into its dense module (the product of
    its factors, in the module class the architecture uses), so the reduction works on the real
    matrix. Untouched factorised modules stay factorised. Returns the names densified."""
    import torch
    from torch import nn

    from .architectures import module_name
    from .lowrank import LowRankLinear, from_matrix

    done = []
    for t in p.targets:
        name = module_name(model, p.family, t.layer, t.alias)
        mod = model.get_submodule(name)
        if not isinstance(mod, LowRankLinear):
            continue
        cls = getattr(mod, "dense_class", nn.Linear)
        w = mod.weight
        if cls.__name__ == "Conv1D":
            dense = cls(mod.out_features, mod.in_features)
        else:
            dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        dense = dense.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(from_matrix(dense, mod.dense_matrix()))
            if mod.bias is not None:
                dense.bias.copy_(mod.bias)
            elif getattr(dense, "bias", None) is not None:
                dense.bias.zero_()
        model.set_submodule(name, dense)
        done.append(name)
    return done


def check_finite_targets(p: Plan, model) -> None:
    """Every target matrix is finite: the SVD of a matrix with inf/NaN is undefined (NaN factors or
    a LinAlgError). A SourceError naming the module, raised before anything is written."""
    from .finite import count_nonfinite
    from .intervene import target_matrix

    problems = []
    for t in p.targets:
        name, w = target_matrix(model, p.family, t)  # also an accelerate-offloaded weight, or a fused block
        bad = count_nonfinite(w)
        if bad:
            problems.append(
                f"model.source: {name} ({t.field}, layer {t.layer} {t.alias}) holds {bad} non-finite values "
                f"(inf/NaN) of {w.numel()}; it cannot be reduced"
            )
    if problems:
        raise SourceError("\n".join(problems))


def reduce_loaded(p: Plan, loaded: Loaded, cache: SVDCache | None = None, progress: bool = True,
                  undoable: bool = False) -> Loaded:
    """The run path's reduce step: apply every target to ``loaded.model`` in place. Sets ``loaded.entries`` (one
    manifest entry per matrix) and ``loaded.undo`` (restores the model bit-exactly when ``undoable``; otherwise
    each original is released as it is replaced and the undo does nothing)."""
    # one matrix's SVD at a time: nothing is kept between matrices
    cache = SVDCache(p.recipe.reduction, max_bytes=0) if cache is None else cache
    undos, entries = [], []
    with bar("reduce", enabled=progress, unit="matrices", eta=False) as pbar:
        task = pbar.add_task("", total=len(p.targets))

        def step(msg: str) -> None:
            pbar.update(task, description=msg)

        try:
            for t in p.targets:
                applied = apply(loaded.model, [t], family=p.family, storage=p.recipe.storage, cache=cache,
                                undoable=undoable, progress=step)
                undos.append(applied)
                entries += applied.entries
                pbar.advance(task)
        except BaseException:
            for u in reversed(undos):
                u()
            raise
    loaded.entries = entries
    loaded.undo = Applied(undos, entries)
    if p.compute_dtype not in (None, p.loaded_dtype):  # the reduced modules compute like the rest
        import torch

        from .compute_dtype import install

        install(loaded.model, getattr(torch, p.compute_dtype))
    return loaded
