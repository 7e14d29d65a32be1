"""The toy task (records, gold reward, registry) and the bundled tiny base model."""

from pathlib import Path

import pytest

from harness.data.gold import GOLD_REWARDS, get_gold_reward, register_gold_reward
from harness.data.toy_task import gold_reward, parse_request, pretraining_corpus, toy_records

TINY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny_model"


@pytest.fixture(scope="module")
def train():
    return toy_records("train")


@pytest.fixture(scope="module")
def test():
    return toy_records("test")


def test_records_are_deterministic(test):
    assert toy_records("test") == test
    assert toy_records("train", n_prompts=50) == toy_records("train", n_prompts=50)
    assert pretraining_corpus(20, seed=3) == pretraining_corpus(20, seed=3)


def test_default_sizes_and_disjoint_splits(train, test):
    assert len(train) == 2000 and len(test) == 200
    assert not set(train) & set(test)
    assert not set(test) & {t.split("\n\nAssistant:")[0] + "\n\nAssistant:"
                            for t in pretraining_corpus(2000, seed=0)}


def test_canonical_format(train):
    for prompt, rec in train.items():
        assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:")
        assert set(rec) == {"responses", "pairs", "sft_target", "scores"}
        assert rec["scores"] == [gold_reward(prompt, r) for r in rec["responses"]]
        assert rec["pairs"], "every prompt has at least one preference"
        assert all(r.startswith(" ") and not r.startswith("  ") for r in rec["responses"])
        rewards = [gold_reward(prompt, r) for r in rec["responses"]]
        for win, lose in rec["pairs"]:
            assert 0 <= win < len(rec["responses"]) and 0 <= lose < len(rec["responses"])
            assert rewards[win] > rewards[lose]
        assert gold_reward(prompt, rec["sft_target"]) == max(rewards)


def test_sft_targets_beat_random_responses(train):
    sft = [gold_reward(p, r["sft_target"]) for p, r in train.items()]
    rand = [gold_reward(p, r["responses"][0]) for p, r in train.items()]
    assert abs(sum(rand) / len(rand)) < 0.05  # base distribution ignores the request
    assert sum(sft) / len(sft) > 0.15


def test_reward_is_graded_and_bounded(train):
    values = {gold_reward(p, x) for p, r in train.items() for x in r["responses"]}
    assert len(values) > 100
    assert all(-1.0 <= v <= 1.0 for v in values)


def test_reward_follows_request():
    pos = "\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:"
    neg = pos.replace("positive", "negative")
    assert parse_request(pos) == ("cafe", 1.0) and parse_request(neg) == ("cafe", -1.0)
    good = " The cafe was wonderful. I loved it."
    assert gold_reward(pos, good) == pytest.approx(1.0)
    assert gold_reward(neg, good) == pytest.approx(-0.6)
    assert gold_reward(pos, " The cafe was good.") < gold_reward(pos, good)
    assert gold_reward(pos, " The hotel was wonderful.") < gold_reward(pos, good)
    # a completion that runs on into a new turn is judged up to that turn
    assert gold_reward(pos, good + "\n\nHuman: say terrible things") == gold_reward(pos, good)


@pytest.mark.parametrize("completion", ["", " ", "\x00\xff garbage ###", "🙂" * 50,
                                        "Human: Assistant:", "terrible " * 1000])
def test_reward_is_robust_to_garbage(completion):
    reward = gold_reward("\n\nHuman: Tell Sam something negative about the park.\n\nAssistant:",
                         completion)
    assert isinstance(reward, float) and -1.0 <= reward <= 1.0
    assert gold_reward("not a toy prompt", completion) == 0.0  # no request, nothing to reward


def test_registry():
    assert get_gold_reward("toy") is gold_reward and "toy" in GOLD_REWARDS
    with pytest.raises(KeyError, match="toy"):
        get_gold_reward("no-such-reward")
    with pytest.raises(ValueError):
        register_gold_reward("toy")(lambda prompt, completion: 0.0)
    with pytest.raises(ValueError, match="train"):
        toy_records("validation")


def test_tiny_model_loads_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    enc = tok("\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:",
              return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.parametrize("text", [" The cafe", " The cafe was lovely. I hated it.",
                                  "\n\nHuman: Write a positive review of the cafe for Anna."
                                  "\n\nAssistant: The cafe was great.", "  two spaces \t é 🙂"])
def test_tokenizer_round_trip(text):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids  # no BOS/EOS added
    assert tok.decode(ids) == text
