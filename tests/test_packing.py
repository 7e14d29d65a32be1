"""Speed levers give the plain path's numbers: packing, prefix sharing, compile, fused optimizer."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.models.modeling import load_tokenizer, packed_sequence_logps, sequence_logps
from harness.parallel.parallelize import apply_compile
from harness.data.packing import CHOSEN, PROMPT, REJECTED, allowed, pack
from preference_datasets import BatchIterator, load_examples

TINY = str(Path(__file__).resolve().parent.parent / "assets" / "tiny_model")
PAD = 1


def hand_batch():
    """prompt [5, 6]; chosen [7, 8, 0]; rejected [9, 0] (0 = EOS), and a second pair."""
    return {
        "chosen_input_ids": torch.tensor([[5, 6, 7, 8, 0], [3, 4, 0, PAD, PAD]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "chosen_labels": torch.tensor([[-100, -100, 7, 8, 0], [-100, 4, 0, -100, -100]]),
        "rejected_input_ids": torch.tensor([[5, 6, 9, 0, PAD], [3, 2, 2, 0, PAD]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]),
        "rejected_labels": torch.tensor([[-100, -100, 9, 0, -100], [-100, 2, 2, 0, -100]]),
    }


def test_prefix_sharing_layout_by_hand():
    p = pack(hand_batch(), paired=True, prefix_sharing=True, row_tokens=0, pad_token_id=PAD)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 0, 9, 0], [3, 4, 0, 2, 2, 0, PAD]]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]  # rejected continues the prompt
    assert p.position_ids[1].tolist()[:6] == [0, 1, 2, 1, 2, 3]
    assert p.segment[0].tolist() == [PROMPT, PROMPT, CHOSEN, CHOSEN, CHOSEN, REJECTED, REJECTED]
    assert p.unit[1].tolist() == [0, 0, 0, 0, 0, 0, -1]
    # row 0: chosen 7, 8, 0 from positions 1, 2, 3; rejected 9 from the LAST PROMPT token (1)
    T = 7
    assert p.source.tolist()[:5] == [1, 2, 3, 1, 5]
    assert p.target.tolist()[:5] == [7, 8, 0, 9, 0]
    assert p.sequence.tolist() == [0, 0, 0, 2, 2] + [1, 1, 3, 3, 3]  # rejected i -> B + i
    assert p.source.tolist()[5:] == [T + 0, T + 1, T + 0, T + 3, T + 4]
    assert p.n_sequences == 4 and p.real_tokens == 13


def test_mask_isolates_responses_and_units():
    p = pack(hand_batch(), paired=True, prefix_sharing=True, row_tokens=64, pad_token_id=PAD)
    assert p.input_ids.shape == (1, 13)  # both units in one row
    ok = allowed(p.unit, p.segment)[0]
    rejected_9 = 5
    assert ok[rejected_9].tolist()[:6] == [True, True, False, False, False, True]  # no chosen
    assert not ok[7, :7].any()  # unit 1's first token sees nothing of unit 0
    assert ok[7, 7] and not ok[2, 3]  # itself; causal
    assert (ok.sum(-1) >= 1).all()  # no empty attention row (NaN in sdpa)


@pytest.fixture(scope="module")
def toy_pairs():
    tok = load_tokenizer(TINY)
    examples = load_examples(["toy"], "test", sft_mode=False)[:6]
    it = BatchIterator(examples, tok, batch_size=6, shuffle=False, seed=0, max_length=128,
                       max_prompt_length=64)
    return next(it.epoch_batches(0))


def padded_logps(model, b):
    length = max(b["chosen_input_ids"].shape[1], b["rejected_input_ids"].shape[1])
    cat = lambda k, v: torch.cat([torch.nn.functional.pad(b[f"{s}_{k}"], (0, length - b[f"{s}_{k}"].shape[1]), value=v)  # noqa: E501,E731
                                  for s in ("chosen", "rejected")])
    return sequence_logps(model, cat("input_ids", PAD), cat("attention_mask", 0), cat("labels", -100))


def logps_and_grads(model, fn):
    model.zero_grad()
    logps, n = fn()
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # distinct weight per sequence
    return logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prefix_sharing, row_tokens", [(False, 0), (False, 96), (True, 0),
                                                        (True, 400)])
def test_packed_logps_and_grads_equal_padded(toy_pairs, attn, prefix_sharing, row_tokens):
    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation=attn)
    ref, n_ref, g_ref = logps_and_grads(model, lambda: padded_logps(model, toy_pairs))
    packed = pack(toy_pairs, True, prefix_sharing, row_tokens, PAD)
    assert packed.input_ids.numel() < 2 * toy_pairs["chosen_input_ids"].numel() or not row_tokens
    got, n, g = logps_and_grads(model, lambda: packed_sequence_logps(model, packed))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert torch.equal(n, n_ref)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=5e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_sft_packing_and_flex_attention_mask(toy_pairs):
    sft = {k: v for k, v in toy_pairs.items() if k.startswith("chosen")}
    with torch.no_grad():
        sdpa = AutoModelForCausalLM.from_pretrained(TINY)
        ref, _ = sequence_logps(sdpa, sft["chosen_input_ids"], sft["chosen_attention_mask"],
                                sft["chosen_labels"])
        packed = pack(sft, False, False, 256, PAD)
        assert packed.input_ids.shape[0] == 1
        torch.testing.assert_close(packed_sequence_logps(sdpa, packed)[0], ref, atol=2e-5, rtol=0)
        # the BlockMask form (GPU training path; CPU flex_attention has no backward)
        flex = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="flex_attention")
        shared = pack(toy_pairs, True, True, 400, PAD)
        torch.testing.assert_close(packed_sequence_logps(flex, shared)[0],
                                   packed_sequence_logps(sdpa, shared)[0], atol=2e-5, rtol=0)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_logps_and_grads(toy_pairs):
    model = AutoModelForCausalLM.from_pretrained(TINY)
    packed = pack(toy_pairs, True, True, 0, PAD)
    ref, _, g_ref = logps_and_grads(model, lambda: packed_sequence_logps(model, packed))
    apply_compile(model, "LlamaDecoderLayer")
    assert list(dict(model.named_parameters())) == list(g_ref)  # names unchanged
    got, _, g = logps_and_grads(model, lambda: packed_sequence_logps(model, packed))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=5e-5, rtol=1e-4, msg=k)


def test_fused_optimizer_matches_foreach():
    from omegaconf import OmegaConf
    from harness.training.setup import make_optimizer
    torch.manual_seed(0)
    params = {flag: [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
              for flag in (False, True)}
    for p_fused, p_plain in zip(params[True], params[False]):
        p_fused.data.copy_(p_plain.data)
    opts = {flag: make_optimizer(params[flag], OmegaConf.create(
        {"optimizer": "AdamW", "lr": 0.1, "fused_optimizer": flag})) for flag in (False, True)}
    assert opts[True].defaults["fused"] and not opts[False].defaults["fused"]
    for _ in range(3):
        for flag, opt in opts.items():
            loss = sum((p ** 2).sum() for p in params[flag])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not params[True][0].equal(torch.zeros(4, 3))


@pytest.mark.slow
def test_dpo_run_with_levers_matches_plain_run(tmp_path, monkeypatch, train_run):
    """Same data, same steps: the eval and train metrics of a packed, prefix-shared DPO run, and
    of one split into micro-batches by a token budget, equal the plain run's (losses, rewards,
    log-probs), step for step."""
    import trainers
    from harness.training.run_logging import read_metrics
    splits = []
    split = trainers.split_by_tokens
    monkeypatch.setattr(trainers, "split_by_tokens",
                        lambda *a: splits.append(split(*a)) or splits[-1])
    common = ["loss=dpo", "loss.beta=0.1", "n_examples=48", "eval_every=32", "lr=1e-2",
              "minimum_log_interval_secs=0"]
    rows = {}
    for name, levers in {"plain": [], "fast": ["packing=true", "prefix_sharing=true",
                                               "fused_optimizer=true", "pack_length=300"],
                         "budget": ["micro_batch_tokens=200"]}.items():
        run_dir = train_run(tmp_path / name, *common, *levers)
        rows[name] = read_metrics(run_dir / "metrics.jsonl")
    # the budget split some batches (4 pairs each) and kept others whole
    # three batches of 16 pairs, split where lengths say: 2 long pairs or 3 shorter ones per
    # micro-batch (2 sequences x 3 x 33 tokens fit 200), every pair exactly once
    sizes = [[len(mb["uid"]) for mb in s] for s in splits]
    assert len(sizes) == 3 and all(sum(s) == 16 and {2, 3} <= set(s) for s in sizes), sizes
    assert all(len({u for mb in s for u in mb["uid"]}) == 16 for s in splits)
    for name in ("fast", "budget"):
        assert_same_metrics(rows["plain"], rows[name])
    assert rows["plain"][-1]["loss/eval"] != pytest.approx(0.6931, abs=1e-3)


def assert_same_metrics(plain_rows, other_rows):
    assert [r["step"] for r in plain_rows] == [r["step"] for r in other_rows]
    compared = 0
    for plain, other in zip(plain_rows, other_rows):
        for key, value in plain.items():
            if key.endswith("accuracies") and abs(plain[key.replace("accuracies",
                                                                    "margins")]) < 1e-4:
                continue  # policy == reference: rewards are +-1e-7 float noise, signs arbitrary
            if key.split("/")[0] in ("loss", "rewards_train", "rewards_eval", "logps_train",
                                     "logps_eval"):
                assert other[key] == pytest.approx(value, abs=2e-4, rel=1e-4), (plain["step"], key)
                compared += 1
    assert compared > 20


def test_split_by_tokens_by_hand():
    """Pairs of padded lengths (chosen, rejected) = (5, 4), (3, 4), (2, 2): longest first, two
    sequences per pair, so a micro-batch of n pairs of longest length L costs 2 * n * L."""
    from preference_datasets import split_by_tokens
    third = {"input_ids": [2, 0, PAD, PAD, PAD], "attention_mask": [1, 1, 0, 0, 0],
             "labels": [-100, 0, -100, -100, -100]}  # prompt [2], response [0] on both sides
    batch = {k: torch.cat([v, torch.tensor([third[k.split("_", 1)[1]]])])
             for k, v in hand_batch().items()}
    batch["prompt_input_ids"] = torch.tensor([[5, 6], [PAD, 3], [PAD, 2]])
    batch["prompt_attention_mask"] = torch.tensor([[1, 1], [0, 1], [0, 1]])
    batch["uid"] = ["a", "b", "c"]
    # budget 16: a alone (a + b = 2 * 2 * 5 = 20); b + c = 2 * 2 * 4 = 16 fits
    first, second = split_by_tokens(batch, 16)
    assert first["uid"] == ["a"] and second["uid"] == ["b", "c"]
    assert first["chosen_input_ids"].tolist() == [[5, 6, 7, 8, 0]]
    assert first["rejected_input_ids"].tolist() == [[5, 6, 9, 0]]  # its padding column cut
    assert second["chosen_input_ids"].tolist() == [[3, 4, 0], [2, 0, PAD]]
    assert second["chosen_labels"].tolist() == [[-100, 4, 0], [-100, 0, -100]]
    assert second["rejected_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert second["prompt_input_ids"].tolist() == [[3], [2]]  # left padding cut
    assert first["prompt_input_ids"].tolist() == [[5, 6]]
    # two ranks share each micro-batch: a + b = 2 * 1 * 5 = 10 fits; + c = 2 * 2 * 5 = 20 not
    assert [mb["uid"] for mb in split_by_tokens(batch, 16, ranks=2)] == [["a", "b"], ["c"]]
    # a budget below the longest pair still runs every pair, one per micro-batch
    assert [mb["uid"] for mb in split_by_tokens(batch, 1)] == [["a"], ["b"], ["c"]]
    assert [mb["uid"] for mb in split_by_tokens(batch, 10**6)] == [["a", "b", "c"]]


def test_bf16_autocast_keeps_fp32_master_weights_and_stays_close(toy_pairs):
    """amp_dtype=bfloat16: the forward runs in bf16 (so log-probs move by bf16 rounding, not more),
    parameters and their gradients stay float32."""
    model = AutoModelForCausalLM.from_pretrained(TINY)
    ref, _, g_ref = logps_and_grads(model, lambda: padded_logps(model, toy_pairs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, g = logps_and_grads(model, lambda: padded_logps(model, toy_pairs))
    assert not torch.equal(got, ref)  # autocast really changed the arithmetic
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.5)  # sums over ~40 tokens each
    assert all(p.dtype == torch.float32 and g[k].dtype == torch.float32
               for k, p in model.named_parameters())
    cos = torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in g.values()]),
                                                torch.cat([v.flatten() for v in g_ref.values()]), 0)
    assert cos > 0.99


@pytest.mark.slow
def test_amp_run_end_to_end(tmp_path, train_run, compose):
    from harness.training.run_logging import read_metrics
    from train import check_config
    with pytest.raises(ValueError, match="amp_dtype='fp8'"):
        check_config(compose("amp_dtype=fp8"))
    run_dir = train_run(tmp_path, "amp_dtype=bfloat16", "packing=true", "n_examples=32")
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["loss/eval"] for r in rows if "loss/eval" in r]
    assert len(evals) == 2 and all(0 < v < 100 for v in evals)
    state = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert all(v.dtype == torch.float32 for v in state.values())  # master weights stay fp32


@pytest.mark.slow
def test_coh_chains_pack_exactly_and_fcm_refuses_packing(tmp_path, train_run):
    """CoH chains alternate trained answers with untrained feedback phrases: packed, their
    metrics equal the padded run's; FCM's own 4-D mask cannot be packed, and says so."""
    from harness.training.run_logging import read_metrics
    common = ["loss=coh", "n_examples=32", "eval_every=16", "minimum_log_interval_secs=0"]
    rows = {name: read_metrics(train_run(tmp_path / name, *common, *extra) / "metrics.jsonl")
            for name, extra in {"plain": [], "packed": ["packing=true"]}.items()}
    keys = [k for k in rows["plain"][-1] if k.startswith(("loss/", "logps_"))]
    assert keys and len(rows["plain"]) == len(rows["packed"])
    for plain, packed in zip(rows["plain"], rows["packed"]):
        for key in keys:
            if key in plain:
                assert packed[key] == pytest.approx(plain[key], abs=2e-4, rel=1e-4), key
    with pytest.raises(ValueError, match="loss.fcm_max=0"):
        train_run(tmp_path / "fcm", *common, "packing=true", "loss.fcm_max=0.15")
