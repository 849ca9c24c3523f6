"""The one export writer: both the in-memory path and the streamed path end here.

:func:`write_export` owns the folder (a temporary sibling via :func:`laser_export.policy.atomic_folder`,
renamed into place only when everything is written and read back), and what goes in it besides the
weights: the extra formats (:mod:`laser_export.export.formats`), the verify report, ``recipe.yaml``,
``manifest.json`` (built once, :func:`laser_export.export.manifest.build_manifest`) and the model card.
The weights come from a :class:`Weights` writer: :class:`InMemoryWeights` (a loaded, reduced model,
``save_pretrained``) or :class:`laser_export.stream.StreamedWeights` (shard by shard); either one writes
the checkpoint, config, tokenizer and loading code and reads them back (``finish_checkpoint``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from ..artifacts import CheckpointInfo, Manifest
from ..atomic import write_json, write_text
from ..policy import atomic_folder
from ..progress import status
from .formats import FormatInput, formats_of
from .manifest import build_manifest, source_info
from .checkpoint import ExportError

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
REPORT = "verify_report.json"
CARD = "README.md"


@dataclass
class ExportJob:
    """What an export needs besides its weights: the plan, where to write, the report to carry, the card's facts."""

    plan: object  # laser_export.pipeline.Plan
    out: Path
    overwrite: bool = False
    protect: Sequence[Path] = ()  # folders the export must never replace (the source, the data)
    report: dict | None = None  # the passing verify report of this recipe, carried into the folder and card
    skip_verify: bool = False  # the card says the recipe's claims were not verified
    repo_id: str | None = None  # the repo the export will be pushed to (the card's loading snippet)
    private: bool = False
    progress: bool = True


@dataclass
class Written:
    """What a :class:`Weights` writer wrote and measured."""

    entries: list[dict]  # one per reduced matrix, in target order, measured in the loaded dtype
    export_dtype: str
    checkpoint: CheckpointInfo  # as read back
    auto_map: dict | None
    streamed: bool
    model: object = None  # the reduced model in memory (None when streamed)
    tokenizer: object = None
    notes: list[str] = field(default_factory=list)


class Weights(Protocol):
    streamed: bool

    def write(self, folder: Path, job: ExportJob) -> Written: ...


class InMemoryWeights:
    """A loaded model, reduced in place (``loaded.entries``): cast to ``export.dtype``, saved, read back."""

    streamed = False

    def __init__(self, loaded):
        self.loaded = loaded

    def write(self, folder: Path, job: ExportJob) -> Written:
        from . import safetensors as st  # looked up at call time (tests inject failures there)
        from .dtype import cast_for_export

        recipe, model = job.plan.recipe, self.loaded.model
        export_dtype = cast_for_export(model, recipe.export.dtype)  # after verify: numbers are the loaded dtype's
        with status("writing safetensors", job.progress):
            rec = st.write_checkpoint(model, self.loaded.tokenizer, folder, max_shard_size=recipe.export.max_shard_size)
        return Written(self.loaded.entries, export_dtype, CheckpointInfo.model_validate(rec["checkpoint"]),
                       rec["auto_map"], False, model, self.loaded.tokenizer)


def check_report_matches(report: dict, manifest: Manifest) -> None:
    """A carried verify report measured these matrices of this model in this dtype, else RecipeError."""
    from ..recipe import RecipeError
    from ..verify import check_report_json

    check_report_json(report, "--report")
    keys = ("name", "layer", "matrix", "shape", "rank", "storage")
    measured = [{k: e.get(k) for k in keys} for e in report.get("interventions") or []]
    exported = [{k: getattr(e, k) for k in keys} for e in manifest.matrices]
    if measured != exported:
        raise RecipeError([f"--report: the report measured other interventions ({_brief(measured)}) than this "
                           f"export applies ({_brief(exported)}); verify the recipe again"])
    dtype = (report.get("model") or {}).get("dtype")
    if dtype and manifest.model is not None and dtype != manifest.model.dtype:
        raise RecipeError([f"--report: the report measured the model in {dtype}, this export loads it in "
                           f"{manifest.model.dtype}; verify the recipe again"])


def _brief(entries: list[dict]) -> str:
    return ", ".join(f"L{e['layer']}.{e['matrix']} rank {e['rank']} {e['storage']}" for e in entries) or "none"


def _card(job: ExportJob, manifest: Manifest) -> str:
    from .card import render_card

    p = job.plan
    recipe_dict = p.recipe.model_dump(mode="json")
    if job.repo_id:  # the card's loading snippet names the repo the export is pushed to
        recipe_dict["export"]["hub"] = {"repo_id": job.repo_id, "private": bool(job.private)}
    return str(render_card(recipe_dict, p.yaml_text, manifest, job.report,
                           skip_verify=bool(job.skip_verify and p.recipe.claims is not None), folder=job.out))


def write_export(job: ExportJob, weights: Weights) -> Manifest:
    """Write the export of ``job.plan`` into ``job.out`` (all or nothing); return its manifest."""
    p = job.plan
    with atomic_folder(job.out, overwrite=job.overwrite, protect=job.protect) as tmp:
        w = weights.write(tmp, job)
        source = source_info(p)
        formats = {}
        for fmt in formats_of(p.recipe):
            if fmt.needs_model and w.model is None:
                raise ExportError(f"export.formats: {fmt.name} needs the model in memory; it was streamed")
            formats[fmt.name] = fmt.write(FormatInput(p, w.model, w.tokenizer, tmp, w.export_dtype,
                                                      source.model_dump(mode="json"), job.progress))
        manifest = build_manifest(p, w.entries, export_dtype=w.export_dtype, checkpoint=w.checkpoint,
                                  streamed=w.streamed, auto_map=w.auto_map, formats=formats, source=source)
        if job.report is not None:
            check_report_matches(job.report, manifest)
            write_json(tmp / REPORT, job.report)
        write_text(tmp / RECIPE, p.yaml_text)
        write_json(tmp / MANIFEST, manifest.to_json())
        write_text(tmp / CARD, _card(job, manifest))
        _check_manifest_readable(tmp)
    return manifest


def _check_manifest_readable(folder: Path) -> None:
    """The manifest written is the one an ``--overwrite`` later recognises (it validates as a Manifest)."""
    Manifest.model_validate(json.loads((folder / MANIFEST).read_text()))
