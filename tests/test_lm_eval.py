"""lm-eval (requirements-eval.txt: lm-eval[hf]) on the local task files in assets/lm_eval: the
README's two worked commands, against scripts/serve.py (local-completions) and directly on a
Hugging Face checkpoint dir (hf), give the same log-likelihoods, accuracy and greedy text."""

import json
import os
import subprocess
import sys

import pytest

from harness.checkpoints import REPO_ROOT
from harness.feedback.serving import ModelBackend
from harness.models.modeling import load_checkpoint
from serving_helpers import running_server

TINY = str(REPO_ROOT / "assets" / "tiny_model")


def lm_eval(tmp_path, name, model, model_args) -> dict:
    """`lm_eval` as the README runs it, from the repo root; its per-sample records by task."""
    out = tmp_path / name
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", "toy_choice,toy_generate", "--include_path", "assets/lm_eval",
           "--batch_size", "4", "--log_samples", "--output_path", str(out), "--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(x) for x in path.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    return {"samples": samples, "results": results}


@pytest.mark.slow
def test_lm_eval_on_serve_py_and_on_the_checkpoint_agree(tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = load_checkpoint(TINY)
    with running_server({"tiny": ModelBackend("tiny", model, tok, max_new_tokens=64)}) as (_, url):
        served = lm_eval(tmp_path, "served", "local-completions",
                         f"model=tiny,base_url={url}/completions,tokenizer={TINY},"
                         "tokenized_requests=False,num_concurrent=1,max_retries=1")
    direct = lm_eval(tmp_path, "direct", "hf", f"pretrained={TINY},dtype=float32")
    choice_s, choice_d = served["samples"]["toy_choice"], direct["samples"]["toy_choice"]
    assert len(choice_s) == len(choice_d) == 12
    for s, d in zip(choice_s, choice_d):  # [[loglikelihood, is_greedy], ...] per choice
        for (ll_s, _), (ll_d, _) in zip(s["filtered_resps"], d["filtered_resps"]):
            assert float(ll_s) == pytest.approx(float(ll_d), abs=1e-4)
    assert served["results"]["toy_choice"]["acc,none"] == direct["results"]["toy_choice"]["acc,none"]
    gen_s, gen_d = served["samples"]["toy_generate"], direct["samples"]["toy_generate"]
    assert [s["filtered_resps"] for s in gen_s] == [d["filtered_resps"] for d in gen_d]
    assert any(s["filtered_resps"][0].strip() for s in gen_s)  # something was generated
