"""Model card (README.md) for a LASER export.

`render_card` turns the recipe, the export manifest and the verify report into a
`huggingface_hub.ModelCard`: YAML front matter with a `model-index` built from `EvalResult`s (only when
the claims were actually verified), and a body that says what was changed, what was measured, on
which split, what the measurement does *not* show, and how to load the checkpoint.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

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

METRIC_LABELS = {
    "top1": "top-1 accuracy",
    "top1_no_article": "top-1 accuracy, leading articles excluded",
    "top5": "top-5 accuracy",
    "top10": "top-10 accuracy",
    "logloss": "log-loss (lower is better)",
}
# A gain on article-excluded top-1 smaller than this fraction of the top-1 gain counts as "much smaller".
FORMAT_GAIN_RATIO = 0.5
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# ---------------------------------------------------------------------------------------------- helpers
def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, (int, float)):
        return f"{x:.{nd}f}"
    return str(x)


def _signed(x: Any, nd: int = 4) -> str:
    return "—" if x is None else f"{x:+.{nd}f}"


def _ci(ci: Any, nd: int = 4) -> str:
    if not ci or len(ci) != 2:
        return "—"
    return f"[{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]"


def _bytes(n: Any) -> str:
    if n is None:
        return "—"
    n = int(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n:,} ({n / size:.1f} {unit})"
    return f"{n:,} B"


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _hub_id_or_none(source: Any) -> str | None:
    """A Hub model id from a recipe source (`org/name[@rev]`), or None for local paths / package files."""
    if not isinstance(source, str) or source.startswith("package:"):
        return None
    source = source.split("@", 1)[0]
    if _HUB_ID.match(source) and not os.path.exists(source):
        return source
    return None


def _contains_zero(ci: Any) -> bool:
    return bool(ci) and len(ci) == 2 and ci[0] <= 0.0 <= ci[1]


def format_gain_assessment(delta: dict | None) -> tuple[bool, list[str]]:
    """Does the measured top-1 gain look partly like an answer-format change? Returns (flag, sentences).

    Flagged when top-1 improves but the article-excluded top-1 delta is much smaller (< 50% of it) or its
    95% CI includes 0. Also says when the top-1 CI itself includes 0.
    """
    delta = delta or {}
    t1, na = delta.get("top1"), delta.get("top1_no_article")
    notes: list[str] = []
    flag = False
    if not t1:
        return False, ["No paired top-1 delta was reported, so the size of the gain is unknown."]
    d1 = t1.get("estimate")
    if _contains_zero(t1.get("ci95")):
        notes.append(
            f"The top-1 change ({_signed(d1)}, 95% CI {_ci(t1.get('ci95'))}) is **not distinguishable from zero** "
            "at 95% on this split."
        )
    if na is None:
        notes.append("No article-excluded top-1 was reported, so a change in answer format cannot be ruled out.")
        return False, notes
    d2 = na.get("estimate")
    if d1 is not None and d1 > 0:
        much_smaller = d2 is None or d2 < FORMAT_GAIN_RATIO * d1
        if much_smaller or _contains_zero(na.get("ci95")):
            flag = True
            notes.append(
                f"**Part of the gain is answer format, not recall.** Top-1 improves by {_signed(d1)} but top-1 "
                f"with leading articles excluded changes by {_signed(d2)} (95% CI {_ci(na.get('ci95'))})"
                + (", an interval that includes 0" if _contains_zero(na.get("ci95")) else "")
                + ". Article-excluded top-1 scores the answer without a leading \"the\"/\"a\"/\"an\", so the "
                "difference between the two deltas is a change in answer *format* (whether the first predicted "
                "token is an article), not better recall: read the top-1 gain as partly format."
            )
        else:
            notes.append(
                f"The article-excluded top-1 improves by {_signed(d2)} (95% CI {_ci(na.get('ci95'))}), comparable "
                f"to the top-1 gain of {_signed(d1)}: the gain is not explained by answer format alone."
            )
    return flag, notes


# ---------------------------------------------------------------------------------------------- render
def _task_and_auto_class(model_type) -> tuple[str, str]:
    """(pipeline_tag, auto_class) from the family data of ``model_type`` (causal LM when unknown)."""
    from ..architectures import ArchitectureError, family_for

    try:
        fam = family_for(str(model_type))
    except ArchitectureError:
        return "text-generation", "AutoModelForCausalLM"
    return fam.pipeline_tag, fam.auto_class


def render_card(
    recipe_dict: dict,
    recipe_yaml: str,
    manifest: dict,
    report: dict | None,
    *,
    skip_verify: bool = False,
) -> ModelCard:
    """Render the model card for an export. See the module docstring."""
    recipe_dict = recipe_dict or {}
    manifest = manifest or {}
    r_model = recipe_dict.get("model") or {}
    m_model = manifest.get("model") or {}
    bench_recipe = recipe_dict.get("benchmark") or {}
    storage = manifest.get("storage") or recipe_dict.get("storage") or "dense"
    name = recipe_dict.get("name") or "laser-model"
    hub = ((recipe_dict.get("export") or {}).get("hub") or {})
    repo_id = hub.get("repo_id")

    verified = report is not None and not skip_verify and not report.get("skip_verify", False)
    bench = (report or {}).get("benchmark") or {}
    metrics = (report or {}).get("metrics") or {}
    delta = (report or {}).get("delta") or {}
    limit = bench.get("limit")
    headline = bench_recipe.get("metric") or "top1"

    base_model = m_model.get("base_model") or _hub_id_or_none(m_model.get("source") or r_model.get("source"))
    license_ = m_model.get("license") or r_model.get("license")
    model_type = m_model.get("model_type") or m_model.get("architecture")
    task_type, _ = _task_and_auto_class(model_type)
    is_mlm = task_type == "fill-mask"
    tags = ["laser", "low-rank", "rank-reduction", "svd", "laser-export", f"laser-{storage}"]
    if model_type:
        tags.append(str(model_type))

    # -- model-index: only measured + verified numbers of THIS (reduced) model -------------------
    eval_results: list[EvalResult] = []
    if verified and metrics.get("reduced"):
        bname = bench.get("name") or bench_recipe.get("name") or "benchmark"
        split = bench.get("split") or bench_recipe.get("split") or "test"
        n = (bench.get("sizes") or {}).get(split)
        ds_name = f"{bname} ({split} split, seed {bench.get('seed')})"
        if limit is not None:
            ds_name += f", limited to {limit} examples"
        dataset_args = {
            k: v
            for k, v in {
                "seed": bench.get("seed"),
                "validation_fraction": bench.get("validation_fraction"),
                "n_examples": n if limit is None else min(n or limit, limit),
                "limit": limit,
                "examples_sha256": bench.get("examples_sha256"),
            }.items()
            if v is not None
        }
        for key in dict.fromkeys([headline, "top1", "top1_no_article"]):
            value = metrics["reduced"].get(key)
            if value is None:
                continue
            eval_results.append(
                EvalResult(
                    task_type=task_type,
                    task_name="Next-token factual recall" if not is_mlm else "Masked factual recall",
                    dataset_type=bname,
                    dataset_name=ds_name,
                    dataset_split=split,
                    dataset_args=dataset_args or None,
                    metric_type="accuracy",
                    metric_value=float(value),
                    metric_name=METRIC_LABELS.get(key, key),
                    metric_config=key,
                )
            )

    card_data = ModelCardData(
        model_name=name if eval_results else None,
        base_model=base_model,
        license=license_,
        library_name="transformers",
        pipeline_tag=task_type,
        tags=tags,
        eval_results=eval_results or None,
    )

    body = _render_body(
        name=name, recipe_dict=recipe_dict, recipe_yaml=recipe_yaml, manifest=manifest, report=report,
        verified=verified, storage=storage, repo_id=repo_id, base_model=base_model, headline=headline,
        metrics=metrics, delta=delta, bench=bench, limit=limit, skip_verify=skip_verify,
    )
    content = f"---\n{card_data.to_yaml()}\n---\n\n{body}"
    return ModelCard(content)


def _render_body(*, name, recipe_dict, recipe_yaml, manifest, report, verified, storage, repo_id, base_model,
                 headline, metrics, delta, bench, limit, skip_verify) -> str:
    out: list[str] = [f"# {name}", ""]
    r_model = recipe_dict.get("model") or {}
    m_model = manifest.get("model") or {}

    # -- prominent warnings first ------------------------------------------------------------------
    if not verified and not recipe_dict.get("claims") and report is None:
        out += [
            "> [!WARNING]",
            "> **No accuracy was measured or claimed for this checkpoint** (the recipe has no claims and no verify",
            "> report exists). Rank reduction changes the model's outputs; evaluate it before relying on it.",
            "",
        ]
    elif not verified:
        why = "`--skip-verify` was used" if (skip_verify or (report or {}).get("skip_verify")) else "no verify report exists"
        out += [
            "> [!WARNING]",
            f"> **The accuracy claims on this card were NOT verified** ({why}). The numbers under *Claims* are the",
            "> recipe author's, not measurements of this checkpoint, and the card's metadata carries no `model-index`",
            "> results. Re-run the export without `--skip-verify` to measure them on the held-out split.",
            "",
        ]
    elif report.get("passed") is False:
        failed = [c.get("name") for c in report.get("claims") or [] if not c.get("passed")]
        out += [
            "> [!CAUTION]",
            f"> **Verification FAILED** for: {', '.join(map(str, failed)) or 'one or more claims'}. The measured numbers",
            "> below are correct for this checkpoint; the claimed ones were not reproduced within tolerance.",
            "",
        ]
    if verified and limit is not None:
        out += [
            "> [!WARNING]",
            f"> **Partial measurement:** verification ran with `--limit {limit}`, i.e. on only the first {limit}",
            f"> examples of the `{bench.get('split')}` split (full size: {(bench.get('sizes') or {}).get(bench.get('split'), '?')}).",
            "> The intervals below are wide and the numbers are not the full-split result.",
            "",
        ]

    desc = recipe_dict.get("description")
    if desc:
        out += [str(desc).strip(), ""]
    base = base_model or m_model.get("source") or r_model.get("source")
    out += [
        f"This checkpoint is `{base}`"
        + (f" (revision `{m_model.get('revision') or r_model.get('revision')}`)" if (m_model.get("revision") or r_model.get("revision")) else "")
        + f" with LASER applied to {len(manifest.get('matrices') or [])} weight matrix(es), "
        f"exported by laser-export {manifest.get('laser_export_version', '')} with `{storage}` storage.",
        "",
        "## What LASER is",
        "",
        "LASER (LAyer-SElective Rank reduction) replaces one chosen weight matrix of a trained transformer with its "
        "rank-*k* truncated SVD approximation, with no further training. Sharma et al. report that removing the "
        f"higher-order components of late MLP matrices this way can improve factual question answering ({PAPER_CITATION}).",
        "",
        "## What changed",
        "",
        "ρ is the fraction of the matrix's maximum rank that is kept (rank = ⌊ρ · max rank⌋). Relative error is "
        "‖W − W_k‖_F / ‖W‖_F.",
        "",
        "| Layer | Matrix | Module | Shape | ρ | Rank (kept / max) | Rel. Frobenius error | Storage | Bytes saved |",
        "|---:|---|---|---|---:|---:|---:|---|---:|",
    ]
    for m in manifest.get("matrices") or []:
        shape = "×".join(str(s) for s in m.get("shape") or [])
        out.append(
            f"| {m.get('layer')} | `{_cell(m.get('matrix'))}` | `{_cell(m.get('name'))}` | {shape} | {m.get('rho')} "
            f"| {m.get('rank')} / {m.get('max_rank')} | {_f(m.get('relative_error'))} | {m.get('storage', storage)} "
            f"| {_bytes(m.get('bytes_saved'))} |"
        )
    totals = manifest.get("totals") or {}
    out += ["", f"Total: {totals.get('n_matrices', len(manifest.get('matrices') or []))} matrix(es), "
            f"{_bytes(totals.get('bytes_saved'))} saved"
            + (" (dense storage writes the reduced matrix back at full size: no memory is saved)." if storage == "dense" else "."),
            ""]

    # -- results -----------------------------------------------------------------------------------
    out += ["## Results", ""]
    if report is not None and metrics:
        split = bench.get("split")
        sizes = bench.get("sizes") or {}
        out += [
            f"Benchmark `{bench.get('name')}`, **`{split}` split** (seeded split: seed {bench.get('seed')}, "
            f"validation fraction {bench.get('validation_fraction')}; sizes: "
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + f"; examples sha256 `{bench.get('examples_sha256')}`"
            + (f"; **limited to the first {limit} examples**" if limit is not None else "")
            + "). The intervention was chosen on the validation split; numbers below are on the held-out split. "
            "Δ is reduced − baseline with a paired-bootstrap 95% confidence interval.",
            "",
            "| Metric | Baseline | Reduced | Δ | 95% CI of Δ | n |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base_m, red_m = metrics.get("baseline") or {}, metrics.get("reduced") or {}
        keys = [k for k in METRIC_LABELS if k in base_m or k in red_m]
        keys += [k for k in list(base_m) + list(red_m) if k not in keys and k not in METRIC_LABELS and k != "n"]
        for k in dict.fromkeys(keys):
            d = delta.get(k) or {}
            label = METRIC_LABELS.get(k, k)
            if k == headline:
                label = f"**{label}**"
            out.append(
                f"| {label} (`{k}`) | {_f(base_m.get(k))} | {_f(red_m.get(k))} | {_signed(d.get('estimate'))} "
                f"| {_ci(d.get('ci95'))} | {d.get('n', '—')} |"
            )
        out.append("")
    else:
        out += ["No measurement of this checkpoint is available.", ""]

    claims_rows = []
    if report is not None and report.get("claims"):
        for c in report["claims"]:
            ok = "✅ passed" if c.get("passed") else "❌ failed"
            if not verified:
                ok = "not verified"
            claims_rows.append(
                f"| {c.get('name')} | `{c.get('metric')}` | {_f(c.get('claimed'))} | {_f(c.get('measured'))} "
                f"| ±{c.get('tolerance')} | {ok} |"
            )
    else:
        claims = recipe_dict.get("claims") or {}
        tol = claims.get("tolerance")
        for which in ("baseline", "reduced"):
            acc = (claims.get(which) or {}).get("accuracy")
            if acc is not None:
                claims_rows.append(f"| {which}.accuracy | `{headline}` | {_f(acc)} | — | ±{tol} | not verified |")
    if claims_rows:
        out += ["### Claims", "", "| Claim | Metric | Claimed | Measured | Tolerance | Status |",
                "|---|---|---:|---:|---:|---|", *claims_rows, ""]

    ppl = (report or {}).get("perplexity") if verified else None
    if ppl:
        source = ppl.get("path") or f"{ppl.get('dataset')}" + (f"/{ppl['config']}" if ppl.get("config") else "")
        out += [
            "### Collateral cost: perplexity on general text",
            "",
            f"Perplexity on {source} ({ppl.get('split')} split, {ppl.get('n_tokens')} tokens, sliding window "
            f"{ppl.get('context')}/{ppl.get('stride')}): what the intervention costs outside the task.",
            "",
            "| | Baseline | Reduced | Ratio |",
            "|---|---:|---:|---:|",
            f"| perplexity | {ppl['baseline']:.3f} | {ppl['reduced']:.3f} | ×{ppl['ratio']:.4f} |",
            "",
        ]

    # -- limits ------------------------------------------------------------------------------------
    out += ["## Limits", ""]
    if verified:
        _, notes = format_gain_assessment(delta)
        out += [f"- {n}" for n in notes]
    else:
        out.append("- **Nothing on this card was measured by laser-export**: the claimed accuracies are unverified.")
    if limit is not None:
        out.append(f"- The measurement used only {limit} examples (`--limit`); it is a smoke test, not the full split.")
    out += [
        "- One benchmark, one held-out split. Other tasks were not measured here and may be worse"
        + ("." if ppl else "; general language-modelling quality (perplexity) was not measured either."),
        "- The selection (layer, matrix, ρ) was made on the validation split of the same benchmark.",
        "",
    ]

    # -- ONNX --------------------------------------------------------------------------------------
    onnx = manifest.get("onnx")
    if onnx:
        status = "passed" if onnx.get("passed") else "**FAILED**"
        out += [
            "## ONNX",
            "",
            f"`{onnx.get('file')}`: max |logits(ONNX Runtime) − logits(PyTorch)| = {onnx.get('max_abs_diff'):.3g} "
            f"(tolerance {onnx.get('tolerance'):.3g}) — parity check {status}.",
            "",
        ]

    # -- loading -----------------------------------------------------------------------------------
    repo = repo_id or "REPO_ID"
    _, auto_class = _task_and_auto_class(m_model.get("model_type") or m_model.get("architecture"))
    out += ["## How to load", ""]
    if storage == "factorised":
        out += [
            "The reduced matrices are stored as their two low-rank factors (this is where the memory saving comes "
            "from). **`laser_export` must be imported before loading**; it registers the loader for the factorised layers:",
            "",
            "```python",
            "import laser_export  # pip install laser-export; registers the factorised-layer loader",
            f"from transformers import {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{repo}")',
            "```",
            "",
            "A loader without `laser_export` fails loudly instead of silently loading wrong (random) weights for "
            "the factorised layers.",
            "",
        ]
    else:
        out += [
            "The reduced matrices were written back at full size, so this loads anywhere, with no extra package:",
            "",
            "```python",
            f"from transformers import {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{repo}")',
            "```",
            "",
        ]

    # -- recipe ------------------------------------------------------------------------------------
    fence = _fence(recipe_yaml or "")
    out += [
        "## Recipe",
        "",
        "The full recipe this checkpoint was built from:",
        "",
        f"{fence}yaml",
        (recipe_yaml or "").rstrip("\n"),
        fence,
        "",
        "## Citation",
        "",
        "```bibtex",
        BIBTEX,
        "```",
        "",
    ]
    return "\n".join(out)
