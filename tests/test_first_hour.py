"""A newcomer's first hour: option ranges, one-line errors before anything heavy loads, resume
rules, the data fingerprint, model.archive as a run dir, the health guard, the reference
pre-pass scoring only what the run uses, rank-0 output, multirun dirs, the launcher taking its
workers down, hub failures naming the offline route, and the default run's report."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from harness import checkpoints
from harness.training import cli, options, schedule
from harness.training.health import HealthGuard, TrainingDiverged
from harness.training.checkpoint_writer import TrainState
from harness.training.run_logging import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train.py")]


# ------------------------------------------------------------------------- ranges (fast)
@pytest.mark.parametrize("override, message", [
    ("lr=fast", "lr='fast' must be a number > 0"), ("lr=0", "lr=0 must be a number > 0"),
    ("gradient_accumulation_steps=0", "must be an integer >= 1"),
    ("warmup_steps=-1", "warmup_steps=-1 must be an integer >= 0"),
    ("n_epochs=0", "n_epochs=0 must be an integer >= 1, or null"),
    ("n_examples=-8", "n_examples=-8"), ("eval_every=0", "eval_every=0"),
    ("eval_every=-5", "eval_every=-5"), ("keep_last=-1", "keep_last=-1"),
    ("max_grad_norm=-1", "max_grad_norm=-1 must be a number > 0"),
    ("batch_size=2.5", "batch_size=2.5 must be an integer"), ("sample_top_p=1.5", "sample_top_p"),
    ("data_fraction=0", "data_fraction=0"), ("health.max_loss_ratio=0.5", "max_loss_ratio"),
    ("n_epochs=null", "would never stop"), ("model.lora.dropout=1.5", "model.lora.dropout"),
    ("datasets=[toy:/data/x.json]", "generated, not read from a file"),
    ("datasets=[json:/no/such.jsonl]", "does not exist"),
    ("datasets=[tooy]", "did you mean 'toy'"),
    ("model.archive=/no/such/policy.pt", "model.archive='/no/such/policy.pt' does not exist"),
])
def test_numeric_and_data_options_are_checked_without_torch(compose, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")
                       .replace("[", r"\[").replace("+", r"\+")):
        train.check_light(compose(override))


def test_every_numeric_option_has_a_range(compose):
    """A new numeric option added to config.yaml without a range fails here."""
    cfg = compose()
    numeric = {k for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               or (v is None and k in options.RANGES)}
    unchecked = numeric - set(options.RANGES) - {"fsdp_port", "nproc_per_node"}
    assert not unchecked, f"add these to harness/training/options.RANGES: {sorted(unchecked)}"


def run_precheck(*argv):
    try:
        cli.precheck(list(argv), train.light_check)
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.parametrize("argv, message", [
    (["loss=dpo", "loss.bta=1"], "loss.bta is not an option of loss=dpo: did you mean 'loss.beta'"),
    (["lrr=1"], "lrr is not an option: did you mean 'lr'"),
    (["loss=dpoo"], "loss=dpoo: no such loss; did you mean 'dpo'"),
    (["model=tinyy"], "did you mean 'tiny'"),
    (["-m", "loss=dpo", "loss.beta=0.1,0.5", "lr=fast"], "lr='fast'"),
])
def test_command_line_errors_are_one_line_before_hydra(capsys, argv, message):
    assert run_precheck(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_good_command_line_passes_the_precheck(capsys):
    assert run_precheck("loss=dpo", "loss.beta=0.1") == 0
    assert run_precheck("-m", "loss=dpo", "loss.beta=0.05,0.1") == 0


def test_resume_refuses_keys_it_would_ignore(tmp_path, compose):
    (tmp_path / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text()
                                          .split("hydra:")[0].replace("${", "$${"))
    saved = compose()
    (tmp_path / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(saved))
    overrides = [f"resume={tmp_path}", "lr=0.5", "optimizer=SGD", "n_examples=64"]
    with pytest.raises(ValueError, match=r"so lr, optimizer cannot change; keys a resume may "
                       r"change: n_epochs, n_examples"):
        train.resumed_config(compose(*overrides), overrides)
    same = [f"resume={tmp_path}", f"lr={saved.lr}", "n_examples=64"]  # restating is fine
    assert train.resumed_config(compose(*same), same).n_examples == 64


# ------------------------------------------------------------------ health guard (fast)
def test_health_guard_stops_on_the_named_statistic(compose):
    guard, state = HealthGuard(compose("health.max_grad_norm=100")), TrainState()
    guard.check_step(state, 2.0, 1.0)
    assert state.first_loss == 2.0
    guard.check_step(state, 25.0, 1.0)  # one hard batch at 12x the first loss: the average 4.3
    for loss, norm, message in [(math.nan, 1.0, "loss/train=nan is not finite"),
                                (500.0, 1.0, r"max_loss_ratio=10.0 x the first step's loss 2"),
                                (2.0, math.inf, "grad_norm=inf is not finite"),
                                (2.0, 500.0, r"grad_norm=500 > health.max_grad_norm=100")]:
        with pytest.raises(TrainingDiverged, match=message):
            guard.check_step(state, loss, norm)
    model = torch.nn.Linear(2, 2)
    guard.check_weights(model, state)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="weights are not finite"):
        guard.check_weights(model, state)


class Batches:
    def __init__(self, n, size):
        self.examples, self.batch_size, self.examples_per_epoch = list(range(n)), size, n

    def epoch_order(self, epoch):
        import numpy as np
        return np.random.default_rng([0, epoch]).permutation(len(self.examples))


def test_reference_prepass_rows_are_what_the_loop_visits():
    batches, state = Batches(100, 8), TrainState()
    rows = schedule.rows_to_visit(batches, state, 32)
    assert rows == batches.epoch_order(0)[:32].tolist()
    state.epoch, state.epoch_offset, state.examples = 0, 96, 96
    rows = schedule.rows_to_visit(batches, state, 120)  # 4 left of epoch 0, then epoch 1
    assert rows == batches.epoch_order(0)[96:].tolist() + batches.epoch_order(1)[:24].tolist()
    assert sorted(set(schedule.rows_to_visit(batches, TrainState(), math.inf))) == list(range(100))


# ----------------------------------------------------------------- archives (fast)
def test_archive_checks(tmp_path):
    from harness.models.modeling import check_archive, load_archive, load_model
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable policy.pt"):
        check_archive(str(tmp_path / "garbage.pt"))
    model = load_model(str(ROOT / "assets" / "tiny_model"), "float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"step_idx": 1, "state": state}, tmp_path / "ok.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable policy.pt"):
        check_archive(str(tmp_path / "truncated.pt"))
    next(iter(state.values())).fill_(math.nan)
    torch.save({"step_idx": 1, "state": state}, tmp_path / "nan.pt")
    check_archive(str(tmp_path / "nan.pt"))  # readable; the values are checked at load
    with pytest.raises(ValueError, match="holds NaN or inf weights"):
        load_archive(model, str(tmp_path / "nan.pt"))


# --------------------------------------------------------------- end to end (slow)
def cli_run(tmp_path, *args, env=None, timeout=600, flags=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("HARNESS_FAULT", None)
    return subprocess.run([*TRAIN, *flags, f"local_dirs=[{tmp_path}]", "wandb.enabled=false", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


QUICK = ["n_examples=32", "batch_size=8", "eval_every=1000000", "n_eval_examples=8",
         "eval_batch_size=8", "sample_during_eval=false", "gold_eval_prompts=0"]


@pytest.mark.slow
def test_errors_are_one_line_and_leave_nothing_behind(tmp_path):
    for args, code, message in [(["lr=fast"], 2, "lr='fast'"),
                                (["loss=ipo", "loss.beta=0"], 1, "loss.beta=0"),
                                (["model.archive=" + str(ROOT / "README.md"), *QUICK], 1,
                                 "model.archive=")]:
        out = cli_run(tmp_path, *args)
        assert out.returncode == code, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and f"error: {message}" in out.stderr, out.stderr
        assert not list(tmp_path.glob("toy_*")), "a run that never started left a run dir"
    out = cli_run(tmp_path, "lr=fast", env={"HYDRA_FULL_ERROR": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr  # the traceback when asked for


@pytest.mark.slow
def test_dpo_from_a_run_dir_the_notice_and_the_reference_prepass(tmp_path):
    out = cli_run(tmp_path, *QUICK, "exp_name=sft")
    assert out.returncode == 0, out.stderr[-2000:]
    (sft,) = tmp_path.glob("sft_*")
    out = cli_run(tmp_path, *QUICK, "loss=dpo", "loss.beta=0.1", f"model.archive={sft}",
                  "exp_name=dpo")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "notice" not in out.stdout and f"loaded {sft}/step-32/policy.pt" in out.stdout
    (table,) = (tmp_path / "reference_logps").glob("*.pt")
    assert len(torch.load(table, weights_only=False)) == 32 + 8  # not the whole 2,000-pair split
    out = cli_run(tmp_path, *QUICK, "loss=dpo", "loss.beta=0.1", "exp_name=dpo_base")
    assert "notice: loss=dpo without model.archive: the policy and the reference are the base " \
        "model" in out.stdout


@pytest.mark.slow
def test_resume_checks_the_data_fingerprint(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": f" Yes {i}.",
             "rejected": f" No {i}."} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [*QUICK, "loss=dpo", "loss.beta=0.1", f"datasets=[json:{data}]", "n_examples=16"]
    assert cli_run(tmp_path, *args).returncode == 0
    (run,) = tmp_path.glob("toy_dpo_*")
    rows[3]["chosen"] = " Changed."
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli_run(tmp_path, f"resume={run}", "n_examples=32")
    assert out.returncode == 1 and "the data changed since the run started (train examples" \
        in out.stderr and "resume_accept_data_change=true" in out.stderr
    out = cli_run(tmp_path, f"resume={run}", "n_examples=32", "resume_accept_data_change=true")
    assert out.returncode == 0 and "warning: resuming on changed data" in out.stdout
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == 32


@pytest.mark.slow
def test_exploding_run_stops_with_the_statistic_and_keeps_the_last_good_checkpoint(tmp_path):
    out = cli_run(tmp_path, *QUICK, "lr=1000", "warmup_steps=0", "save_every=8", "n_examples=256",
                  "max_grad_norm=1e9")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: training stopped at optimizer step" in out.stderr
    assert any(s in out.stderr for s in ("loss/train=", "grad_norm="))
    (run,) = tmp_path.glob("toy_sft_*")
    latest = checkpoints.resume_dir(run)
    state = torch.load(latest / "policy.pt", weights_only=True)["state"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert (run / "curves.png").exists()


@pytest.mark.slow
def test_blank_model_needs_no_block_name_and_a_tiny_file_trains_without_a_test_split(tmp_path):
    from harness.data.sources import in_test_split
    says = [f"Say {i}." for i in range(40) if not in_test_split(f"\n\nHuman: Say {i}.\n\nAssistant:")]
    small = tmp_path / "small.json"  # a small file whose 5% hash test split is empty
    small.write_text(json.dumps([{"conversations": [{"from": "human", "value": say},
                                                    {"from": "gpt", "value": "Done."}]}
                                 for say in says[:12]]))
    out = cli_run(tmp_path, *QUICK, "model=blank_model",
                  f"model.name_or_path={ROOT / 'assets' / 'tiny_model'}",
                  f"datasets=[sharegpt:{small}]", "n_examples=8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "have no test examples" in out.stdout and "held out for evaluation" in out.stdout


@pytest.mark.slow
def test_multirun_output_stays_under_local_dirs(tmp_path):
    out = cli_run(tmp_path, *QUICK, "n_examples=8", "seed=1,2", flags=["-m"])
    assert out.returncode == 0, out.stderr[-2000:]
    (sweep,) = tmp_path.glob("toy_sft_sweep_*")
    assert (sweep / "multirun.yaml").exists() and len(list(sweep.glob("toy_sft_*"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [sweep.name]  # nothing else, no cwd files


@pytest.mark.slow
def test_two_ranks_print_once(tmp_path):
    out = cli_run(tmp_path, *QUICK, "trainer=FSDPTrainer", "nproc_per_node=2")
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("data: ", "done: ", "run dir: /"):
        assert sum(x.startswith(line) for x in out.stdout.splitlines()) == 1, (line, out.stdout)


@pytest.mark.slow
def test_killing_the_torchrun_agent_takes_its_workers_down(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                              "2", str(ROOT / "train.py"), "trainer=FSDPTrainer",
                              f"local_dirs=[{tmp_path}]", "wandb.enabled=false", *QUICK,
                              "n_examples=100000"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(tmp_path.glob("toy_sft_*/metrics.jsonl")):
            time.sleep(0.5)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)],
                                                  capture_output=True, text=True).stdout.split()]
        assert len(workers) == 2
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "workers outlived their launcher"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.slow
def test_hub_failure_names_the_offline_route(tmp_path):
    out = cli_run(tmp_path, *QUICK, "datasets=[hh]", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "datasets=[hh:/path/to/copy]" in out.stderr


@pytest.mark.parametrize("loss, notice", [("dpo", True), ("ipo", True), ("coh", True),
                                          ("kto", True), ("simpo", True), ("orpo", False),
                                          ("sft", False)])
def test_losses_meant_for_an_sft_start_say_so_without_an_archive(compose, capsys, loss, notice):
    from harness.objectives import base_model_notice
    extra = ["loss.beta=0.1"] if loss in ("dpo", "ipo") else []
    base_model_notice(compose(f"loss={loss}", *extra))
    assert (f"notice: loss={loss} without model.archive" in capsys.readouterr().out) == notice
