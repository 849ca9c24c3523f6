"""lm-eval (``HFLM`` / ``lm_eval --model hf``) loads a factorised export by path without laser-export installed.

lm-eval reads ``config.quantization_config`` through ``AutoQuantizationConfig.from_dict`` before it imports
any model class. The export's ``auto_map`` therefore names a config class in ``modeling_laser.py``: loading
the config with ``trust_remote_code=True`` imports that file, which registers the ``laser`` method.
Offline: a tiny GPT-J export, a multiple-choice task over a local JSONL (a local task YAML).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from cleanenv import clean_env, make_clean_venv, run_clean
from laser_export.architectures import family_for
from laser_export.export.safetensors import write_checkpoint
from laser_export.policy import atomic_folder
from laser_export.intervene import plan_targets, reduce_model
from laser_export.recipe import Intervention
from tinymodels import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'laser-export[lm-eval]')")

DOCS = [{"q": f"w{i} w{i + 1} w{i + 2}", "choices": [f"w{i + 3}", f"w{i + 10}"], "label": 0} for i in range(6)]
TASK_YAML = """task: laser_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(clean python, work dir, factorised export folder, in-process reduced model, task folder)."""
    root = tmp_path_factory.mktemp("lmeval")
    model = tiny_model("gptj")
    fam = family_for("gptj")
    ivs = [Intervention(layer=2, matrix="fc_in", rho=0.1), Intervention(layer=1, matrix="o", rank=2)]
    entries = reduce_model(model, fam, plan_targets(ivs, model.config, fam), storage="factorised")
    with atomic_folder(root / "export") as tmp:
        write_checkpoint(model, tiny_tokenizer(), tmp)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "laser_tiny.yaml").write_text(TASK_YAML.format(data=tasks / "data.jsonl"))
    return make_clean_venv(root / "venv"), root, root / "export", model, tasks


def _expected_loglikelihoods(model) -> list[list[float]]:
    """Sum of log p(choice tokens | question) from the in-process reduced model (word-level tokens)."""
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for d in DOCS:
            ctx = tok(d["q"], add_special_tokens=False)["input_ids"]
            row = []
            for choice in d["choices"]:
                cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
                logp = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
                row.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            out.append(row)
    return out


HFLM_CODE = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained={folder!r}, trust_remote_code={trust}, dtype="float32", device="cpu", batch_size=4)
assert "laser_export" not in sys.modules
kinds = sorted({{type(m).__name__ for m in lm.model.modules()}} & {{"LowRankLinear"}})
print("MODEL", type(lm.model).__name__, kinds)
res = simple_evaluate(model=lm, tasks=["laser_tiny"], task_manager=TaskManager(include_path={tasks!r}),
                      log_samples=True)
samples = sorted(res["samples"]["laser_tiny"], key=lambda s: s["doc_id"])
print("LL", json.dumps([[float(r[0]) for r in s["filtered_resps"]] for s in samples]))
"""


@pytest.mark.slow
def test_hflm_loads_factorised_export_by_path_and_scores_the_reduced_model(setup):
    python, root, folder, model, tasks = setup
    res = run_clean(python, HFLM_CODE.format(folder=str(folder), trust=True, tasks=str(tasks)), cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MODEL LaserGPTJForCausalLM ['LowRankLinear']" in res.stdout
    got = json.loads(res.stdout.split("LL ", 1)[1].splitlines()[0])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(_expected_loglikelihoods(model)), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_hflm_without_trust_remote_code_refuses_instead_of_loading_random_weights(setup):
    python, root, folder, _, tasks = setup
    res = run_clean(python, HFLM_CODE.format(folder=str(folder), trust=False, tasks=str(tasks)), cwd=root)
    assert res.returncode != 0 and "MODEL" not in res.stdout
    assert "laser" in res.stderr.lower()


@pytest.mark.slow
def test_lm_eval_cli_runs_on_factorised_export(setup):
    python, root, folder, _, tasks = setup
    cmd = [str(python), "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", "laser_tiny",
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4", "--output_path", str(root / "out")]
    res = subprocess.run(cmd, cwd=root, env=clean_env(root), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (root / "out").rglob("results*.json")]
    assert results and results[0]["results"]["laser_tiny"]["acc,none"] is not None
