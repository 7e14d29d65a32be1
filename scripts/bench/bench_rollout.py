"""Rollout and update time per prompt of GRPO and RLOO against PPO, on the same settings.

    python scripts/bench/bench_rollout.py                 # the bundled tiny model, ~3 min on 2 CPU cores
    python scripts/bench/bench_rollout.py --rollouts 5 --episodes 128 --out rollout.jsonl

Every method runs the shared rollout loop (harness/rl/loop.py) in this process from the same
start (the bundled tiny model, or --archive), on the bundled toy prompts, with the same reward
model (a small one trained here first, or --reward-model) as PPO's reward and GRPO's / RLOO's
scorer, the same episodes per rollout (PPO: --episodes prompts x 1 sample; GRPO and RLOO:
--episodes / --k prompts x --k samples), the same response length limit, temperature,
minibatches and epochs. Timed separately: the rollout (sampling, log-probs of policy and
reference, PPO's values, scores) and the update (advantages, every minibatch's forward, backward
and optimizer step). After one untimed rollout + update, --rollouts timed ones; medians. One
JSON line per method to stdout (and --out), with its times per prompt and per episode and their
ratio to PPO's measured in the same run.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def loop_for(method: str, args, rm: str, work: Path):
    """The rollout loop of `method`, built as train.py builds it."""
    from harness.models.modeling import load_model, load_tokenizer
    from harness.objectives import needs_reference
    from harness.rl.loop import RolloutLoop
    from train import check_config
    k = 1 if method == "ppo" else args.k
    scorer = [f"loss.reward_model={rm}"] if method == "ppo" else [
        f"loss.scorer=reward_model:{rm}", f"loss.num_generations={k}"]
    cfg = compose(f"loss={method}", *scorer, f"batch_size={args.episodes // k}",
                  f"loss.mini_batch_size={args.mini_batch_size}", f"loss.ppo_epochs={args.epochs}",
                  f"loss.max_new_tokens={args.new_tokens}", "loss.temperature=1.0",
                  f"local_dirs=[{work}]", f"local_run_dir={work / method}", "wandb.enabled=false",
                  "n_eval_examples=8", f"seed={args.seed}", "lr=3e-4", "warmup_steps=0",
                  *([f"model.archive={args.archive}"] if args.archive else []))
    check_config(cfg)
    (work / method).mkdir()
    tok = load_tokenizer(cfg.model.name_or_path)
    policy = load_model(cfg.model.name_or_path, "float32", args.archive)
    reference = load_model(cfg.model.name_or_path, "float32", args.archive).eval() \
        if needs_reference(cfg.loss) else None
    return RolloutLoop(policy, tok, cfg, str(work / method), reference), k


def measure(method: str, args, rm: str, work: Path) -> dict:
    from harness.rl.loop import rollout_seed
    loop, k = loop_for(method, args, rm, work)
    prompts = args.episodes // k
    times = {"rollout": [], "update": []}
    batches = loop.prompt_batches(0, 0)
    for i in range(args.rollouts + 1):
        examples = next(batches)
        start = time.perf_counter()
        batch = loop.rollout(examples, rollout_seed(args.seed, i), k=k)
        mid = time.perf_counter()
        loop.method.learn(batch)
        loop.state.rollouts += 1
        end = time.perf_counter()
        if i:  # the first rollout and update are warm-up
            times["rollout"].append(mid - start)
            times["update"].append(end - mid)
    row = {"method": method, "prompts_per_rollout": prompts, "samples_per_prompt": k,
           "episodes_per_rollout": prompts * k, "rollouts_timed": args.rollouts}
    for part, values in times.items():
        median = statistics.median(values)
        row[f"{part}_s_per_prompt"] = median / prompts
        row[f"{part}_s_per_episode"] = median / (prompts * k)
    return row


def train_reward_model(work: Path, archive) -> str:
    """A small reward model on the toy pairs (a minute), the reward of every method here."""
    out = work / "rm"
    cmd = [sys.executable, str(REPO / "train.py"), "loss=reward", "n_examples=256",
           "batch_size=16", "n_eval_examples=32", "sample_during_eval=false",
           "wandb.enabled=false", f"local_dirs=[{work}]", f"local_run_dir={out}", "lr=1e-3",
           *([f"model.archive={archive}"] if archive else [])]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return str(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=64, help="episodes per rollout (all methods)")
    p.add_argument("--k", type=int, default=4, help="GRPO / RLOO samples per prompt")
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4, help="passes over each rollout (PPO's 4)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rollouts", type=int, default=5, help="timed rollouts (after one warm-up)")
    p.add_argument("--archive", help="start from this policy.pt (e.g. an SFT model)")
    p.add_argument("--reward-model", help="a loss=reward run dir (default: train one first)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also append the JSON lines here")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    # stdout carries only the JSON lines: the loops' own messages go to stderr
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(tmp)
        rm = args.reward_model or train_reward_model(work, args.archive)
        rows = [measure(m, args, rm, work) for m in ("ppo", "grpo", "rloo")]
    for row in rows:
        for part in ("rollout", "update"):
            row[f"{part}_vs_ppo_per_episode"] = \
                row[f"{part}_s_per_episode"] / rows[0][f"{part}_s_per_episode"]
        line = json.dumps(row)
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return rows


if __name__ == "__main__":
    main()
