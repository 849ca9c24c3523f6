"""Model card (README.md) for a LASER export.

`render_card` turns the recipe, the export manifest and the verify report (typed artifacts, see
:mod:`laser_export.artifacts`) into a `huggingface_hub.ModelCard`: YAML front matter (``base_model`` +
``base_model_relation``, a ``model-index`` of Hub dataset ids, only when the claims were verified) and a body
with one function per section: what the source really was, what changed, what was measured on which split,
the measured costs, what the measurement does *not* show, and the loading command that works.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..architectures import Family, family_for
from ..artifacts import BenchmarkInfo, Delta, Manifest, SourceInfo, VerifyReport
from ..metrics import LABELS
from ..progress import count
from ..recipe import Recipe
from ..stats import partly_format

__all__ = ["render_card", "format_gain_assessment", "PAPER_CITATION"]

PAPER_CITATION = (
    "P. Sharma, J. T. Ash, D. Misra. *The Truth is in There: Improving Reasoning in Language Models with "
    "Layer-Selective Rank Reduction*. ICLR 2024. [arXiv:2312.13558](https://arxiv.org/abs/2312.13558)"
)
BIBTEX = """@inproceedings{sharma2024truth,
  title     = {The Truth is in There: Improving Reasoning in Language Models with Layer-Selective Rank Reduction},
  author    = {Sharma, Pratyusha and Ash, Jordan T. and Misra, Dipendra},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""

METRIC_LABELS = LABELS  # the metrics table's wording (laser_export.metrics)
# A gain on article-excluded top-1 smaller than this fraction of the top-1 gain counts as "much smaller".
# LASER edits the base weights without training; of the Hub's relations (adapter, merge, quantized, finetune)
# "finetune" (a modified full copy of the base weights) is the closest.
BASE_MODEL_RELATION = "finetune"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# ---------------------------------------------------------------------------------------------- formatting
def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else str(x)


def _signed(x: float | None, nd: int = 4) -> str:
    return "—" if x is None else f"{x:+.{nd}f}"


def _ci(ci: list[float] | None, nd: int = 4) -> str:
    return "—" if not ci or len(ci) != 2 else f"[{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n:,} ({n / size:.1f} {unit})"
    return f"{n:,} B"


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    return "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)


def _hub_id_or_none(source: str | None) -> str | None:
    """A Hub model id from a recipe source (`org/name[@rev]`), or None for local paths / package files."""
    if not source or source.startswith("package:"):
        return None
    source = source.split("@", 1)[0]
    return source if _HUB_ID.match(source) and not os.path.exists(source) else None


def _contains_zero(ci: list[float] | None) -> bool:
    return bool(ci) and len(ci) == 2 and ci[0] <= 0.0 <= ci[1]


def _delta(d: Delta | dict | None) -> Delta | None:
    return d if isinstance(d, Delta) or d is None else Delta.model_validate(d)


def format_gain_assessment(delta: dict | None) -> tuple[bool, list[str]]:
    """Does the measured top-1 gain look partly like an answer-format change? Returns (flag, sentences).

    Flagged when top-1 improves but the article-excluded top-1 delta is much smaller (< 50% of it) or its
    95% CI includes 0. Also says when the top-1 CI itself includes 0."""
    t1, na = _delta((delta or {}).get("top1")), _delta((delta or {}).get("top1_no_article"))
    if t1 is None:
        return False, ["No paired top-1 delta was reported, so the size of the gain is unknown."]
    notes: list[str] = []
    if _contains_zero(t1.ci95):
        notes.append(f"The top-1 change ({_signed(t1.estimate)}, 95% CI {_ci(t1.ci95)}) is **not distinguishable "
                     "from zero** at 95% on this split.")
    if na is None:
        return False, notes + ["No article-excluded top-1 was reported, so a change in answer format cannot be "
                               "ruled out."]
    d1, d2 = t1.estimate, na.estimate
    if d1 is None or d1 <= 0:
        return False, notes
    if partly_format(d1, d2, na.ci95):
        return True, notes + [
            f"**Part of the gain is answer format, not recall.** Top-1 improves by {_signed(d1)} but top-1 "
            f"with leading articles excluded changes by {_signed(d2)} (95% CI {_ci(na.ci95)})"
            + (", an interval that includes 0" if _contains_zero(na.ci95) else "")
            + ". Article-excluded top-1 scores the answer without a leading \"the\"/\"a\"/\"an\", so the "
            "difference between the two deltas is a change in answer *format* (whether the first predicted "
            "token is an article), not better recall: read the top-1 gain as partly format."]
    return False, notes + [
        f"The article-excluded top-1 improves by {_signed(d2)} (95% CI {_ci(na.ci95)}), comparable to the "
        f"top-1 gain of {_signed(d1)}: the gain is not explained by answer format alone."]


# ---------------------------------------------------------------------------------------------- context
@dataclass
class CardContext:
    """Everything a section needs, typed."""

    recipe: Recipe
    recipe_yaml: str
    manifest: Manifest
    report: VerifyReport | None
    verified: bool
    skip_verify: bool
    family: Family | None
    load_path: str  # the Hub repo id, or the local export folder when no repo is known
    is_repo: bool

    @property
    def source(self) -> SourceInfo:
        return self.manifest.model or SourceInfo(source=self.recipe.model.source)

    @property
    def storage(self) -> str:
        return self.manifest.storage or self.recipe.storage

    @property
    def bench(self) -> BenchmarkInfo | None:
        return self.report.benchmark if self.report is not None else None

    @property
    def limit(self) -> int | None:
        return self.bench.limit if self.bench is not None else None

    @property
    def headline(self) -> str:
        return self.recipe.benchmark.metric if self.recipe.benchmark else "top1"

    @property
    def base_model(self) -> str | None:
        return self.source.base_model or self.recipe.model.base_model or _hub_id_or_none(self.source.source)

    @property
    def auto_class(self) -> str:
        return self.family.auto_class if self.family else "AutoModelForCausalLM"


def _is_local(value: str | None) -> bool:
    """A recipe value that names a local file or folder (not a Hub id, URL or package spec)."""
    if not value or value.startswith(("http://", "https://", "package:")):
        return False
    return value.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(value)) or "\\" in value


def _public_name(value: str) -> str:
    return os.path.basename(os.path.normpath(os.path.expanduser(value))) or value


def public_recipe(recipe: Recipe, recipe_yaml: str) -> tuple[Recipe, str]:
    """The recipe as the card and the export's ``recipe.yaml`` show it: local paths (model source, data, offload folder) by their file or folder
    name only — a card is published, the local layout is not."""
    recipe = recipe.model_copy(deep=True)
    for obj, name in ((recipe.model, "source"), (recipe.model, "offload_folder"), (recipe.benchmark, "path"),
                      (recipe.perplexity, "path"), (recipe.lm_eval, "include_path")):
        value = getattr(obj, name, None) if obj is not None else None
        if isinstance(value, str) and _is_local(value):
            public = _public_name(value)
            recipe_yaml = recipe_yaml.replace(value, public)
            setattr(obj, name, public)
    return recipe, recipe_yaml


def _context(recipe, recipe_yaml, manifest, report, skip_verify, folder) -> CardContext:
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
    recipe, recipe_yaml = public_recipe(recipe, recipe_yaml or "")
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.model_validate(manifest or {})
    if manifest.model is not None and _is_local(manifest.model.source):  # manifests written before public sources
        manifest = manifest.model_copy(update={"model": manifest.model.model_copy(
            update={"source": _public_name(manifest.model.source)})})
    if report is not None and not isinstance(report, VerifyReport):
        report = VerifyReport.model_validate(report)
    if report is not None and report.benchmark is not None:
        report.benchmark = _with_hub_dataset(report.benchmark)  # the Hub id, config, split and origin of the examples
    verified = report is not None and not skip_verify and not report.skip_verify
    model_type = manifest.model.model_type if manifest.model else None
    family = family_for(model_type) if model_type else None
    repo_id = recipe.export.hub.repo_id if recipe.export.hub else None
    load_path = repo_id or _public_name(str(folder or recipe.name))
    return CardContext(recipe, recipe_yaml, manifest, report, verified, skip_verify, family, load_path,
                       repo_id is not None)


def _with_hub_dataset(bench: BenchmarkInfo) -> BenchmarkInfo:
    from ..benchmarks import BENCHMARKS

    spec = BENCHMARKS.get(bench.name)
    if spec is None:
        return bench
    # the dataset commit `datasets` resolved on the Hub when the examples were loaded online (report
    # benchmark.sources), else the revision the benchmark pins (None: the default branch, offline files)
    resolved = [src.get("sha") for src in (bench.model_extra or {}).get("sources") or []
                if isinstance(src, dict) and src.get("repo") == spec.hub_dataset and src.get("sha")]
    revision = resolved[0] if len(set(resolved)) == 1 else spec.hub_revision
    return bench.model_copy(update={"hub_dataset": spec.hub_dataset, "hub_config": spec.hub_config,
                                    "hub_revision": revision, "hub_split": spec.hub_split,
                                    "examples_from": spec.origin})


# ---------------------------------------------------------------------------------------------- metadata
def _dataset_args(bench: BenchmarkInfo) -> dict:
    n = bench.sizes.get(bench.split)
    args = {"examples_from": bench.examples_from, "laser_export_split": bench.split,
            "seed": bench.seed, "validation_fraction": bench.validation_fraction,
            "n_examples": n if bench.limit is None else min(n or bench.limit, bench.limit),
            "limit": bench.limit, "examples_sha256": bench.examples_sha256}
    return {k: v for k, v in args.items() if v is not None}


def _task_name(ctx: CardContext, reduced: dict) -> str:
    """What the scorer measured: choice accuracy, generated answers, or the first answer token."""
    if "exact_match" in reduced:
        return "Question answering (greedy generation)"
    if "accuracy" in reduced and "top5" not in reduced:
        return "Multiple choice (answer scores at the " + ("mask)" if ctx.family and ctx.family.task == "masked-lm"
                                                            else "next token)")
    return "Masked factual recall" if ctx.family and ctx.family.task == "masked-lm" else "Next-token factual recall"


def _eval_results(ctx: CardContext) -> list[EvalResult]:
    """model-index: only measured + verified numbers of THIS (reduced) model, on data that has a Hub dataset id.

    ``dataset.split`` is the split of that Hub dataset the examples come from; laser-export's own seeded
    validation/test split of them, their origin and SHA-256 are in ``dataset.args``. The ``source`` names
    the verify report (a link when the repo id is known)."""
    if not ctx.verified or not ctx.report.metrics.get("reduced") or ctx.bench is None or not ctx.bench.hub_dataset:
        return []
    bench, reduced = ctx.bench, ctx.report.metrics["reduced"]
    name = f"{bench.name} ({bench.split} split, seed {bench.seed})"
    if bench.limit is not None:
        name += f", limited to {bench.limit} examples"
    results = []
    for key in dict.fromkeys([ctx.headline, "top1", "top1_no_article"]):
        if key not in reduced:
            continue
        results.append(EvalResult(
            task_type=ctx.family.pipeline_tag if ctx.family else "text-generation",
            task_name=_task_name(ctx, reduced),
            dataset_type=bench.hub_dataset, dataset_name=name, dataset_config=bench.hub_config,
            dataset_revision=bench.hub_revision, dataset_split=bench.hub_split, dataset_args=_dataset_args(bench),
            # huggingface_hub wants a URL with a source name: both only when the repo id is known
            source_name="laser-export verify report (verify_report.json)" if ctx.is_repo else None,
            source_url=f"https://huggingface.co/{ctx.load_path}/blob/main/verify_report.json" if ctx.is_repo else None,
            metric_type="accuracy", metric_value=float(reduced[key]), metric_name=METRIC_LABELS.get(key, key),
            metric_config=key,
        ))
    return results


def _lm_eval_section(ctx: CardContext) -> dict | None:
    """The verify report's lm-eval measurement (``report["lm_eval"]``), when there is one."""
    if ctx.report is None or not ctx.report.model_extra:
        return None
    section = ctx.report.model_extra.get("lm_eval")
    return section if isinstance(section, dict) and section else None


def _lm_eval(ctx: CardContext) -> list[str]:
    from ..lm_eval_card import card_lines

    return card_lines(_lm_eval_section(ctx))


def _card_data(ctx: CardContext) -> ModelCardData:
    eval_results = _eval_results(ctx)
    if ctx.verified:
        from ..lm_eval_card import eval_results as lm_eval_results

        eval_results += lm_eval_results(_lm_eval_section(ctx), ctx.family.pipeline_tag if ctx.family else "text-generation")
    tags = ["laser", "low-rank", "rank-reduction", "svd", "laser-export", f"laser-{ctx.storage}"]
    if ctx.source.model_type:
        tags.append(ctx.source.model_type)
    if ctx.source.format == "gguf":
        tags.append("gguf-source")
    base = ctx.base_model
    return ModelCardData(
        model_name=ctx.recipe.name if eval_results else None,
        base_model=base,
        base_model_relation=BASE_MODEL_RELATION if base else None,
        license=ctx.source.license or ctx.recipe.model.license,
        language=ctx.source.language or ctx.recipe.model.language,
        library_name="transformers",
        pipeline_tag=ctx.family.pipeline_tag if ctx.family else None,
        tags=tags,
        eval_results=eval_results or None,
    )


# ---------------------------------------------------------------------------------------------- body sections
def _warnings(ctx: CardContext) -> list[str]:
    report = ctx.report
    if not ctx.verified and ctx.recipe.claims is None and report is None:
        return ["> [!WARNING]",
                "> **No accuracy was measured or claimed for this checkpoint** (the recipe has no claims and no verify",
                "> report exists). Rank reduction changes the model's outputs; evaluate it before relying on it.", ""]
    if not ctx.verified:
        why = "`--skip-verify` was used" if (ctx.skip_verify or (report and report.skip_verify)) \
            else "no verify report exists"
        return ["> [!WARNING]",
                f"> **The accuracy claims on this card were NOT verified** ({why}). The numbers under *Claims* are the",
                "> recipe author's, not measurements of this checkpoint, and the card's metadata carries no `model-index`",
                "> results. Re-run the export without `--skip-verify` to measure them on the held-out split.", ""]
    out = []
    if not report.passed and report.claims:
        failed = [c.name for c in report.claims if not c.passed]
        out += ["> [!CAUTION]",
                f"> **Verification FAILED** for: {', '.join(failed) or 'one or more claims'}. The measured numbers",
                "> below are correct for this checkpoint; the claimed ones were not reproduced within tolerance.", ""]
    if ctx.limit is not None:
        b = ctx.bench
        out += ["> [!WARNING]",
                f"> **Partial measurement:** verification ran with `--limit {b.limit}`, i.e. on only the first {b.limit}",
                f"> examples of the `{b.split}` split (full size: {b.sizes.get(b.split, '?')}).",
                "> The intervals below are wide and the numbers are not the full-split result.", ""]
    return out


def _source_sentence(ctx: CardContext) -> str:
    """What the weights really were: a GGUF quantization dequantized, or a transformers checkpoint."""
    s = ctx.source
    rev = f" (revision `{s.revision}`)" if s.revision else ""
    if s.format == "gguf":
        quant = f"{s.gguf_quantization} quantization" if s.gguf_quantization else "quantized weights"
        base = f" of `{ctx.base_model}`" if ctx.base_model else ""
        return (f"**Source:** the GGUF file `{s.gguf_file or s.source}` ({quant}{base}), from `{s.source}`, "
                f"dequantized to **{s.dtype}** by transformers on load. All baseline numbers below are that "
                "dequantized model's, not the original full-precision checkpoint's.")
    base = f" (base model `{ctx.base_model}`)" if ctx.base_model and ctx.base_model != s.source else ""
    computed = getattr(s, "compute_dtype", None)  # model.compute_dtype, when it differs from the weights' dtype
    how = f" and scored computing in **{computed}** (model.compute_dtype; weights kept as loaded)" if computed else ""
    return f"**Source:** `{s.source}`{rev}{base}, loaded in {s.dtype or 'its own dtype'}{how}."


def _dtype_note(ctx: CardContext) -> list[str]:
    measured, exported = ctx.source.dtype, ctx.manifest.export_dtype
    if not measured or not exported or measured == exported:
        return []
    return [f"**Export dtype:** the numbers on this card were measured in {measured}; the weights were then cast to "
            f"**{exported}** for this export, which was not measured again (expect differences at {exported} "
            "rounding level).", ""]


def _intro(ctx: CardContext) -> list[str]:
    out = [f"# {ctx.recipe.name}", "", *_warnings(ctx)]
    if ctx.recipe.description:
        out += [ctx.recipe.description.strip(), ""]
    dtype = ctx.manifest.export_dtype or ctx.source.dtype
    out += [
        f"LASER applied to {count(len(ctx.manifest.matrices), 'weight matrix', 'weight matrices')}, exported by laser-export "
        f"{ctx.manifest.laser_export_version} with `{ctx.storage}` storage" + (f" in {dtype}." if dtype else "."),
        "", _source_sentence(ctx), "", *_dtype_note(ctx),
        "## What LASER is", "",
        "LASER (LAyer-SElective Rank reduction) replaces one chosen weight matrix of a trained transformer with its "
        "rank-*k* truncated SVD approximation, with no further training. Sharma et al. report that removing the "
        f"higher-order components of late MLP matrices this way can improve factual question answering ({PAPER_CITATION}).",
        "",
    ]
    return out


def _rho_cell(m) -> str:
    """ρ, or for ``rank: auto`` the Marchenko–Pastur edge that chose the rank."""
    edge = (m.model_extra or {}).get("mp_edge")
    return f"auto (σ > MP edge {edge:.4g})" if edge is not None else str(m.rho)


def _what_changed(ctx: CardContext) -> list[str]:
    out = ["## What changed", "",
           "ρ is the fraction of the matrix's maximum rank that is kept (rank = ⌊ρ · max rank⌋). Relative error is "
           "‖W − W_k‖_F / ‖W‖_F.", "",
           "| Layer | Matrix | Module | Shape | ρ | Rank (kept / max) | Rel. Frobenius error | Storage | Bytes saved |",
           "|---:|---|---|---|---:|---:|---:|---|---:|"]
    for m in ctx.manifest.matrices:
        out.append(f"| {m.layer} | `{_cell(m.matrix)}` | `{_cell(m.name)}` | {'×'.join(map(str, m.shape))} "
                   f"| {_rho_cell(m)} | {m.rank} / {m.max_rank} | {_f(m.relative_error)} | {m.storage} "
                   f"| {_bytes(m.bytes_saved)} |")
    totals = ctx.manifest.totals
    dense_note = " (dense storage writes the reduced matrix back at full size: no memory is saved)."
    out += ["", f"Total: {count(totals.n_matrices or len(ctx.manifest.matrices), 'matrix', 'matrices')}, {_bytes(totals.bytes_saved)} "
            "saved" + (dense_note if ctx.storage == "dense" else "."), "", *_sizes(ctx)]
    return out


def _sizes(ctx: CardContext) -> list[str]:
    """The export's tensor bytes next to its source's, as measured on the files."""
    exported = ctx.manifest.checkpoint.tensor_bytes if ctx.manifest.checkpoint else None
    source = ctx.source.tensor_bytes
    if exported is None:
        return []
    line = f"Size: this checkpoint's tensors take {_bytes(exported)}"
    if source:
        what = f"the {ctx.source.format.upper()} file" if ctx.source.format == "gguf" else "the source's tensors"
        line += f"; {what} take {_bytes(source)} ({(exported / source - 1) * 100:+.2f}%)"
    return [line + ".", ""]


def _metric_rows(ctx: CardContext) -> list[str]:
    metrics, delta = ctx.report.metrics, ctx.report.delta
    base_m, red_m = metrics.get("baseline", {}), metrics.get("reduced", {})
    keys = [k for k in METRIC_LABELS if k in base_m or k in red_m]
    keys += [k for k in [*base_m, *red_m] if k not in METRIC_LABELS and k != "n"]
    rows = []
    for k in dict.fromkeys(keys):
        d = delta.get(k) or Delta()
        label = METRIC_LABELS.get(k, k)
        label = f"**{label}**" if k == ctx.headline else label
        rows.append(f"| {label} (`{k}`) | {_f(base_m.get(k))} | {_f(red_m.get(k))} | {_signed(d.estimate)} "
                    f"| {_ci(d.ci95)} | {d.n if d.n is not None else '—'} |")
    return rows


def _results(ctx: CardContext) -> list[str]:
    if ctx.report is None or not ctx.report.metrics or ctx.bench is None:
        return ["## Results", "", "No measurement of this checkpoint is available.", ""]
    b = ctx.bench
    hub = f" (Hub dataset `{b.hub_dataset}`" + (f", config `{b.hub_config}`" if b.hub_config else "") + ")" \
        if b.hub_dataset else ""
    cached = " The baseline numbers were read from the baseline cache (same model, examples and scorer)." \
        if ctx.report.baseline_cache and ctx.report.baseline_cache.hit else ""
    return ["## Results", "",
            f"Benchmark `{b.name}`{hub}, **`{b.split}` split** (seeded split: seed {b.seed}, validation fraction "
            f"{b.validation_fraction}; sizes: " + ", ".join(f"{k} {v}" for k, v in b.sizes.items())
            + f"; examples sha256 `{b.examples_sha256}`"
            + (f"; **limited to the first {b.limit} examples**" if b.limit is not None else "")
            + "). The intervention was chosen on the validation split; numbers below are on the held-out split. "
            "Δ is reduced − baseline with a paired-bootstrap 95% confidence interval." + cached, "",
            "| Metric | Baseline | Reduced | Δ | 95% CI of Δ | n |", "|---|---:|---:|---:|---:|---:|",
            *_metric_rows(ctx), ""]


def _claims(ctx: CardContext) -> list[str]:
    rows = []
    if ctx.report is not None and ctx.report.claims:
        for c in ctx.report.claims:
            status = ("✅ passed" if c.passed else "❌ failed") if ctx.verified else "not verified"
            rows.append(f"| {c.name} | `{c.metric}` | {_f(c.claimed)} | {_f(c.measured)} | ±{c.tolerance} | {status} |")
    elif ctx.recipe.claims is not None:
        claims = ctx.recipe.claims
        for which, claim in (("baseline", claims.baseline), ("reduced", claims.reduced)):
            rows.append(f"| {which}.accuracy | `{ctx.headline}` | {_f(claim.accuracy)} | — | ±{claims.tolerance} "
                        "| not verified |")
    if not rows:  # a verify report without claims: measured only
        return ["### Claims", "", "Measured, no claims: the recipe makes none.", ""] if ctx.verified else []
    return ["### Claims", "", "| Claim | Metric | Claimed | Measured | Tolerance | Status |",
            "|---|---|---:|---:|---:|---|", *rows, ""]


def _perplexity(ctx: CardContext) -> dict | None:
    """The verify report's perplexity measurement, when there is one (``report["perplexity"]``)."""
    if ctx.report is None or not ctx.report.model_extra:
        return None
    ppl = ctx.report.model_extra.get("perplexity")
    return ppl if isinstance(ppl, dict) and ppl else None


def _costs(ctx: CardContext) -> list[str]:
    """Measured costs: general language-modelling quality (perplexity) and answer log-loss."""
    out = ["## Measured costs", ""]
    ppl = _perplexity(ctx)
    if ppl is not None:
        base, red = ppl.get("baseline"), ppl.get("reduced")
        where = ", ".join(f"{k} {_cell(v)}" for k, v in ppl.items()
                          if k not in ("baseline", "reduced") and isinstance(v, (str, int, float)))
        if isinstance(base, (int, float)) and isinstance(red, (int, float)):
            out.append(f"- Perplexity: {_f(base, 3)} → {_f(red, 3)} ({(red / base - 1) * 100:+.2f}%)"
                       + (f" ({where})." if where else "."))
        else:
            out.append(f"- Perplexity: {_cell(ppl)}")
    else:
        out.append("- Perplexity (general language-modelling quality) was **not measured** for this export.")
    if ctx.report is not None:
        b, r = ctx.report.metrics.get("baseline", {}), ctx.report.metrics.get("reduced", {})
        if "logloss" in b and "logloss" in r:
            out.append(f"- Answer log-loss on the benchmark split: {_f(b['logloss'])} → {_f(r['logloss'])}.")
    errs = [m.relative_error for m in ctx.manifest.matrices if m.relative_error is not None]
    if errs:
        out.append(f"- Largest relative Frobenius error of a reduced matrix: {_f(max(errs))}.")
    return out + [""]


def _limits(ctx: CardContext) -> list[str]:
    out = ["## Limits", ""]
    if ctx.verified:
        out += [f"- {n}" for n in format_gain_assessment(
            {k: v.model_dump() for k, v in ctx.report.delta.items()})[1]]
        from ..answer_balance import side_warning

        warning = side_warning(ctx.report.answer_balance, "reduced", ctx.report.metrics.get("reduced", {}).get("top1"))
        if warning:
            out.append(f"- **The reduced model {warning.removeprefix('the model ')}.**")
    elif ctx.recipe.claims is not None:
        out.append("- **Nothing on this card was measured by laser-export**: the claimed accuracies are unverified.")
    else:
        out.append("- **Nothing on this card was measured by laser-export**, and the recipe claims no accuracy.")
    if ctx.limit is not None:
        out.append(f"- The measurement used only {ctx.limit} examples (`--limit`); it is a smoke test, not the full split.")
    if ctx.recipe.benchmark is None:
        return out + [""]
    other = "Other tasks were" if _perplexity(ctx) is not None else "General language-modelling quality (perplexity) and other tasks were"
    if _lm_eval_section(ctx) is not None:
        other = other.replace("Other tasks", "Tasks other than the lm-eval ones above").replace("other tasks", "tasks other than the lm-eval ones above")
    out += [f"- One benchmark ({ctx.recipe.benchmark.name}), one held-out split. {other} not measured here and may "
            "be worse.", "- The selection (layer, matrix, ρ) was made on the validation split of the same benchmark.", ""]
    return out


def _formats(ctx: CardContext) -> list[str]:
    out = []
    onnx = ctx.manifest.onnx
    if onnx is not None:
        status = "passed" if onnx.passed else "**FAILED**"
        out += ["## ONNX", "",
                f"`{onnx.file}`: max |logits(ONNX Runtime) − logits(PyTorch)| = {onnx.max_abs_diff:.3g} "
                f"(tolerance {onnx.tolerance:.3g}) — parity check {status}.", ""]
    gguf = ctx.manifest.gguf
    if gguf is not None:
        out += ["## GGUF", "",
                f"`{gguf.file}`: {gguf.dtype} tensors, llama.cpp architecture `{gguf.arch}` (dense weights), for "
                f"llama.cpp / Ollama, or `{ctx.auto_class}.from_pretrained(path, gguf_file=\"{gguf.file}\")`."
                + "".join(f" `{v['file']}`: {v['type']} variant." for v in getattr(gguf, "variants", None) or [])
                + ("" if gguf.tokenizer else " It carries **no tokenizer metadata** (the tokenizer is not one "
                   "llama.cpp reads): llama.cpp needs one; transformers can load the weights with the folder's "
                   "tokenizer."), ""]
    return out


def _snippet(ctx: CardContext, *lines: str) -> list[str]:
    where = "" if ctx.is_repo else "  # the export folder; after a push, the Hub repo id"
    path = json.dumps(ctx.load_path)  # a valid Python string literal whatever the name holds
    return ["```python", f"from transformers import {ctx.auto_class}", "", *lines[:-1],
            f"model = {ctx.auto_class}.from_pretrained({path}{lines[-1]}){where}", "```", ""]


def _how_to_load(ctx: CardContext) -> list[str]:
    out = ["## How to load", ""]
    if ctx.storage != "factorised":
        return out + ["The reduced matrices were written back at full size, so this loads anywhere, with no extra "
                      "package:", "", *_snippet(ctx, "")]
    return out + [
        "The reduced matrices are stored as their two low-rank factors (see *What changed* for the sizes). "
        "The checkpoint carries its own loading code (`modeling_laser.py`, named in `config.json`'s `auto_map`), so "
        "plain transformers loads it with `trust_remote_code=True`; laser-export need not be installed:", "",
        *_snippet(ctx, ", trust_remote_code=True"),
        "With laser-export installed, importing it registers the same loader and no remote code runs:", "",
        "```python", "import laser_export  # registers the factorised-layer loader",
        *_snippet(ctx, "")[1:],
        "Without either, loading fails loudly (a size mismatch, or `LaserLoadError` for a missing factor) instead of "
        "silently loading wrong (random) weights for the factorised layers.", "",
    ]


def _recipe_and_citation(ctx: CardContext) -> list[str]:
    fence = _fence(ctx.recipe_yaml)
    return ["## Recipe", "", "The full recipe this checkpoint was built from:", "",
            f"{fence}yaml", ctx.recipe_yaml.rstrip("\n"), fence, "",
            "## Citation", "", "```bibtex", BIBTEX, "```", ""]


SECTIONS = (_intro, _what_changed, _results, _claims, _costs, _lm_eval, _limits, _formats, _how_to_load, _recipe_and_citation)


def render_card(
    recipe: Recipe | dict,
    recipe_yaml: str,
    manifest: Manifest | dict,
    report: VerifyReport | dict | None,
    *,
    skip_verify: bool = False,
    folder: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card for an export. ``folder``: the export folder, named in the loading snippet when
    the recipe has no ``export.hub.repo_id``."""
    ctx = _context(recipe, recipe_yaml, manifest, report, skip_verify, folder)
    body = "\n".join(line for section in SECTIONS for line in section(ctx))
    return ModelCard(f"---\n{_card_data(ctx).to_yaml()}\n---\n\n{body}")
