"""The implicit-reward-model evaluation: beta * log(pi / pi_ref) accuracy on held-out pairs,
hand-checked on a tiny batch, and end to end on DPO and reward-model checkpoints."""

import json
import sys

import pytest
import torch

from harness.evaluation.implicit_rm import (ImplicitRewardModel, evaluate, implicit_rewards,
                                            load_pairs, pair_scores)
from harness.models.generation import completion_logps, encode_completions
from harness.training.run_logging import read_metrics
from serving_helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import eval_implicit_rm  # noqa: E402


def test_rewards_and_pair_scores_by_hand():
    # beta * (log pi - log ref): 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5
    assert implicit_rewards([-10.0, -12.0], [-11.0, -11.0], 0.5).tolist() == [0.5, -0.5]
    assert implicit_rewards([-10.0, -12.0], None, 0.1, reference_free=True).tolist() == \
        pytest.approx([-1.0, -1.2])
    assert pair_scores([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="2 chosen rewards but 1"):
        pair_scores([1.0, 2.0], [0.0])


def test_a_tiny_batch_by_hand(tiny):
    model, tok = tiny
    reference = type(model)(model.config).eval()  # another model: rewards are not all zero
    reference.load_state_dict({k: v + 0.01 * torch.randn_like(v, generator=torch.Generator().manual_seed(0))
                               for k, v in model.state_dict().items()})
    pairs = load_pairs("toy", "test", n_pairs=3)
    scorer = ImplicitRewardModel(model, reference, tok, beta=0.2)
    result = evaluate(scorer, ["toy"], "test", n_pairs=3)
    expected = []
    for prompt, chosen, rejected in pairs:  # each response's summed log-probs, one by one
        rewards = []
        for response in (chosen, rejected):
            sample = encode_completions(tok, [prompt], [response])
            assert sample[0].completion_ids[-1] == tok.eos_token_id  # EOS scored, as in training
            pi = completion_logps(model, tok, sample)[0].item()
            ref = completion_logps(reference, tok, sample)[0].item()
            rewards.append(0.2 * (pi - ref))
        expected.append(1.0 if rewards[0] > rewards[1] else 0.5 if rewards[0] == rewards[1] else 0.0)
    toy = result["datasets"]["toy"]
    assert toy["pairs"] == 3 and toy["accuracy"] == pytest.approx(sum(expected) / 3)
    same = evaluate(ImplicitRewardModel(model, model, tok, beta=0.2), ["toy"], "test", n_pairs=3)
    assert same["accuracy"] == 0.5 and same["datasets"]["toy"]["ties"] == 3  # pi = ref: all ties


def accuracy_on_the_runs_eval_pairs(run_dir) -> float:
    """The scorer of eval_implicit_rm on the held-out pairs the run itself evaluated on."""
    from omegaconf import OmegaConf
    from harness.evaluation.implicit_rm import load_scorer
    from harness.training.setup import load_splits
    scorer, _ = load_scorer(str(run_dir))
    _, held_out = load_splits(OmegaConf.load(run_dir / "config.yaml"), sft_mode=False)
    prompts = [e.prompt for e in held_out]
    return pair_scores(scorer(prompts, [e.chosen for e in held_out]),
                       scorer(prompts, [e.rejected for e in held_out])).mean().item()


@pytest.mark.slow
def test_dpo_and_reward_model_checkpoints_end_to_end(tmp_path, train_run):
    dpo = train_run(tmp_path / "dpo", "loss=dpo", "loss.beta=0.5", "n_examples=64", "lr=1e-3",
                    "optimizer=AdamW", "warmup_steps=0", "n_eval_examples=32")
    [result] = eval_implicit_rm.main([str(dpo), "--n-pairs", "50"])
    assert result["scorer"]["beta"] == 0.5 and result["pairs"] == 50
    assert result["scorer"]["reference"].endswith("tiny_model")  # the run's base model
    assert json.loads((dpo / "LATEST" / "implicit_rm_test.json").read_text())["accuracy"] == \
        result["accuracy"] and (dpo / "LATEST" / "implicit_rm_test.png").stat().st_size > 0
    # on the run's own held-out pairs the implicit reward agrees with the run's reward accuracy
    final = [m for m in read_metrics(dpo / "metrics.jsonl") if "rewards_eval/accuracies" in m][-1]
    assert accuracy_on_the_runs_eval_pairs(dpo) == pytest.approx(final["rewards_eval/accuracies"])
    rm = train_run(tmp_path / "rm", "loss=reward", "n_examples=64", "n_eval_examples=32")
    [scored] = eval_implicit_rm.main([str(rm), "--n-pairs", "50", "--out", str(tmp_path / "rm.json")])
    assert scored["scorer"]["kind"] == "reward_model" and scored["pairs"] == 50
    final = [m for m in read_metrics(rm / "metrics.jsonl") if "rewards_eval/accuracies" in m][-1]
    assert accuracy_on_the_runs_eval_pairs(rm) == pytest.approx(final["rewards_eval/accuracies"])
