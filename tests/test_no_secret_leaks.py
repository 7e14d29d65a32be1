"""No secret reaches a file or a log (#16): a key planted in the environment, behind a server
that echoes every request header into its error bodies and its answers; then every file the
labeller, scripts/ai_completions.py and a training run with an LLM eval judge wrote, and all
they printed, is searched for it."""

import json
import secrets
import sys

import pytest

from fake_endpoints import chat_answer, fake_endpoint
from harness.feedback.redaction import REDACTED
from serving_helpers import ROOT, write_samples

sys.path.insert(0, str(ROOT / "scripts"))
import ai_completions  # noqa: E402
import label_ai_preferences as labeller  # noqa: E402


def echo(request):
    """First attempt of each body: 500 quoting the request's headers; then an answer that
    quotes them too; 'FAILME' in a body: 401 quoting them, every time."""
    dump = json.dumps(request["headers"])
    body = json.dumps(request["body"])
    if "FAILME" in body:
        return 401, f"unauthorized request {dump}".encode(), {}
    seen = [r for r in echo.server.requests if json.dumps(r["body"]) == body]
    if len(seen) == 1:
        return 500, {"error": {"message": f"upstream failed for {dump}"}}, {"Retry-After": "0"}
    return 200, chat_answer(f"A (your headers: {dump})"), {}


@pytest.mark.slow
def test_a_planted_key_reaches_no_file_and_no_log(tmp_path, monkeypatch, capfd, train_run):
    key = f"sk-planted-{secrets.token_hex(16)}"
    monkeypatch.setenv("PLANTED_KEY", key)
    samples = write_samples(tmp_path / "samples.jsonl", 3)
    with open(samples, "a") as f:  # a pair the server always refuses: a listed failure
        f.write(json.dumps({"prompt": "\n\nHuman: FAILME\n\nAssistant:", "instruction": "FAILME",
                            "samples": [" a", " b"], "generator": "g"}) + "\n")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hi.", "Say bye.", "FAILME please"]))
    fast = ["--backoff", "0", "--backoff-max", "0", "--max-attempts", "3", "--api-key-env",
            "PLANTED_KEY"]
    with fake_endpoint(echo) as (server, root):
        echo.server = server
        labelled = labeller.main(["--samples", str(samples), "--out-dir", str(tmp_path / "labels"),
                                  "--judge", "llm", "--judge-base-url", f"{root}/v1",
                                  "--judge-model", "m", *fast])
        taught = ai_completions.main(["--prompts", str(prompts), "--base-url", f"{root}/v1",
                                      "--model", "m", "--out-dir", str(tmp_path / "teacher"),
                                      *fast])
        run_dir = train_run(tmp_path / "runs", "loss=sft", "n_examples=32", "lr=1e-3",
                            "optimizer=AdamW", "warmup_steps=0", "wandb.enabled=true",
                            "eval_judge.judge=llm", f"eval_judge.base_url={root}/v1",
                            "eval_judge.model=m", "eval_judge.api_key_env=PLANTED_KEY",
                            "eval_judge.n_prompts=4", "eval_judge.max_new_tokens=8")
        sent = [{k.lower(): v for k, v in r["headers"].items()}["authorization"]
                for r in server.requests]
    out, err = capfd.readouterr()
    (tmp_path / "stdout.txt").write_text(out)
    (tmp_path / "stderr.txt").write_text(err)
    # the test can fail: the key did go out, and the echoes came back into what was written
    assert sent and all(h == f"Bearer {key}" for h in sent)
    assert labelled["this_run"]["failed"] == 2 and taught["completed"] == 2
    assert (run_dir / "judge" / "step-32.jsonl").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(REDACTED.encode() in p.read_bytes() for p in files)
    assert any(p.suffix == ".wandb" for p in files)  # wandb's offline run was written too
    leaking = [str(p.relative_to(tmp_path)) for p in files if key.encode() in p.read_bytes()]
    assert leaking == [], f"{len(leaking)} of {len(files)} files hold the key"
    print(f"planted key: {len(files)} files searched (labeller, ai_completions, a training run "
          f"with wandb and an LLM eval judge, their stdout and stderr), 0 hold it")
