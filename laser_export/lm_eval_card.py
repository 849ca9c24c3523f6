"""The model card's view of the verify report's ``lm_eval`` section (:mod:`laser_export.lm_eval_block`): a
table of before/after numbers with paired-bootstrap CIs, and model-index entries for the tasks whose data is a
Hub dataset (``source`` naming lm-eval and its version). Plain dicts in, card lines / EvalResults out."""

from __future__ import annotations

import math

from huggingface_hub import EvalResult


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "—"


def _delta(m: dict) -> tuple[str, str]:
    d = m.get("delta")
    if not isinstance(d, dict) or "ci95" not in d:
        return "—", m.get("why") or "—"
    lo, hi = d["ci95"]
    return f"{d['estimate']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]"


def _how(section: dict) -> str:
    shots = section.get("num_fewshot")
    limit = section.get("limit")
    return (f"Measured by `laser-export verify` with lm-eval {section.get('version')} (lm-evaluation-harness, "
            "in process on the loaded model, before and after the reduction), "
            + (f"{shots}-shot" if shots is not None else "each task's default number of shots")
            + (f", on the **first {limit} documents** of each task's split (`lm_eval.limit`)" if limit is not None
               else ", on each task's full evaluation split")
            + ". Δ is reduced − baseline with a paired-bootstrap 95% CI over the same documents; metrics lm-eval "
            "does not average per document get no CI.")


def card_lines(section: dict | None) -> list[str]:
    """The card's ``## lm-eval tasks`` section (empty when the report has no lm-eval measurement)."""
    if not isinstance(section, dict) or not section.get("tasks"):
        return []
    rows = []
    for name, task in section["tasks"].items():
        for label, m in (task.get("metrics") or {}).items():
            metric, _, filt = label.partition(",")
            shown = metric if filt in ("", "none") else f"{metric} ({filt})"
            est, ci = _delta(m)
            rows.append(f"| {name} | {shown} | {task.get('n', '—')} | {_num(m.get('baseline'))} | "
                        f"{_num(m.get('reduced'))} | {est} | {ci} |")
    return ["## lm-eval tasks", "", _how(section), "",
            "| Task | Metric | n | Baseline | Reduced | Δ | 95% CI of Δ |", "|---|---|---:|---:|---:|---:|---:|",
            *rows, ""]


def eval_results(section: dict | None, task_type: str) -> list[EvalResult]:
    """model-index entries of the reduced model's lm-eval numbers, for tasks whose data is a Hub dataset."""
    if not isinstance(section, dict):
        return []
    out = []
    version, limit = section.get("version"), section.get("limit")
    for name, task in (section.get("tasks") or {}).items():
        ds = task.get("dataset") or {}
        if not ds.get("hub") or not ds.get("path"):
            continue
        args = {k: v for k, v in {"lm_eval_task": name, "lm_eval_task_version": task.get("version"),
                                  "num_fewshot": task.get("num_fewshot"), "limit": limit,
                                  "n_documents": task.get("n")}.items() if v is not None}
        for label, m in (task.get("metrics") or {}).items():
            if not isinstance(m.get("reduced"), (int, float)):
                continue
            metric = label.partition(",")[0]
            out.append(EvalResult(
                task_type=task_type, task_name=f"lm-eval {name}",
                dataset_type=ds["path"], dataset_name=name + (f" (first {limit} documents)" if limit else ""),
                dataset_config=ds.get("name"), dataset_split=ds.get("split"), dataset_args=args,
                metric_type=metric, metric_value=float(m["reduced"]), metric_config=label,
                source_name=f"lm-eval {version} (lm-evaluation-harness), run by laser-export verify",
                source_url=section.get("url") or "https://github.com/EleutherAI/lm-evaluation-harness",
            ))
    return out


__all__ = ["card_lines", "eval_results"]
