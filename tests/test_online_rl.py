"""GRPO, RLOO and online DPO on the shared rollout loop: bad input refused before any model loads,
the scorers (gold functions, a reward model, an LLM judge over real loopback HTTP), short runs end
to end, resume, LoRA, beta = 0 without a reference, failed scores skipped and counted, ratio
exactly 1 on the first minibatch, and micro-batches that leave a whole run unchanged (PPO
included). 2 ranks against 1: tests/test_online_rl_distributed.py."""

import json
import math
from pathlib import Path

import pytest
import torch

from harness.data.gold import GOLD_REWARDS, get_gold_reward, register_gold_reward
from harness.models.generation import Sample
from harness.rl.rollout import build_batch
from harness.rl.scorers import FunctionScorer, JudgeScorer
from harness.training.run_logging import read_metrics
from serving_helpers import running_server, toy_judge
from train import check_config

TOY = get_gold_reward("toy")


def canonical_sft_only(path: Path) -> Path:
    """Local canonical records with SFT targets and no preference pairs."""
    rows = [{"prompt": f"\n\nHuman: Tell me about item {i}.\n\nAssistant:", "responses":
             [" It is fine."], "pairs": [], "sft_target": " It is fine."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GRPO = ["loss=grpo", "loss.scorer=gold:toy"]
BAD = [
    (["loss=grpo", "loss.scorer=gold:toy", "loss.num_generations=1"], "num_generations=1"),
    (["loss=rloo", "loss.scorer=gold:toy", "loss.num_generations=1"], "a group of 1"),
    (["loss=grpo"], "loss.scorer=None: name what scores"),
    (["loss=online_dpo", "loss.scorer=toy"], "gold:NAME"),
    (["loss=grpo", "loss.scorer=gold:nope"], "unknown gold reward 'nope'"),
    (["loss=grpo", "loss.scorer=judge:llm"], "loss.judge.base_url and loss.judge.model"),
    (["loss=grpo", "loss.scorer=judge:llm", "+loss.judge.base_url=http://x",
      "+loss.judge.model=m", "+loss.judge.api_key_env=SURELY_UNSET_KEY_VAR"],
     "SURELY_UNSET_KEY_VAR"),
    (["loss=grpo", "loss.scorer=judge:llm", "+loss.judge.base_url=http://x",
      "+loss.judge.model=m", "+loss.judge.urll=y"], "loss.judge.urll is not a judge option"),
    ([*GRPO, "+loss.judge.model=m"], "not judge:llm"),
    (["loss=online_dpo", "loss.scorer=judge:llm", "+loss.judge.base_url=http://x",
      "+loss.judge.model=m", "loss.no_eos_penalty=-1"], "no_eos_penalty=null with judge"),
    ([*GRPO, "loss.scale_rewards=std"], "loss.scale_rewards='std'"),
    ([*GRPO, "loss.aggregation=mean"], "loss.aggregation='mean'"),
    ([*GRPO, "loss.kl_in=advantage"], "loss.kl_in"),
    ([*GRPO, "loss.beta=-0.1"], "loss.beta=-0.1"),
    (["loss=rloo", "loss.scorer=gold:toy", "+loss.scale_rewards=none"],
     "loss.scale_rewards is not an option of loss=rloo"),
    ([*GRPO, "loss.mini_batch_size=24", "batch_size=4"], "multiple of loss.mini_batch_size=24"),
    ([*GRPO, "loss.mini_batch_size=8", "gradient_accumulation_steps=3", "batch_size=6",
      "loss.num_generations=4"], "gradient_accumulation_steps=3"),
    ([*GRPO, "packing=true"], "packing is not read by loss=grpo"),
    (["loss=online_dpo", "loss.scorer=gold:toy", "loss.loss_type=ipo",
      "loss.label_smoothing=0.1"], "needs loss.loss_type=dpo"),
    (["loss=online_dpo", "loss.scorer=gold:toy", "loss.loss_type=kto"], "dpo or ipo"),
    (["loss=simpo", "loss.gamma=-0.5"], "loss.gamma=-0.5"),
    (["loss=kto", "loss.desirable_weight=0"], "loss.desirable_weight=0"),
    (["loss=kto", "prefix_sharing=true"], "prefix_sharing is not read by loss=kto"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_config_is_refused_before_any_model_loads(overrides, message, compose):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_config(compose(*overrides), overrides=overrides)


def test_kto_refuses_data_without_undesirable_examples(compose, tmp_path):
    sft_only = canonical_sft_only(tmp_path / "sft.jsonl")
    with pytest.raises(ValueError, match="0 undesirable"):
        check_config(compose("loss=kto", f"datasets=[json:{sft_only}]"))


def test_reward_model_scorer_must_exist_before_models_load(compose, tmp_path):
    with pytest.raises(FileNotFoundError, match="loss=reward"):
        check_config(compose("loss=grpo", f"loss.scorer=reward_model:{tmp_path}/none"))


def rollout_of(texts):
    """A rollout of `texts` answering one toy prompt (token ids are placeholders: text scorers
    read the text)."""
    prompt = "\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:"
    return build_batch([Sample(prompt, text, (5, 6), (7, 0), True) for text in texts], 1, "cpu")


def test_function_scorer_turns_non_finite_values_into_nan():
    name = "test_sometimes_nan"
    if name not in GOLD_REWARDS:
        register_gold_reward(name)(lambda p, c: math.inf if "awful" in c else float(len(c)))
    scores = FunctionScorer(name).score(rollout_of([" It was ok.", " It was awful."]), 2)
    assert scores[0].item() == len(" It was ok.") and math.isnan(scores[1].item())
    if "test_returns_text" not in GOLD_REWARDS:
        register_gold_reward("test_returns_text")(lambda p, c: "good")
    with pytest.raises(TypeError, match="test_returns_text returned 'good'"):
        FunctionScorer("test_returns_text").score(rollout_of([" ok"]), 1)


def test_judge_scorer_win_rates_over_real_http():
    """A group of three judged pairwise, both orders, by the scripted toy judge behind the real
    server: each response scores its mean win rate; a judge that always fails gives NaN."""
    texts = [" The cafe was wonderful. It was great.", " The cafe was awful.",
             " The cafe was pleasant."]
    gold = [TOY("\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:", t)
            for t in texts]
    with running_server({"judge": toy_judge()}) as (_, url):
        scorer = JudgeScorer({"base_url": url, "model": "judge", "template": "toy",
                              "max_attempts": 1, "timeout": 10})
        scores = scorer.score(rollout_of(texts), 3).tolist()
    ranks = sorted(range(3), key=lambda i: gold[i])
    assert sorted(range(3), key=lambda i: scores[i]) == ranks and sum(scores) == pytest.approx(1.5)
    with running_server({"judge": toy_judge()}, fail_always="Review") as (_, url):
        scorer = JudgeScorer({"base_url": url, "model": "judge", "template": "toy",
                              "max_attempts": 1, "backoff": 0.01, "timeout": 10})
        assert all(math.isnan(s) for s in scorer.score(rollout_of(texts[:2]), 2).tolist())


# ---------------------------------------------------------------------------- end to end
SMALL = ["batch_size=4", "loss.max_new_tokens=12", "n_eval_examples=8", "eval_batch_size=8",
         "loss.gold_reward=toy", "lr=1e-3", "warmup_steps=0", "n_examples=8"]
GROUP = [*SMALL, "loss.num_generations=4", "loss.mini_batch_size=8", "loss.ppo_epochs=2"]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "counters/updates" in r]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "rloo"])
def test_group_methods_end_to_end(tmp_path, train_run, loss):
    run_dir = train_run(tmp_path, f"loss={loss}", "loss.scorer=gold:toy", *GROUP)
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [4, 8]
    for key in ("rewards_train/score", "loss/policy", f"{loss}/clipfrac", f"{loss}/approxkl",
                f"{loss}/entropy", "kl_train/kl", f"{loss}/response_length",
                f"{loss}/skipped_groups", "grad_norm"):
        assert key in rows[0], key
    # 16 episodes in 2 minibatches x 2 epochs: 4 optimizer steps per rollout; the first
    # minibatch of each rollout sees exactly the rollout's log-probs (ratio 1)
    assert [r["counters/updates"] for r in rows] == [4, 8]
    assert all(r[f"{loss}/first_ratio_max_dev"] == 0.0 for r in rows)
    assert rows[0][f"{loss}/approxkl"] > 0  # the second epoch moved the policy
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "rewards_eval/gold" in r]
    assert len(evals) == 2 and evals[0]["kl_eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert (run_dir / "curves.png").stat().st_size > 0
    files = {p.name for p in (run_dir / "LATEST").iterdir()}
    assert {"policy.pt", "optimizer.pt", "trainer_state.pt"} <= files and "critic.pt" not in files


@pytest.mark.slow
def test_grpo_without_kl_loads_no_reference(tmp_path, train_run, compose):
    from harness.objectives import needs_reference
    assert not needs_reference(compose(*GRPO, "loss.beta=0").loss)
    assert needs_reference(compose(*GRPO).loss) and needs_reference(compose(*GRPO, "loss.beta=0.1",
                                                                           "loss.kl_in=reward").loss)
    run_dir = train_run(tmp_path, *GRPO, *GROUP, "loss.beta=0", "loss.aggregation=token",
                        "loss.clip_range_high=0.28", "loss.scale_rewards=none")
    rows = train_rows(run_dir)
    assert "kl_train/kl" not in rows[0] and "grpo/kl" not in rows[0]
    assert "kl_eval/kl" not in read_metrics(run_dir / "metrics.jsonl")[0]


@pytest.mark.slow
def test_grpo_resume_matches_an_uninterrupted_run(tmp_path, train_run):
    common = [*GRPO, *GROUP, "do_first_eval=false", "save_every=4"]
    whole = train_run(tmp_path / "a", *common)
    first = train_run(tmp_path / "b", *common, "n_examples=4")
    resumed = train_run(tmp_path / "c", f"resume={first}", "n_examples=8", fast=[])
    a, b = train_rows(whole), train_rows(resumed)
    assert [r["step"] for r in b] == [4, 8]
    for key in ("rewards_train/score", "loss/policy", "kl_train/kl", "grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-7), key
    for k, v in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_failed_scores_are_skipped_and_counted(tmp_path, train_run):
    """A scorer returning NaN for some responses: their groups are skipped (counted), the run
    trains on the rest; one that always fails leaves the policy untouched. Never a NaN trained."""
    for name, fn in {"test_nan_on_5": lambda p, c: math.nan if len(c) % 5 == 0 else TOY(p, c),
                     "test_always_nan": lambda p, c: math.nan}.items():
        if name not in GOLD_REWARDS:
            register_gold_reward(name)(fn)
    some = train_run(tmp_path / "some", "loss=grpo", "loss.scorer=gold:test_nan_on_5", *GROUP)
    rows = train_rows(some)
    assert sum(r["grpo/skipped_groups"] for r in rows) > 0 and sum(r["grpo/failed_scores"]
                                                                for r in rows) > 0
    assert sum(r["grpo/skipped_groups"] for r in rows) < 8  # and some groups trained
    assert all(torch.isfinite(v).all() for v in weights(some).values())
    never = train_run(tmp_path / "never", "loss=online_dpo", "loss.scorer=gold:test_always_nan",
                      *SMALL)
    rows = train_rows(never)
    assert [r["online_dpo/failed"] for r in rows] == [4, 4] and rows[-1]["counters/updates"] == 0
    base = torch.load(Path(never) / "LATEST" / "policy.pt", weights_only=True)["state"]
    from harness.models.modeling import load_model
    for k, v in load_model("assets/tiny_model", "float32").state_dict().items():
        assert torch.equal(base[k], v), k


@pytest.mark.slow
def test_online_dpo_starts_at_ln2_and_skips_ties(tmp_path, train_run):
    run_dir = train_run(tmp_path / "dpo", "loss=online_dpo", "loss.scorer=gold:toy", *SMALL)
    rows = train_rows(run_dir)
    first = rows[0]
    assert first["loss/train"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards_train/chosen"] == first["rewards_train/rejected"] == 0.0
    assert first["online_dpo/first_ratio_max_dev"] == 0.0
    assert first["online_dpo/pairs"] + first["online_dpo/ties"] == 4
    assert rows[1]["rewards_train/margins"] != 0.0
    if "test_constant" not in GOLD_REWARDS:
        register_gold_reward("test_constant")(lambda p, c: 1.0)
    tied = train_rows(train_run(tmp_path / "tie", "loss=online_dpo",
                                "loss.scorer=gold:test_constant", "loss.loss_type=ipo", *SMALL))
    assert [r["online_dpo/ties"] for r in tied] == [4, 4] and tied[-1]["counters/updates"] == 0


@pytest.mark.slow
def test_online_dpo_with_an_llm_judge_over_http(tmp_path, train_run):
    with running_server({"judge": toy_judge()}) as (server, url):
        run_dir = train_run(tmp_path, "loss=online_dpo", "loss.scorer=judge:llm",
                            f"+loss.judge.base_url={url}", "+loss.judge.model=judge",
                            "+loss.judge.template=toy", "+loss.judge.max_attempts=2", *SMALL)
        requests = sum(server.requests_per_body.values())
    rows = train_rows(run_dir)
    # 4 pairs per step, each asked in both orders
    assert requests == 16 and sum(r["online_dpo/pairs"] + r["online_dpo/ties"] for r in rows) == 8
    assert rows[-1]["counters/updates"] >= 1
    # a judge scores only pairs: evaluation reports the gold reward, not a judge score
    assert "rewards_eval/score" not in read_metrics(run_dir / "metrics.jsonl")[0]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, train_run):
    return train_run(tmp_path_factory.mktemp("rm"), "loss=reward", "n_examples=64",
                     "batch_size=16", "n_eval_examples=32")


@pytest.mark.slow
def test_grpo_with_a_reward_model_scorer_and_lora(tmp_path, train_run, reward_run):
    """The reward model scores the policy's token ids; with LoRA only adapters train and the
    reference is the base model (adapters off), so the first ratio and the first KL are 0."""
    run_dir = train_run(tmp_path, "loss=grpo", f"loss.scorer=reward_model:{reward_run}",
                        *GROUP, "model.lora.r=4", "model.lora.alpha=8", "lr=1e-2")
    rows = train_rows(run_dir)
    assert rows[0]["kl_train/kl"] == 0.0 and rows[0]["grpo/first_ratio_max_dev"] == 0.0
    assert rows[1]["kl_train/kl"] != 0.0
    assert (run_dir / "LATEST" / "adapter" / "adapter_model.safetensors").exists()
    # the scorer: the reward model at each response's last token, normalised
    from harness.models.generation import encode_completions
    from harness.models.modeling import load_tokenizer
    from harness.models.reward_model import load_reward_model
    from harness.rl.scorers import RewardModelScorer
    model, _, meta = load_reward_model(reward_run)
    prompt = "\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:"
    batch = build_batch(encode_completions(load_tokenizer("assets/tiny_model"), [prompt] * 3, [
        " The cafe was great.", " It was bad, very bad.", " Cafe."]), 1, "cpu")
    with torch.no_grad():
        direct = (model(batch.input_ids, batch.attention_mask) - meta["reward_mean"]) / \
            meta["reward_std"]
    got = RewardModelScorer(model, meta, True, chunk=2).score(batch, 3)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5)
    assert got.std() > 0


ACCUMULATION = {
    "grpo_sequence": [*GRPO, *GROUP],
    "grpo_token": [*GRPO, *GROUP, "loss.aggregation=token", "loss.kl_in=reward"],
    "rloo": ["loss=rloo", "loss.scorer=gold:toy", *GROUP],
    "online_dpo": ["loss=online_dpo", "loss.scorer=gold:toy", *SMALL],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*ACCUMULATION, "ppo"])
def test_micro_batches_leave_a_rollout_run_unchanged(tmp_path, train_run, reward_run, name):
    """gradient_accumulation_steps=2 splits each minibatch into halves, normalised by the whole
    minibatch's count: every logged number and the final weights equal the run without.
    Catches token means taken per micro-batch (DAPO's token loss) and per-part normalisers."""
    overrides = ACCUMULATION.get(name) or [
        "loss=ppo", f"loss.reward_model={reward_run}", "batch_size=16", "loss.mini_batch_size=8",
        "loss.ppo_epochs=2", "loss.max_new_tokens=12", "n_eval_examples=8", "lr=1e-3",
        "warmup_steps=0", "n_examples=32"]
    one = train_run(tmp_path / "one", *overrides)
    two = train_run(tmp_path / "two", *overrides, "gradient_accumulation_steps=2")
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert len(a) == len(b) and len(train_rows(one)) >= 2
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if "per_second" not in key:
                assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (ra["step"], key)
    for k, v in weights(one).items():  # RMSprop divides by the gradient's scale: a weight
        # whose gradient is ~0 moves by float noise x lr, so weights get an absolute 1e-5
        torch.testing.assert_close(weights(two)[k], v, rtol=1e-4, atol=1e-5)
    from harness.models.modeling import load_model
    base = load_model("assets/tiny_model", "float32").state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in weights(one).items())  # it trained


def test_scorer_import_registers_your_own_function(compose, tmp_path, monkeypatch):
    """A verifiable reward of your own: a module that registers it, named by loss.scorer_import
    (imported before the scorer is looked up, so a missing name is still caught early)."""
    (tmp_path / "my_rewards_for_test.py").write_text(
        "from harness.data.gold import register_gold_reward\n\n"
        "@register_gold_reward('test_length_reward')\n"
        "def length_reward(prompt, completion):\n    return -len(completion) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="unknown gold reward 'test_length_reward'"):
        check_config(compose("loss=rloo", "loss.scorer=gold:test_length_reward"))
    cfg = compose("loss=rloo", "loss.scorer=gold:test_length_reward",
                  "loss.scorer_import=my_rewards_for_test")
    check_config(cfg)
    assert get_gold_reward("test_length_reward")("p", " abc") == -0.04
    with pytest.raises(ValueError, match="loss.scorer_import='no_such_module_x'"):
        check_config(compose("loss=rloo", "loss.scorer=gold:toy",
                             "loss.scorer_import=no_such_module_x"))


@pytest.mark.slow
def test_bench_rollout_prints_one_line_per_method(tmp_path, reward_run):
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench" / "bench_rollout.py"),
                          "--threads", "1", "--rollouts", "1", "--episodes", "8", "--k", "2",
                          "--mini-batch-size", "4", "--epochs", "1", "--new-tokens", "4",
                          "--reward-model", str(reward_run), "--out", str(tmp_path / "b.jsonl")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]  # stdout: JSON lines only
    assert [r["method"] for r in rows] == ["ppo", "grpo", "rloo"]
    assert [r["prompts_per_rollout"] for r in rows] == [8, 4, 4]
    assert rows[0]["update_vs_ppo_per_episode"] == 1.0 and rows[1]["update_s_per_episode"] > 0
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 3
