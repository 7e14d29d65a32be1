"""Every command in README.md runs as written: each is extracted from the README (its code blocks
and its inline `python ...` / `bash ...` spans) and run here in a quick mode on the bundled tiny
model and toy data, so a README edit that breaks one fails this test.

How a command runs is decided by the first rule in RULES whose pattern matches it:

    Quick(...)     run it: placeholders (RUN, SFT_RUN, RM_RUN, URL, ...) become real artefacts
                   made once per session, hub models and datasets become the bundled model and
                   the local fixtures, and quick settings are appended (few examples, prompts,
                   tokens) unless the command sets them itself;
    Needs(why)     not run here: it needs something this machine lacks (a GPU, the hub, two
                   nodes, a tool that is not a dependency); the reason is the test's skip reason;
    Covered(test)  the same command runs in another test already (e.g. frontier.sh --quick).

A command that no rule matches fails: add a rule (a new README command opts into a quick
variant, or says what it needs). Each command's wall time goes to readme_durations.json in the
test's temp dir and is printed (pytest -s): the README's durations are the full commands',
measured separately (see the closing notes), these are the quick variants'.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# a command: optional VAR=value assignments, then one of these programs
COMMAND = re.compile(r"^([A-Z_]+=\S+ )*(python|bash|torchrun|pip|lm_eval|vllm) ")


def readme_commands(text: str | None = None) -> list[str]:
    """The README's commands: code-block lines (continuations joined, comments cut) and inline
    code spans, each once, in order."""
    text = text if text is not None else (ROOT / "README.md").read_text()
    found, current = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            current = ""
            continue
        current = f"{current} {line.strip()}".strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        command = re.sub(r"\s+#.*$", "", current).strip()
        current = ""
        if COMMAND.match(command):
            found.append(command)
    found += [" ".join(m.split()) for m in re.findall(r"`((?:python|bash|torchrun) [^`]+)`", text)]
    return list(dict.fromkeys(found))


@dataclass
class Quick:
    """Run the command: `sub` {regex: replacement} first, then placeholders, then quick
    settings: `train` appended to every train.py part (unless set), `args` to a script part,
    `env` set; background=True: a server, probed then stopped."""
    sub: dict = field(default_factory=dict)
    train: tuple = ()
    args: str = ""
    env: dict = field(default_factory=dict)
    background: bool = False
    resumable_only: bool = False


@dataclass
class Needs:
    why: str


@dataclass
class Covered:
    by: str


HUB_MODEL = {r"model=(pythia28|llama2_7b|llama2_70b|llama2_13b|mistral7b|gpt2\S*)\b": "model=tiny"}
TRAIN_QUICK = ("wandb.enabled=false", "n_examples=32", "eval_every=1000000", "n_eval_examples=16",
               "eval_batch_size=16", "sample_during_eval=false", "gold_eval_prompts=0",
               "local_dirs=[{runs}]")
PPO_QUICK = ("batch_size=8", "loss.mini_batch_size=4", "loss.max_new_tokens=8",
             "n_eval_examples=8", "eval_batch_size=8")
# GRPO / RLOO / online DPO: 4 prompts x K samples per rollout, 8 prompts in all
GROUP_QUICK = ("batch_size=4", "n_examples=8", "loss.max_new_tokens=8", "n_eval_examples=8",
               "eval_batch_size=8")
# the real model (SmolLM2-135M): a few examples
REAL_QUICK = ("n_examples=8", "batch_size=4", "eval_batch_size=4", "n_eval_examples=4")

RULES = [
    (r"^pip install .*-m pytest|^python -m pytest", Covered("CI itself (.ci/run runs the suite)")),
    (r"^pip install .*&& python train\.py$",
     Quick(sub={r"^pip install \S+ -r requirements\.txt && ": ""},
           train=("gold_eval_prompts=16", "n_examples=64"))),
    (r"torchrun --nnodes 2", Needs("two nodes (tests/test_multinode.py runs one on loopback)")),
    (r"^torchrun --nproc_per_node 8 train\.py trainer=TensorParallelTrainer",
     Quick(sub={"--nproc_per_node 8": "--nproc_per_node 2", "tp_size=8": "tp_size=2"})),
    (r"^torchrun --nproc_per_node 8 train\.py loss=ppo",
     Quick(sub={"--nproc_per_node 8": "--nproc_per_node 2"}, train=PPO_QUICK)),
    (r"^lm_eval ", Covered("tests/test_lm_eval.py (both commands, on the local tasks)")),
    (r"^pip install --no-deps -r requirements-real\.txt", Covered("CI itself (.ci/run)")),
    (r"^pip install -r requirements-eval\.txt", Covered("CI (requirements-test.txt has it)")),
    (r"^python scripts/fetch_model\.py", Quick()),
    (r"^bash scripts/real_model/results\.sh", Needs("time: about 80 minutes on 2 idle cores; "
                                                   "--smoke runs the same code on tiny subsets")),
    (r"^bash scripts/gpu_check\.sh", Needs("a GPU (tests/test_gpu_check.py runs its --dry-run)")),
    (r"^python scripts/bench/bench_serve\.py",
     Covered("tests/test_bench_serve.py (ours; the peer needs that commit in the clone)")),
    (r"^python scripts/eval_implicit_rm\.py",
     Quick(sub={r"hh:/data/hh-rlhf": f"hh:{FIXTURES}/hh", r"--n-pairs \d+": "--n-pairs 16"},
           args="--n-pairs 16")),
    (r"^python scripts/alpaca_eval_lc\.py", Quick()),
    (r"eval_judge\.api_key_env=OPENAI_API_KEY", Quick(env={"OPENAI_API_KEY": "unused-local-key"})),
    (r"model=smollm2_135m",
     Quick(sub={r"datasets=\[ultrafeedback\]": f"datasets=[ultrafeedback:{FIXTURES}/ultrafeedback]",
                # the README's archive is a SmolLM2 SFT run; the test's runs are the tiny model's
                r" model\.archive=\.\.\.": ""}, train=REAL_QUICK)),
    (r"preset=(grpo|rloo|online_dpo)_toy|loss=(grpo|rloo|online_dpo)\b",
     Quick(sub=HUB_MODEL, train=GROUP_QUICK)),
    (r"loss\.pt_data=allenai/c4", Needs("the hub (the C4 corpus); loss.pt_data=toy runs offline")),
    (r"^python -u train\.py model=pythia28 datasets=\[hh,shp\]",
     Quick(sub={**HUB_MODEL, r"datasets=\[hh,shp\]":
                f"datasets=[hh:{FIXTURES}/hh,shp:{FIXTURES}/shp]"})),
    (r"^python -u train\.py model=pythia28 datasets=\[hh\] loss=dpo",
     Quick(sub={**HUB_MODEL, r"datasets=\[hh\]": f"datasets=[hh:{FIXTURES}/hh]"})),
    (r"^python train\.py resume=", Quick(resumable_only=True)),
    (r"loss=ppo|preset=ppo_toy", Quick(sub=HUB_MODEL, train=PPO_QUICK)),
    (r"^python -?u? ?train\.py|^python train\.py", Quick(sub=HUB_MODEL)),
    (r"^python scripts/serve\.py",
     Quick(sub={"--port 8000": "--port 0", r" &$": ""}, background=True)),
    (r"^python scripts/ai_completions\.py",
     Quick(args="--max-prompts 4 --max-tokens 16", env={"OPENAI_API_KEY": "unused-local-key"})),
    (r"^python scripts/generate_samples\.py", Quick(args="--end 8 --max-new-tokens 16")),
    (r"^bash scripts/parallel_sample\.sh",
     Quick(sub={r"parallel_sample\.sh 8 ": "parallel_sample.sh 2 ",
                "--prompts hh": f"--prompts hh:{FIXTURES}/hh"}, args="--max-new-tokens 8")),
    (r"^python scripts/label_ai_preferences\.py", Quick()),
    (r"eval_ckpt\.sh", Quick(env={"N_PROMPTS": "6", "MAX_NEW_TOKENS": "12"})),
    # the benchmarks' own tests run these very commands at a small size (a minute each)
    (r"^python scripts/bench/bench\.py --preset cpu-tiny --epoch",
     Covered("tests/test_bench.py::test_bench_epoch_mode_times_whole_epochs_of_both_trainers")),
    (r"^python scripts/bench/bench\.py --preset cpu-tiny$",
     Covered("tests/test_bench.py::test_bench_cpu_tiny_ours")),
    (r"^python scripts/bench/bench\.py", Quick(args="--steps 1 --warmup 0 --only ours bare")),
    (r"^python scripts/bench/bench_generate\.py --preset cpu-tiny$",
     Covered("tests/test_bench_generate.py::test_bench_generate_cpu_tiny")),
    (r"^python scripts/bench/bench_generate\.py",
     Quick(args="--prompts 4 --new-tokens 4 --repeats 1")),
    (r"^python scripts/bench/bench_parallel\.py", Quick(args="--steps 1 --warmup 0 --modes single")),
    (r"^python scripts/evaluate\.py", Quick(sub={r"--n-prompts \d+": ""},
                                             args="--n-prompts 6 --max-new-tokens 12")),
    (r"^python scripts/export_hf\.py", Quick()),
    (r"^python scripts/summarize_runs\.py", Quick()),
    (r"^bash scripts/sweeps/frontier\.sh --quick",
     Covered("tests/test_sweeps.py::test_quick_frontier (the long tier)")),
    (r"^bash scripts/sweeps/frontier\.sh", Needs("time: the full frontier takes minutes and "
                                                 "rewrites docs/frontier.*; --quick runs its code")),
    (r"^bash scripts/toy_rlhf\.sh --quick", Quick(args="local_dirs=[{work}/rlhf]")),
    (r"^bash scripts/toy_rlhf\.sh$", Needs("time: the full pipeline; its --quick command runs "
                                           "the same code at a tenth of the size")),
    (r"^bash scripts/demo_rlaif\.sh",
     Quick(env={"N_PAIRS": "8", "SFT_EXAMPLES": "64", "DPO_EPOCHS": "1", "N_PROMPTS": "6",
                "MAX_NEW_TOKENS": "12", "OUT": "{work}/demo"})),
]


def rule_for(command: str):
    for pattern, rule in RULES:
        if re.search(pattern, command):
            return rule
    return None


def test_every_readme_command_has_a_rule():
    missing = [c for c in readme_commands() if rule_for(c) is None]
    assert not missing, "README commands without a rule in tests/test_readme.py RULES " \
        "(add Quick(...), Needs(reason) or Covered(test)):\n" + "\n".join(missing)


def test_the_extractor_finds_continued_and_inline_commands():
    text = ("intro `python scripts/x.py A` and `pip list`\n\n    # a comment\n"
            "    python train.py a=1 \\\n        b=2   # why\n    not a command\n")
    assert readme_commands(text) == ["python train.py a=1 b=2", "python scripts/x.py A"]


# ---------------------------------------------------------------------------- artefacts
def _run(args, cwd, env=None, timeout=900):
    out = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _env(**extra):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("HARNESS_FAULT", None)
    return {**env, **extra}


def _train(work, *args) -> Path:
    quick = [a.format(runs=work / "runs") for a in TRAIN_QUICK if not a.startswith("n_examples")]
    out = _run([sys.executable, str(ROOT / "train.py"), *quick, "n_examples=64", *args], work)
    return Path(re.findall(r"^done: (.+)$", out.stdout, re.M)[-1])


def _served_url(server) -> str:
    """The URL a starting scripts/serve.py prints (after its loading lines)."""
    for line in server.stdout:
        found = re.search(r"^serving .* at (http://\S+/v1)", line)
        if found:
            return found.group(1)
    raise AssertionError("the server exited before serving")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The artefacts the README's placeholders stand for, and a served policy + scripted judge."""
    work = tmp_path_factory.mktemp("readme")
    art = {"work": work, "runs": work / "runs"}
    art["sft"] = _train(work, "exp_name=sft")
    art["dpo"] = _train(work, "loss=dpo", "loss.beta=0.1", f"model.archive={art['sft']}",
                        "exp_name=dpo")
    art["rm"] = _train(work, "+preset=reward_toy", f"model.archive={art['sft']}", "exp_name=rm")
    art["hf"] = work / "hf"
    _run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), str(art["sft"]), str(art["hf"])],
         work)
    art["resumable"] = work / "resumable"
    shutil.copytree(art["sft"], art["resumable"], symlinks=True)
    _run([sys.executable, str(ROOT / "scripts" / "generate_samples.py"), str(art["sft"]),
          "--prompts", "toy", "--split", "train", "--end", "64", "--n-samples", "2",
          "--max-new-tokens", "16", "--out", str(work / "s.jsonl")], work)
    _run([sys.executable, str(ROOT / "scripts" / "label_ai_preferences.py"), "--samples",
          str(work / "s.jsonl"), "--judge", "gold:toy", "--out-dir", str(work / "labels")], work)
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", f"policy={art['sft']}",
         "--model", f"M={art['sft']}", "--gold-judge", "judge=toy", "--judge-template", "toy",
         "--port", "0"], cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    art["url"] = _served_url(server)
    yield art
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)


def placeholders(art) -> dict:
    """README placeholder -> artefact (longest first; whole words)."""
    sft, policy = str(art["sft"]), f"{art['sft']}/LATEST/policy.pt"
    return {
        r"\.cache/anthropic_shp_sft_pythia28_\.\.\./LATEST/policy\.pt": policy,
        r"\.cache/toy_sft_2026-11-23_15-30-00_123456": str(art["resumable"]),
        r"model\.archive=\.\.\.": f"model.archive={policy}",
        r"http://127\.0\.0\.1:8000/v1": art["url"], r"\bURL\b": art["url"],
        r"/data/sg\.json": str(FIXTURES / "sharegpt.json"), r"/models/llama": "assets/tiny_model",
        r"\bRM_RUN_DIR\b": str(art["rm"]), r"\bRM_RUN\b": str(art["rm"]),
        r"\bDPO_RUN\b": str(art["dpo"]), r"\bIPO_RUN\b": str(art["dpo"]), r"\bRUN_SFT\b": sft, r"\bSFT_RUN\b": sft,
        r"\bRUN_A\b": sft, r"\bRUN_B\b": str(art["dpo"]), r"\bSWEEP_DIR\b": str(art["runs"]),
        r"\bEXPORTED_HF_DIR\b": str(art["hf"]), r"\bOUT_DIR\b": str(art["work"] / "hf_out"),
        r"\bCKPT\b": sft, r"\bSFT/": f"{sft}/", r"\bRUN/": f"{sft}/", r" \.\.\.$": "",
        r"(?<![\w/.])train\.py": str(ROOT / "train.py"),
        r"(?<![\w/.])scripts/": f"{ROOT}/scripts/",
    }


def quick_command(command: str, rule: Quick, art) -> str:
    for pattern, new in rule.sub.items():
        command = re.sub(pattern, new, command)
    for pattern, new in placeholders(art).items():
        command = re.sub(pattern, new.replace("\\", "\\\\"), command)
    parts = []
    for part in command.split(" && "):
        if "train.py" in part:
            keys = {a.split("=", 1)[0].lstrip("+") for a in part.split()[1:] if "=" in a}
            quick = [a.format(runs=art["runs"]) for a in (*rule.train, *TRAIN_QUICK)]
            if rule.resumable_only:
                quick = [a for a in quick if a.split("=", 1)[0] in
                         ("local_dirs", "wandb.enabled", "gold_eval_prompts")]
            for arg in quick:
                key = arg.split("=", 1)[0]
                if key not in keys:
                    part, keys = f"{part} {arg}", keys | {key}
        elif rule.args:
            part = f"{part} {rule.args.format(work=art['work'], runs=art['runs'])}"
        parts.append(part)
    return " && ".join(parts)


COMMANDS = readme_commands()
DURATIONS = {}


# the two demos take a minute and a half each even in their quick modes: the long tier
LONG = re.compile(r"^bash scripts/(demo_rlaif\.sh|toy_rlhf\.sh --quick)")
PARAMS = [pytest.param(c, marks=pytest.mark.long) if LONG.search(c) else c for c in COMMANDS]


@pytest.mark.parametrize("command", PARAMS, ids=[c[:70] for c in COMMANDS])
def test_readme_command_runs(command, work, tmp_path):
    rule = rule_for(command)
    if isinstance(rule, Needs):
        pytest.skip(f"needs {rule.why}")
    if isinstance(rule, Covered):
        pytest.skip(f"runs in {rule.by}")
    shutil.copy(work["work"] / "s.jsonl", tmp_path / "s.jsonl")
    (tmp_path / "labels").mkdir()
    shutil.copy(work["work"] / "labels" / "annotations.json", tmp_path / "labels")
    shutil.copy(work["work"] / "labels" / "annotations.json", tmp_path / "annotations.json")
    shell = quick_command(command, rule, work)
    env = _env(**{k: v.format(work=tmp_path) for k, v in rule.env.items()},
               OUT_ROOT=str(tmp_path / "eval"))
    start = time.time()
    if rule.background:
        return _serve(shell, tmp_path, env)
    out = subprocess.run(["bash", "-c", f"set -eo pipefail; {shell}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    DURATIONS[command] = round(time.time() - start, 1)
    (work["work"] / "readme_durations.json").write_text(json.dumps(DURATIONS, indent=1))
    print(f"\n{DURATIONS[command]:7.1f} s  {command}")
    assert out.returncode == 0, f"{shell}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def _serve(shell, cwd, env):
    server = subprocess.Popen(["bash", "-c", f"exec {shell}"], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = _served_url(server)
        models = json.loads(urllib.request.urlopen(f"{url}/models", timeout=60).read())
        names = re.findall(r"--model (\w+)=", shell)
        assert [m["id"] for m in models["data"]] == names
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
