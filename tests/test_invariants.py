"""The invariants peers were caught breaking, on every loss and both loops (what each catches is
in its docstring). The rollout loop's share (ratio exactly 1, micro-batches and 2 ranks equal one
process) is in tests/test_online_rl.py and tests/test_online_rl_distributed.py, PPO's in
tests/test_reward_ppo.py and tests/test_ppo_distributed.py.

    step 0 (policy == reference)   DPO / cDPO loss = ln 2, IPO 1/(4 beta^2), KTO 1/2, rewards
                                   exactly 0: plain, packing, prefix sharing, LoRA
    micro-batches                  k micro-batches of m = one batch of k*m, token-level (SFT
                                   token mean, CoH) and sequence-level (DPO family, KTO, SimPO,
                                   ORPO) losses: the same loss and the same update
    padding                        left, right, alone and packed give the same log-probs, for a
                                   RoPE model and an absolute-position (GPT-2) one
    reward model                   a score does not depend on the batch or the padding side
    reference cache                cached log-probs = online ones, plain / packed / prefix-shared
    EOS                            exactly one EOS per response, inside the loss mask; the no-EOS
                                   penalty reads the completion only
"""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from harness.data.packing import pack
from harness.data.tokens import pad, pad_with_mask
from harness.models import lora
from harness.models.generation import Sample, SamplingConfig, sample
from harness.models.modeling import (labelled_token_logps, load_model, load_tokenizer,
                                     packed_sequence_logps, sequence_logps)
from harness.models.reward_model import build_reward_model
from harness.objectives import needs_reference
from harness.objectives.coh import coh_settings, record_chains, tokenize_chain
from harness.objectives.kto import pair_with_foreign_completions, record_examples
from harness.rl.grpo import GroupRL
from harness.rl.online_dpo import OnlineDPO
from harness.rl.rollout import build_batch, policy_logprobs
from harness.training import reference_cache
from preference_datasets import make_example, tokenize_example
from train import check_config
from trainers import BasicTrainer

TINY = "assets/tiny_model"
TOK = load_tokenizer(TINY)
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


# ------------------------------------------------------------------ padding and packing
def gpt2():
    """A 2-layer GPT-2 (learned absolute position embeddings) on the tiny tokenizer, no download."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(TOK), n_positions=128, n_embd=64, n_layer=2,
                                      n_head=4, bos_token_id=EOS, eos_token_id=EOS,
                                      attn_implementation="sdpa")).eval()


def sequences():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(2, 700, (p,), generator=g).tolist(),
             torch.randint(2, 700, (r,), generator=g).tolist() + [EOS]) for p, r in
            [(5, 3), (9, 7), (2, 12), (14, 1)]]


@pytest.mark.parametrize("make", [lambda: load_model(TINY, "float32").eval(), gpt2],
                         ids=["llama-rope", "gpt2-absolute"])
def test_left_right_alone_and_packed_give_the_same_logprobs(make):
    """Catches position ids counted over padding (a left-padded row of an absolute-position model
    reads the wrong embeddings) and masks that leak across packed documents."""
    model, seqs = make(), sequences()
    ids, mask = pad_with_mask([p + r for p, r in seqs], PAD)
    labels = pad([[-100] * len(p) + r for p, r in seqs], -100)
    with torch.no_grad():
        right, rows = labelled_token_logps(model, ids, mask, labels)
        right = right.split(torch.bincount(rows).tolist())
        alone = [labelled_token_logps(model, torch.tensor([p + r]), torch.ones(1, len(p + r),
                 dtype=torch.long), torch.tensor([[-100] * len(p) + r]))[0] for p, r in seqs]
        rollout = build_batch([Sample("", "", tuple(p), tuple(r), True) for p, r in seqs], PAD,
                              "cpu")
        assert rollout.attention_mask[:, 0].tolist() == [0, 0, 0, 1]  # prompts left-padded
        left = policy_logprobs(model, rollout, 1.0)
        sums, _ = sequence_logps(model, ids, mask, labels)
        packed, _ = packed_sequence_logps(model, pack({"chosen_input_ids": ids,
                                                        "chosen_attention_mask": mask,
                                                        "chosen_labels": labels}, False,
                                                       row_tokens=256, pad_token_id=PAD))
    for i, (_, response) in enumerate(seqs):
        torch.testing.assert_close(alone[i], right[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(left[i, :len(response)], right[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, sums, atol=1e-5, rtol=1e-6)


def test_reward_model_score_ignores_batch_and_padding_side():
    """Catches a head read at the last column (padding) or a pooled mean over padding, and
    scores that move with the other rows of a batch."""
    torch.manual_seed(0)
    model, seqs = build_reward_model(TINY, "float32").eval(), sequences()
    full = [p + r for p, r in seqs]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in full])
        right = model(*pad_with_mask(full, PAD))
        left = model(*pad_with_mask(full, PAD, left=True))
        pairs = torch.cat([model(*pad_with_mask([full[i], full[3 - i]], PAD))[:1]
                           for i in range(4)])
    for got in (right, left, pairs):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ one EOS per response
def labelled(item: dict, side: str) -> list[int]:
    return [t for t in item[f"{side}_labels"] if t != -100]


def test_one_eos_per_response_inside_the_loss_mask(compose):
    """Catches a response trained without its EOS (the model never learns to stop), an EOS
    appended twice, and an EOS hidden from the loss because the pad id is the EOS id."""
    ex = make_example("\n\nHuman: hi\n\nAssistant:", " Fine.", " Bad.", "keep_start")
    item = tokenize_example(ex, TOK, 128, 64)
    for side in ("chosen", "rejected"):
        trained = labelled(item, side)
        assert trained.count(EOS) == 1 and trained[-1] == EOS
    record = {"responses": [" Fine.", " Bad."], "pairs": [(0, 1)], "sft_target": " Fine.",
              "truncation_mode": "keep_start"}
    other = {**record, "responses": [" Other.", " Worse."]}
    kto = pair_with_foreign_completions(record_examples("p", record) +
                                        record_examples("q", other), seed=0)
    for kto_ex in kto:  # the completion and the foreign completion
        item = tokenize_example(kto_ex, TOK, 128, 64)
        assert all(labelled(item, s).count(EOS) == 1 for s in ("chosen", "rejected"))
    settings = coh_settings(compose("loss=coh"))
    chain = record_chains("\n\nHuman: hi\n\nAssistant:", record, settings)[0]
    trained = labelled(tokenize_chain(chain, TOK, 128, 64), "chosen")
    assert trained.count(EOS) == 2 and trained[-1] == EOS  # one per answer of the chain


def test_rollout_masks_one_eos_and_the_penalty_reads_completions_only(tiny):
    """A prompt holding the EOS token must not make a cut-off response 'finished' (a peer bug:
    the no-EOS penalty looked for EOS anywhere in the sequence)."""
    model, _ = tiny
    prompt = "\n\nHuman: say<|endoftext|> it\n\nAssistant:"
    assert EOS in TOK(prompt, add_special_tokens=False)["input_ids"]
    # render=False: the text as it is (rendering refuses a prompt holding EOS, as training does)
    cut = sample(model, TOK, [prompt], SamplingConfig(max_new_tokens=3, min_new_tokens=3,
                                                      seed=0), progress=False, render=False)[0]
    for seed in range(20):  # a response that stops by itself
        done = sample(model, TOK, ["\n\nHuman: hi\n\nAssistant:"], SamplingConfig(
            max_new_tokens=40, seed=seed), progress=False)[0]
        if done.finished:
            break
    assert not cut.finished and done.finished
    batch = build_batch([cut, done], PAD, "cpu")
    response = batch.input_ids[:, batch.prompt_width:]
    assert ((response == EOS) * batch.mask).sum(-1).tolist() == [0, 1]
    last = batch.mask.sum(-1).long() - 1
    assert response[1, last[1]] == EOS and batch.mask[0].sum() == 3
    batch.scores = torch.tensor([0.5, 0.25])
    group = SimpleNamespace(opts=SimpleNamespace(no_eos_penalty=-1.0, beta=0.0,
                                                 drop_uniform_groups=False),
                            samples_per_prompt=2)
    rewards, usable = GroupRL.rewards(group, batch)
    assert rewards.tolist() == [[-1.0, 0.25]] and usable.tolist() == [True]
    pair = SimpleNamespace(opts=SimpleNamespace(no_eos_penalty=None))
    chosen, rejected, usable, ties, failed = OnlineDPO.labels(pair, batch)
    assert (chosen.item(), rejected.item(), usable.item()) == (0, 1, True)


# ------------------------------------------------------------------ the offline loop
def offline_trainer(compose, tmp_path, *overrides) -> BasicTrainer:
    """A BasicTrainer on the tiny model built as train.py builds one (20 toy prompts)."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg = compose(f"local_dirs=[{tmp_path}]", f"local_run_dir={run}", "wandb.enabled=false",
                  "sample_during_eval=false", "data_fraction=0.01", "n_eval_examples=16",
                  "eval_batch_size=8", "batch_size=8", *overrides)
    check_config(cfg, overrides=overrides)
    policy, reference = load_model(TINY, "float32"), None
    if lora.enabled(cfg.model):
        policy = lora.apply_lora(policy, cfg.model.lora)
        reference = policy if needs_reference(cfg.loss) else None
    elif needs_reference(cfg.loss):
        reference = load_model(TINY, "float32").eval()
    return BasicTrainer(policy, TOK, cfg, str(run), reference)


LORA = ["model.lora.r=4", "model.lora.alpha=8"]
STEP0 = [(["loss=dpo", "loss.beta=0.1"], math.log(2)),
         (["loss=dpo", "loss.beta=0.1", "loss.label_smoothing=0.2"], math.log(2)),
         (["loss=ipo", "loss.beta=0.5"], 1.0),
         (["loss=kto"], 0.5)]
# (levers, rewards exactly 0): a packed row holds several examples, and which ones depends on
# the batch, so a reference table scored in other batches differs from the policy's packed
# forward by float rounding (1e-8 nats here), as does KTO's reference (scored on pairs) from
# its policy forward (on one side); with the reference online in the same rows it is exact
LEVERS = {"plain": ([], True), "packed": (["packing=true"], False),
          "packed_online": (["packing=true", "precompute_reference=false"], True),
          "prefix": (["prefix_sharing=true"], True), "lora": (LORA, True),
          "packed_lora": (["packing=true", *LORA], False)}


@pytest.mark.slow
@pytest.mark.parametrize("loss, expected", STEP0, ids=["dpo", "cdpo", "ipo", "kto"])
@pytest.mark.parametrize("layout", LEVERS)
def test_step0_loss_and_zero_rewards(compose, tmp_path, loss, expected, layout):
    """Catches a reference that is not the policy at step 0 (dropout on in one of them, a
    different dtype, autocast on one side, LoRA adapters not disabled, a cached table computed
    through another collator), which shows as a first loss off ln 2 and non-zero rewards."""
    levers, exact = LEVERS[layout]
    if "loss=kto" in loss and "prefix_sharing=true" in levers:
        pytest.skip("prefix_sharing is refused for KTO (its completions share no prompt)")
    exact = exact and not ("loss=kto" in loss and "packing=true" in levers)
    trainer = offline_trainer(compose, tmp_path, *loss, *levers)
    trainer.prepare_reference()
    results = trainer.evaluate()
    assert results["loss/eval"] == pytest.approx(expected, abs=1e-6)
    for key in ("rewards_eval/chosen", "rewards_eval/rejected"):
        assert results[key] == 0.0 if exact else abs(results[key]) < 1e-6, (key, results[key])


ACCUMULATED = {"sft": ["loss=sft"], "sft_token_mean": ["loss=sft", "loss.token_mean=true"],
               "dpo": ["loss=dpo", "loss.beta=0.1"], "ipo": ["loss=ipo", "loss.beta=0.1"],
               "cdpo": ["loss=dpo", "loss.beta=0.1", "loss.label_smoothing=0.2"],
               "kto": ["loss=kto"], "simpo": ["loss=simpo"], "orpo": ["loss=orpo"],
               "coh": ["loss=coh"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ACCUMULATED)
def test_micro_batches_equal_one_batch(compose, tmp_path, name):
    """4 micro-batches of 2 = one batch of 8: the same logged loss and the same SGD update.
    Catches token means taken per micro-batch (the gradient-accumulation bug of HF Trainer's
    token-level losses; SFT token_mean and CoH here) and batch statistics estimated per
    micro-batch (KTO's KL reference point, which TRL takes per device batch)."""
    common = ["optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=1e9",
              *ACCUMULATED[name]]
    runs = {}
    for accum in (1, 4):
        trainer = offline_trainer(compose, tmp_path / str(accum), *common,
                                  f"gradient_accumulation_steps={accum}")
        if trainer.reference_model is not None:  # a reference worse than the policy: KTO's
            torch.manual_seed(0)                 # KL estimate z0 > 0 (at 0 it is clamped)
            with torch.no_grad():
                for p in trainer.reference_model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        trainer.prepare_reference()
        batch = next(trainer.train_batches.epoch_batches(0))
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        metrics = trainer.train_step(batch)
        runs[accum] = metrics, {k: v - before[k] for k, v in trainer.policy.state_dict().items()}
    (m1, d1), (m4, d4) = runs[1], runs[4]
    for key in m1:
        if key.split("/")[0] in ("loss", "rewards_train", "logps_train", "kl_train"):
            assert m4[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    if name == "kto":
        assert m1["kl_train/reference_point"] > 0.01
    assert max(d.abs().max() for d in d1.values()) > 1e-4  # the step moved the weights
    for key, delta in d1.items():
        torch.testing.assert_close(d4[key], delta, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("loss", [["loss=dpo", "loss.beta=0.1"], ["loss=kto"]], ids=["dpo", "kto"])
@pytest.mark.parametrize("levers", [[], ["packing=true"], ["prefix_sharing=true"]],
                         ids=["padded", "packed", "prefix"])
def test_cached_reference_equals_online(compose, tmp_path, loss, levers):
    """The reference table (scored once, in eval-sized batches) equals the reference scored
    online in each training micro-batch, under every collator. Catches log-probs that depend on
    batch composition or padding width, and a cache computed through another collator."""
    if "prefix_sharing=true" in levers and "loss=kto" in loss:
        pytest.skip("prefix_sharing is refused for KTO")
    common = [*loss, *levers, "gradient_accumulation_steps=2"]
    cached = offline_trainer(compose, tmp_path / "cached", *common)
    cached.prepare_reference()
    online = offline_trainer(compose, tmp_path / "online", *common, "precompute_reference=false")
    compared = 0
    for batch in list(online.train_batches.epoch_batches(0))[:2]:
        for part, n in online.micro_batches(batch):
            want = reference_cache.lookup(cached.reference_table, part["uid"], "cpu")
            got = online.reference_forward(part)
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
            compared += n
    assert compared == 16
