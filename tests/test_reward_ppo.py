"""Reward models and PPO on the bundled tiny model: EOS scoring, reward training that beats
chance, checkpoints that load back as a reward function, a short PPO run end to end, PPO with
LoRA, epoch checkpoints, bad input."""

import json
import random
from pathlib import Path

import pytest
import torch

from harness.models import lora
from harness.rl.loop import RolloutLoop, TrainingDiverged
from harness.models.modeling import last_token_index, load_model, load_tokenizer
from harness.rl.rollout import policy_logprobs
from harness.models.reward_model import (RewardFunction, build_reward_model, check_same_tokenizer,
                                         load_reward_model)
from harness.objectives.reward import to_ratings
from harness.training.run_logging import read_metrics
from harness.data.toy_task import all_prompts, parse_request



def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]


def test_reward_is_read_at_eos_whatever_the_padding():
    tok = load_tokenizer("assets/tiny_model")
    torch.manual_seed(0)
    model = build_reward_model("assets/tiny_model", "float32").eval()
    seq = tok("\n\nHuman: hi\n\nAssistant: The cafe was great.")["input_ids"] + [tok.eos_token_id]
    n, pad = len(seq), tok.pad_token_id
    right = torch.tensor([seq + [pad] * 3])
    left = torch.tensor([[pad] * 3 + seq])
    right_mask = torch.tensor([[1] * n + [0] * 3])
    with torch.no_grad():
        r_right = model(right, right_mask)
        r_left = model(left, right_mask.flip(-1))
        r_plain = model(torch.tensor([seq]), torch.ones(1, n, dtype=torch.long))
        # the value head at the EOS column is the reward
        values = model.values(right, right_mask)
        r_cut = model(torch.tensor([seq[:-1]]), torch.ones(1, n - 1, dtype=torch.long))
    torch.testing.assert_close(r_right, r_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_left, r_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[:, n - 1], r_plain, rtol=1e-5, atol=1e-5)
    assert (r_cut - r_plain).abs().item() > 1e-4  # a different last token is a different score


def test_ratings_are_equal_width_bins():
    assert to_ratings([-1.0, -0.61, -0.59, 0.0, 0.99, 1.0, 7.0], 5, -1.0, 1.0).tolist() == \
        [1, 1, 2, 3, 5, 5, 5]


def _sentiment_pairs(path: Path, n: int, seed: int):
    """Toy prompts; the chosen response praises, the rejected one pans (no polarity logic),
    so the preference is learnable in a few hundred steps by the tiny model."""
    rng = random.Random(seed)
    good, bad = ["wonderful", "excellent", "great", "lovely"], ["terrible", "awful", "horrible", "bad"]
    rows = []
    for prompt in rng.sample(all_prompts(), n):
        topic = parse_request(prompt)[0]
        rows.append({"prompt": prompt, "chosen": f" The {topic} was {rng.choice(good)}.",
                     "rejected": f" The {topic} was {rng.choice(bad)}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reward_step_runs_under_the_run_autocast():
    """loss=reward reads amp_dtype: its forward runs inside the context the loop gives it."""
    from contextlib import contextmanager
    from harness.objectives import StepContext
    from harness.objectives.reward import RewardOptions, reward_step
    from preference_datasets import BatchIterator, load_examples
    tok = load_tokenizer("assets/tiny_model")
    torch.manual_seed(0)
    model = build_reward_model("assets/tiny_model", "float32").eval()
    examples = load_examples(["toy"], "test", sft_mode=False)[:4]
    batch = next(BatchIterator(examples, tok, batch_size=4, shuffle=False, seed=0, max_length=128,
                               max_prompt_length=64).epoch_batches(0))
    entered = []

    @contextmanager
    def bf16():
        entered.append(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    results = {}
    for name, autocast in {"fp32": None, "bf16": bf16}.items():
        ctx = StepContext(policy=model, forward=None, reference_logps=None,
                          options=RewardOptions(), device=torch.device("cpu"), tokenizer=tok,
                          **({"autocast": autocast} if autocast else {}))
        results[name] = reward_step(ctx, batch, "eval")[1]["rewards_eval/chosen"]
    assert entered  # under amp the forward ran in the run's autocast: bf16 rounding shows
    assert not torch.equal(results["fp32"], results["bf16"])
    torch.testing.assert_close(results["fp32"], results["bf16"], atol=0.05, rtol=0.05)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, train_run):
    tmp = tmp_path_factory.mktemp("rm")
    _sentiment_pairs(tmp / "pairs.jsonl", 1200, seed=0)
    # json data is split by prompt hash: ~5% of the prompts are held out as the test split
    return train_run(tmp, "loss=reward", f"datasets=[json:{tmp / 'pairs.jsonl'}]", "n_epochs=2",
               "batch_size=16", "lr=1e-3", "n_eval_examples=64", "do_first_eval=true")


@pytest.mark.slow
def test_reward_training_beats_chance_on_heldout_pairs(reward_run):
    evals = [r for r in read_metrics(reward_run / "metrics.jsonl") if "loss/eval" in r]
    assert evals[-1]["rewards_eval/accuracies"] >= 0.9
    assert evals[-1]["loss/eval"] < evals[0]["loss/eval"]
    meta = json.loads((reward_run / "LATEST" / "reward_model.json").read_text())
    assert meta["heldout_accuracy"] == pytest.approx(evals[-1]["rewards_eval/accuracies"], abs=1e-6)
    assert meta["reward_std"] > 0 and meta["n_heldout_pairs"] > 20


@pytest.mark.slow
def test_reward_checkpoint_loads_back_as_a_reward_function(reward_run):
    fn = RewardFunction(reward_run)  # a run dir: its LATEST checkpoint
    prompt = "\n\nHuman: Tell Anna something positive about the cafe.\n\nAssistant:"
    good, bad = fn([prompt, prompt], [" The cafe was wonderful.", " The cafe was awful."])
    assert good > bad
    normed = RewardFunction(reward_run / "LATEST" / "policy.pt", normalize=True)
    meta = normed.meta
    assert normed([prompt], [" The cafe was wonderful."])[0] == pytest.approx(
        (good - meta["reward_mean"]) / meta["reward_std"], rel=1e-4)


@pytest.mark.slow
def test_binned_head_trains_on_absolute_ratings(tmp_path, train_run):
    run_dir = train_run(tmp_path, "loss=reward", "loss.n_bins=5", "loss.rating_source=toy",
                  "n_examples=64", "batch_size=16", "n_eval_examples=32")
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/eval" in r][-1]
    assert 1.0 <= last["rewards_eval/chosen"] <= 5.0 and last["loss/eval"] > 0
    fn = RewardFunction(run_dir)
    assert fn.meta["n_bins"] == 5
    (reward,) = fn(["\n\nHuman: Tell Anna something positive about the cafe.\n\nAssistant:"],
                   [" The cafe was wonderful."])
    assert 1.0 <= reward <= 5.0  # the expected rating


@pytest.mark.slow
def test_reward_tokenizer_mismatch_is_refused(reward_run):
    _, tok, meta = load_reward_model(reward_run)
    check_same_tokenizer(meta, tok, "here")
    tok.add_tokens(["<|new|>"])
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_same_tokenizer(meta, tok, "loss.reward_model")


@pytest.mark.slow
def test_not_a_reward_checkpoint_says_how_to_train_one(tmp_path, train_run):
    with pytest.raises(FileNotFoundError, match="loss=reward"):
        load_reward_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="loss=reward"):  # before any model loads
        train_run(tmp_path, "loss=ppo", f"loss.reward_model={tmp_path}/missing")


PPO = ["loss=ppo", "batch_size=16", "loss.mini_batch_size=8", "loss.ppo_epochs=2",
       "loss.max_new_tokens=12", "n_eval_examples=16", "loss.gold_reward=toy", "lr=1e-4",
       "warmup_steps=0"]


@pytest.mark.slow
def test_short_ppo_run_end_to_end(tmp_path, reward_run, train_run):
    run_dir = train_run(tmp_path, *PPO, f"loss.reward_model={reward_run}", "n_examples=32",
                  "loss.adaptive_kl=true", "loss.kl_target=0.1", "loss.kl_horizon=100")
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in train_rows] == [16, 32]
    for key in ("rewards_train/score", "kl_train/kl", "ppo/clipfrac", "ppo/approxkl",
                "loss/value", "ppo/explained_variance", "ppo/entropy", "ppo/response_length",
                "ppo/eos_fraction", "kl_train/coef"):
        assert key in train_rows[0], key
    # nothing changed between the rollout and the first minibatch of the first epoch
    assert all(r["ppo/first_ratio_max_dev"] == 0.0 for r in train_rows)
    # adaptive KL: the coefficient moved from its initial value
    assert train_rows[-1]["kl_train/coef"] != 0.05
    evals = [r for r in rows if "rewards_eval/gold" in r]
    assert len(evals) == 2 and evals[0]["kl_eval/kl"] == pytest.approx(0.0, abs=1e-4)
    assert (run_dir / "curves.png").stat().st_size > 0
    ckpt = run_dir / "LATEST"
    assert {"policy.pt", "critic.pt", "optimizer.pt", "trainer_state.pt"} <= {
        p.name for p in ckpt.iterdir()}
    # the actor loads back as model.archive anywhere
    state = torch.load(ckpt / "policy.pt", weights_only=True)
    assert state["step_idx"] == 32 and "lm_head.weight" in state["state"]


@pytest.mark.slow
def test_ppo_resume_matches_an_uninterrupted_run(tmp_path, reward_run, train_run):
    common = [*PPO, f"loss.reward_model={reward_run}", "do_first_eval=false",
              "loss.max_new_tokens=8"]
    whole = train_run(tmp_path / "a", *common, "n_examples=32")
    first = train_run(tmp_path / "b", *common, "n_examples=16")
    resumed = train_run(tmp_path / "c", f"resume={first}", "n_examples=32", fast=[])
    assert resumed == first
    train_rows = lambda d: [r for r in read_metrics(d / "metrics.jsonl") if "loss/policy" in r]  # noqa
    a, b = train_rows(whole), train_rows(resumed)
    assert [r["step"] for r in b] == [16, 32]
    for key in ("rewards_train/score", "kl_train/kl", "loss/policy", "loss/value"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-6), key


def _trainer(compose, tmp_path, reward_run, *overrides):
    """PPO's rollout loop built as train.py builds it (LoRA: the reference is the policy itself)."""
    cfg = compose(f"local_dirs=[{tmp_path}]", f"local_run_dir={tmp_path}/run",
                  "wandb.enabled=false", "eval_batch_size=32", "sample_during_eval=false",
                  "eval_every=1000000", *PPO, f"loss.reward_model={reward_run}", *overrides)
    (tmp_path / "run").mkdir()
    policy = load_model("assets/tiny_model", "float32")
    if lora.enabled(cfg.model):
        policy = reference = lora.apply_lora(policy, cfg.model.lora)
    else:
        reference = load_model("assets/tiny_model", "float32")
    return RolloutLoop(policy, load_tokenizer("assets/tiny_model"), cfg, str(tmp_path / "run"),
                       reference)


@pytest.mark.slow
def test_value_head_starts_as_the_reward_model_and_dropout_is_off(tmp_path, reward_run, compose):
    trainer = _trainer(compose, tmp_path, reward_run)
    ppo = trainer.method
    for (name, a), b in zip(ppo.critic.state_dict().items(),
                            ppo.reward_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(m.training for model in (trainer.policy, ppo.critic, trainer.reference)
                   for m in model.modules())


@pytest.mark.slow
def test_nan_reward_stops_the_run_after_saving(tmp_path, reward_run, monkeypatch, compose):
    """PPO's reward model is the run's own network: a NaN from it means broken numerics (the
    group methods' scorers skip such items instead, tests/test_online_rl.py)."""
    trainer = _trainer(compose, tmp_path, reward_run, "n_examples=16", "do_first_eval=false")
    monkeypatch.setattr(trainer.method.scorer, "score", lambda batch, k: torch.full(
        (batch.input_ids.shape[0],), float("nan")))
    with pytest.raises(TrainingDiverged, match=r"rewards_train/score=nan"):
        trainer.train()
    assert (tmp_path / "run" / "diverged-0" / "policy.pt").exists()
    latest = tmp_path / "run" / "LATEST"  # never the diverged weights: a resume starts before
    assert not latest.exists() or latest.resolve().name != "diverged-0"


def _evaluate_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "evaluate_script", Path(__file__).resolve().parent.parent / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    return evaluate


@pytest.mark.slow
def test_evaluate_scores_with_a_reward_checkpoint(tmp_path, reward_run):
    evaluate = _evaluate_script()
    (result,) = evaluate.main(["assets/tiny_model", "--reference", "assets/tiny_model",
                               "--reward-model", str(reward_run), "--n-prompts", "5",
                               "--max-new-tokens", "12", "--out", str(tmp_path / "r.json")])
    assert result["gold_reward_name"].startswith("rm-")
    rows = result["examples"]  # all 5 prompts: the mean is over exactly these completions
    scores = RewardFunction(reward_run)([r["prompt"] for r in rows], [r["policy"] for r in rows])
    assert result["gold_reward"] == pytest.approx(sum(scores) / 5, rel=1e-4)


LORA = ["model.lora.r=4", "model.lora.alpha=8", "lr=1e-2"]


@pytest.mark.slow
def test_lora_ppo_trains_adapters_and_value_head_only(tmp_path, reward_run, compose):
    """With model.lora the actor and critic train adapters (and the critic its value head) only;
    the reference is the base model and the reward model the original, even after training."""
    trainer = _trainer(compose, tmp_path, reward_run, *LORA)
    trained = {name: [k for k, p in model.named_parameters() if p.requires_grad]
               for name, model in trainer.method.trained.items()}
    assert trained["policy"] and all("lora_" in k for k in trained["policy"])
    assert {k for k in trained["critic"] if "lora_" not in k} == {
        "base_model.model.score.modules_to_save.default.weight",
        "base_model.model.score.modules_to_save.default.bias"}
    before = {k: v.clone() for k, v in trainer.method.trained.state_dict().items()}
    trainer.step(trainer.train_examples[:16])
    after = trainer.method.trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.{k}" for name, keys in trained.items() for k in keys}
    # the reference (adapters off) is the base model; the trained actor is not
    base = load_model("assets/tiny_model", "float32").eval()
    batch = trainer.rollout(trainer.eval_examples[:8], seed=1)
    with torch.no_grad():
        expected = policy_logprobs(base, batch, 0.7)
        torch.testing.assert_close(batch.ref_logprobs, expected, rtol=1e-5, atol=1e-5)
        assert (batch.logprobs - expected).abs().max() > 1e-3
    reward_model, _, _ = load_reward_model(reward_run)
    with torch.no_grad():
        torch.testing.assert_close(batch.scores, reward_model(batch.input_ids,
                                                              batch.attention_mask))
    assert trainer.method.reward_model is trainer.method.critic
    assert trainer.reference is trainer.policy


@pytest.mark.slow
def test_lora_ppo_resumes_exports_and_evaluates(tmp_path, reward_run, train_run):
    """A LoRA PPO run from an SFT-like archive: resumed from its first checkpoint it matches the
    uninterrupted run (the base is model.archive again, the adapters and value head come back);
    policy.pt and hf/ hold the merged actor, which evaluate.py loads."""
    base = load_model("assets/tiny_model", "float32")
    torch.manual_seed(0)
    with torch.no_grad():  # parameters, not state-dict entries: the tied head moves with them
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    archive = {k: v.clone() for k, v in base.state_dict().items()}
    torch.save({"step_idx": 0, "state": archive}, tmp_path / "sft.pt")
    common = [*PPO, *LORA, f"loss.reward_model={reward_run}", "do_first_eval=false",
              "loss.max_new_tokens=8", f"model.archive={tmp_path / 'sft.pt'}"]
    whole = train_run(tmp_path / "a", *common, "n_examples=32", "export_hf=true")
    first = train_run(tmp_path / "b", *common, "n_examples=16")
    resumed = train_run(tmp_path / "c", f"resume={first}", "n_examples=32", fast=[])
    rows = lambda d: [r for r in read_metrics(d / "metrics.jsonl") if "loss/policy" in r]  # noqa
    a, b = rows(whole), rows(resumed)
    assert [r["step"] for r in b] == [16, 32]
    for key in ("rewards_train/score", "kl_train/kl", "loss/policy", "loss/value", "grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-6), key
    ckpt = whole / "LATEST"
    merged = torch.load(ckpt / "policy.pt", weights_only=True)["state"]
    changed = {k for k in merged if not torch.equal(merged[k], archive[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    torch.testing.assert_close(torch.load(resumed / "LATEST" / "policy.pt", weights_only=True)[
        "state"], merged, rtol=1e-5, atol=1e-6)
    critic = torch.load(ckpt / "critic.pt", weights_only=True)["state"]
    assert critic and all("lora_" in k or "modules_to_save" in k for k in critic)
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(ckpt / "hf").state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(exported[k], v)
    evaluate = _evaluate_script()
    (result,) = evaluate.main([str(ckpt / "policy.pt"), "--reference", "assets/tiny_model",
                               "--n-prompts", "4", "--max-new-tokens", "8",
                               "--out", str(tmp_path / "e.json")])
    assert len(result["examples"]) == 4 and "gold_reward" in result


@pytest.mark.slow
def test_ppo_saves_every_n_epochs(tmp_path, reward_run, train_run):
    """save_every=epoch_2 with 16 prompts per epoch: epoch-2/ after the 2nd epoch, then the
    final checkpoint after the 3rd (no epoch-1, no step checkpoints in between)."""
    run_dir = train_run(tmp_path, *PPO, f"loss.reward_model={reward_run}", "data_fraction=0.01",
                  "n_epochs=3", "save_every=epoch_2", "loss.max_new_tokens=8",
                  "do_first_eval=false")
    assert sorted(p.name for p in run_dir.glob("*-*")) == ["epoch-2", "step-48"]
    state = torch.load(run_dir / "epoch-2" / "trainer_state.pt", weights_only=False)["train_state"]
    assert (state["examples"], state["epoch"], state["epoch_offset"]) == (32, 2, 0)
