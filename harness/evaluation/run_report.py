"""What a finished run achieved on a task with a gold reward (the bundled toy task): the
trained policy against the model it started from.

After training, rank 0 samples one completion per held-out prompt (the first
`gold_eval_prompts` of the dataset's test split) from the trained policy (LATEST) and from its
start (model.archive, else the base model), scores both with the gold reward registered under
the dataset's name, prints the two means with 95% intervals and the win rate, writes
RUN_DIR/final_eval.json and redraws curves.png with a "gold reward" panel. Runs whose data has
no gold reward, reward models, and debug runs (no checkpoint) skip it.
"""

import json
import os

from harness.checkpoints import atomic_write_text, find_policy
from harness.data.gold import BUILTIN, GOLD_REWARDS
from harness.objectives import get_loss_spec
from harness.training.run_logging import FINAL_EVAL, plot_metrics


def gold_reward_of(cfg) -> str | None:
    """The gold reward of the run's data: the one registered under its one dataset's name."""
    specs = list(cfg.datasets)
    if len(specs) != 1:
        return None
    name = str(specs[0]).split(":", 1)[0]
    return name if name in GOLD_REWARDS or name in BUILTIN else None


def final_gold_eval(cfg, run_dir) -> dict | None:
    """Evaluate the run's final policy against its start (see the module doc); None if skipped."""
    n = cfg.get("gold_eval_prompts") or 0
    gold = gold_reward_of(cfg) if n else None
    policy = find_policy(str(run_dir))
    if gold is None or cfg.debug or policy is None or not get_loss_spec(cfg.loss.name).samples:
        return None
    from harness.evaluation.gold_eval import EvalConfig, evaluate
    from harness.models.generation import SamplingConfig
    print(f"gold-reward evaluation: the trained policy vs its start on {n} held-out prompts")
    result = evaluate(policy, None, EvalConfig(
        gold=gold, dataset=str(cfg.datasets[0]), split="test", n_prompts=n,
        sampling=SamplingConfig(max_new_tokens=cfg.sample_max_new_tokens, seed=cfg.seed)))
    start = cfg.model.archive or cfg.model.name_or_path
    report = {"gold_reward_name": gold, "n_prompts": result["n_prompts"], "start": start,
              "start_gold_reward": result["reference_gold_reward"],
              "start_gold_reward_ci95": result["reference_gold_reward_ci95"],
              "trained": policy, "trained_gold_reward": result["gold_reward"],
              "trained_gold_reward_ci95": result["gold_reward_ci95"],
              "win_rate": result["win_rate"], "win_rate_ci95": result["win_rate_ci95"],
              "kl": result["kl"], "kl_ci95": result["kl_ci95"]}
    report["beyond_intervals"] = (report["trained_gold_reward"] - report["trained_gold_reward_ci95"]
                                  > report["start_gold_reward"] + report["start_gold_reward_ci95"])
    atomic_write_text(os.path.join(run_dir, FINAL_EVAL), json.dumps(report, indent=1) + "\n")
    plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"))
    print(summary_lines(report))
    return report


def summary_lines(r: dict) -> str:
    diff = r["trained_gold_reward"] - r["start_gold_reward"]
    verdict = "beyond the 95% intervals" if r["beyond_intervals"] else \
        "NOT beyond the 95% intervals"
    return (f"gold reward ({r['gold_reward_name']}, {r['n_prompts']} held-out prompts, mean +- 95% "
            f"interval): start {r['start_gold_reward']:.3f} +- {r['start_gold_reward_ci95']:.3f}"
            f" -> trained {r['trained_gold_reward']:.3f} +- {r['trained_gold_reward_ci95']:.3f} "
            f"({diff:+.3f}, {verdict})\n"
            f"win rate of the trained policy over its start: {r['win_rate']:.3f} +- "
            f"{r['win_rate_ci95']:.3f} (a tie counts half); KL(trained || start) {r['kl']:.2f} "
            f"nats per response\nstart: {r['start']}")
