"""CoH end to end on the bundled tiny model, the pretraining mix, and its data stream."""

import json

import pytest
import torch

from harness.models.modeling import load_tokenizer
from harness.data.pretraining_mix import PretrainStream, read_documents
from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow

COH = ["loss=coh", "n_examples=32", "lr=1e-3", "seed=5"]


def train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/train" in r]


def evals(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/eval" in r]


def weights(run_dir):
    return torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]


@pytest.fixture(scope="module")
def plain_coh(tmp_path_factory, train_run):
    return train_run(tmp_path_factory.mktemp("coh"), *COH, "sample_during_eval=true",
               "n_eval_model_samples=2")


def test_coh_end_to_end(plain_coh):
    first, last = evals(plain_coh)[0], evals(plain_coh)[-1]
    assert last["loss/eval"] < first["loss/eval"]  # two steps at lr 1e-3 already help
    rows = train_rows(plain_coh)
    assert [r["step"] for r in rows] == [16, 32]
    assert {"loss/chain_train", "logps_train/chosen", "grad_norm"} <= set(rows[0])
    assert "loss/pt_train" not in rows[0] and "fcm/drop_rate" not in rows[0]
    samples = [json.loads(x) for x in (plain_coh / "samples" / "step-32.jsonl").read_text()
               .splitlines()]
    assert len(samples) == 2 and all(isinstance(s["policy"], str) for s in samples)


def test_pretraining_weight_zero_equals_plain_coh(tmp_path, plain_coh, train_run):
    monitored = train_run(tmp_path / "w0", *COH, "loss.pt_data=toy", "loss.pt_loss_weight=0")
    for a, b in zip(train_rows(plain_coh), train_rows(monitored)):
        assert a["loss/train"] == b["loss/train"] and a["grad_norm"] == b["grad_norm"]
        assert b["loss/pt_train"] > 0  # the pretraining loss is still measured and logged
    assert evals(plain_coh)[-1]["loss/eval"] == evals(monitored)[-1]["loss/eval"]
    for key, value in weights(plain_coh).items():
        assert torch.equal(value, weights(monitored)[key]), key
    mixed = train_run(tmp_path / "w1", *COH, "loss.pt_data=toy", "loss.pt_loss_weight=1.0")
    a, b = train_rows(plain_coh)[0], train_rows(mixed)[0]
    assert b["loss/train"] == pytest.approx(b["loss/chain_train"] + b["loss/pt_train"], rel=1e-5)
    assert b["loss/chain_train"] == pytest.approx(a["loss/chain_train"], rel=1e-6)  # same data
    assert not torch.equal(weights(plain_coh)["model.norm.weight"],
                           weights(mixed)["model.norm.weight"])


def test_fcm_in_training_leaves_eval_untouched(tmp_path, plain_coh, train_run):
    fcm = train_run(tmp_path, *COH, "loss.fcm_min=0.1", "loss.fcm_max=0.2")
    assert evals(fcm)[0]["loss/eval"] == evals(plain_coh)[0]["loss/eval"]  # before any step
    row = train_rows(fcm)[0]
    assert 0.1 <= row["fcm/drop_rate"] <= 0.2
    assert row["loss/train"] != train_rows(plain_coh)[0]["loss/train"]


def test_unknown_phrase_set_fails_before_a_run_dir(tmp_path, train_run):
    with pytest.raises(ValueError, match="dialogue"):
        train_run(tmp_path, "loss=coh", "loss.feedback_set=dialog")
    assert not list(tmp_path.glob("toy_coh_*"))


# ---------------------------------------------------------------- the pretraining stream
def test_documents_from_files_and_toy(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert read_documents(str(txt)) == ["first doc", "second doc"]
    rows = tmp_path / "corpus.jsonl"
    rows.write_text('{"body": "a"}\n{"body": "b"}\n')
    assert read_documents(str(rows), text_field="body") == ["a", "b"]
    with pytest.raises(ValueError, match="pt_text_field"):
        read_documents(str(rows))
    with pytest.raises(FileNotFoundError, match="loss.pt_data"):
        read_documents(str(tmp_path / "missing.txt"))
    toy = read_documents("toy", seed=0, max_documents=5)
    assert len(toy) == 5 and all(d.startswith("\n\nHuman:") for d in toy)


def test_stream_is_unpacked_and_a_function_of_the_step():
    tok = load_tokenizer("assets/tiny_model")
    docs = read_documents("toy", seed=0, max_documents=50) + ["word " * 40]
    stream = PretrainStream(docs, tok, max_length=24, seed=3)
    for row in stream.rows:  # no window mixes two documents; EOS only ends one
        assert tok.eos_token_id not in row[:-1] and len(row) <= 24
    a = stream.next_batch(step=7, micro_batches=2, size=4)
    b = stream.next_batch(step=7, micro_batches=2, size=4)
    again = PretrainStream(docs, tok, max_length=24, seed=3)
    assert torch.equal(again.next_batch(7, 2, 4)["chosen_input_ids"], a["chosen_input_ids"])
    assert torch.equal(again.next_batch(7, 2, 4)["chosen_input_ids"], b["chosen_input_ids"])
    assert not torch.equal(a["chosen_input_ids"], b["chosen_input_ids"])
    assert (a["chosen_labels"] == -100).eq(a["chosen_attention_mask"] == 0).all()


def test_resume_is_exact_with_fcm_and_pretraining_mix(tmp_path, train_run):
    """The FCM draws (global RNG, checkpointed) and the pretraining batches (a function of the
    step and micro-batch) repeat exactly after a resume."""
    mix = [*COH, "loss.fcm_max=0.3", "loss.pt_data=toy", "loss.pt_loss_weight=0.5",
           "gradient_accumulation_steps=2", "save_every=32"]
    full = train_run(tmp_path / "full", *mix, "n_examples=64")
    half = train_run(tmp_path / "half", *mix, "n_examples=32")
    train_run(tmp_path / "half", *mix, f"resume={half}", "n_examples=64")
    expected, got = train_rows(full), train_rows(half)
    assert [r["step"] for r in got] == [16, 32, 48, 64]
    for e, g in zip(expected, got):
        for key in ("loss/train", "loss/pt_train", "fcm/drop_rate", "grad_norm"):
            assert g[key] == pytest.approx(e[key], rel=1e-6), (e["step"], key)


def test_evaluate_prompts_a_coh_model_with_its_positive_phrase(plain_coh):
    from harness.evaluation.gold_eval import EvalConfig, evaluate, format_line, policy_prompt_suffix
    from harness.models.generation import SamplingConfig
    ckpt = str(plain_coh / "LATEST" / "policy.pt")
    assert policy_prompt_suffix(ckpt) == " A helpful answer:"
    assert policy_prompt_suffix(ckpt, "none") == "" and policy_prompt_suffix(ckpt, " X:") == " X:"
    assert policy_prompt_suffix("assets/tiny_model") == ""  # an HF dir: no run config
    cfg = EvalConfig(n_prompts=4, sampling=SamplingConfig(max_new_tokens=16, batch_size=4))
    result = evaluate(ckpt, "assets/tiny_model", cfg)
    assert result["policy_prompt_suffix"] == " A helpful answer:"
    assert all(e["prompt"].endswith("Assistant:") for e in result["examples"])  # gold sees plain
    assert "' A helpful answer:'" in format_line(result)
    plain = evaluate(ckpt, "assets/tiny_model", EvalConfig(
        n_prompts=4, policy_prompt_suffix="none", sampling=cfg.sampling))
    assert plain["policy_prompt_suffix"] == "" and plain["kl"] != result["kl"]
    # the phrase tokenizes the same appended to the prompt as on its own (as in training)
    tok = load_tokenizer("assets/tiny_model")
    for e in result["examples"]:
        ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert ids(e["prompt"] + " A helpful answer:") == ids(e["prompt"]) + ids(" A helpful answer:")
