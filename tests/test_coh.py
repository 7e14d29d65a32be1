"""CoH chains: exact token-level masks per chain order, prompt-first truncation, phrase sets,
bad input, and chains from every registered dataset."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.objectives.coh import (CHAIN_ORDERS, coh_settings, fit_blocks, record_chains,
                                    tokenize_chain)
from harness.objectives.coh_phrases import parse_template
from harness.models.modeling import load_tokenizer
from preference_datasets import BatchIterator, get_dataset, load_examples
from train import check_config

FIX = Path(__file__).parent / "fixtures"
EOS = "<eos>"

COH = "loss=coh"


class WordTokenizer:
    """One token per whitespace-led word (' b2' is one token), so expected ids are written out."""
    eos_token_id = pad_token_id = 0

    def __init__(self):
        self.vocab = {EOS: 0}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab))
                              for w in re.findall(r"\s*\S+", text)]}

    def words(self, ids):
        inverse = {i: w for w, i in self.vocab.items()}
        return [inverse[i] for i in ids]


# one wording pair and one comparison template, so every order is deterministic
SMALL_SET = ["+loss.feedback_sets.t={pairs:[{positive:' Good:{answer}',negative:' Bad:{answer}'}],"
             "comparison:[' Worse:{worse} Better:{better}']}", "loss.feedback_set=t"]


def only(order):
    return [f"loss.chain_weights.{o}={1.0 if o == order else 0.0}" for o in CHAIN_ORDERS]


RECORD = {"responses": [" a1", " b2"], "pairs": [(1, 0)], "sft_target": " s3",
          "truncation_mode": "keep_start"}
PROMPT = "Q: x"


@pytest.mark.parametrize("overrides, record, tokens, mask", [
    (only("positive"), RECORD, ["Q:", " x", " Good:", " b2", EOS], [0, 0, 0, 1, 1]),
    (only("negative"), RECORD, ["Q:", " x", " Bad:", " a1", EOS], [0, 0, 0, 1, 1]),
    (only("positive_negative"), RECORD, ["Q:", " x", " Good:", " b2", EOS, " Bad:", " a1", EOS],
     [0, 0, 0, 1, 1, 0, 1, 1]),
    (only("negative_positive"), RECORD, ["Q:", " x", " Bad:", " a1", EOS, " Good:", " b2", EOS],
     [0, 0, 0, 1, 1, 0, 1, 1]),
    (only("comparison"), RECORD, ["Q:", " x", " Worse:", " a1", EOS, " Better:", " b2", EOS],
     [0, 0, 0, 1, 1, 0, 1, 1]),
    (["loss.sft_mode=true"], RECORD, ["Q:", " x", " Good:", " s3", EOS], [0, 0, 0, 1, 1]),
    # a record with no pair (SFT-only data) is a positive-only chain on its SFT target
    ([], {**RECORD, "responses": [" s3"], "pairs": []}, ["Q:", " x", " Good:", " s3", EOS],
     [0, 0, 0, 1, 1]),
])
def test_exact_masks_for_each_chain_order(overrides, record, tokens, mask, compose):
    tok = WordTokenizer()
    (chain,) = record_chains(PROMPT, record, coh_settings(compose(COH, *SMALL_SET, *overrides)))
    out = tokenize_chain(chain, tok, max_length=64, max_prompt_length=32)
    assert tok.words(out["chosen_input_ids"]) == tokens
    assert [int(label != -100) for label in out["chosen_labels"]] == mask
    trained = [i for i, label in zip(out["chosen_input_ids"], out["chosen_labels"]) if label != -100]
    assert [label for label in out["chosen_labels"] if label != -100] == trained
    # sampling continues from the prompt plus the positive phrase
    assert tok.words(out["prompt_input_ids"]) == ["Q:", " x", " Good:"]


def test_multi_turn_history_is_context_only(compose):
    tok = WordTokenizer()
    prompt = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: more?\n\nAssistant:"
    (chain,) = record_chains(prompt, RECORD, coh_settings(compose(COH, *SMALL_SET,
                                                                   *only("positive_negative"))))
    out = tokenize_chain(chain, tok, 64, 32)
    trained = [i for i, label in zip(out["chosen_input_ids"], out["chosen_labels"]) if label != -100]
    assert tok.words(trained) == [" b2", EOS, " a1", EOS]  # neither earlier turn is trained


def test_order_and_wording_are_seeded_per_example(compose):
    record = {"responses": [f" r{i}" for i in range(40)], "pairs": [(i, i + 1) for i in range(39)],
              "sft_target": " r0", "truncation_mode": "keep_start"}
    orders = lambda seed: [c.order for c in record_chains(  # noqa: E731
        PROMPT, record, coh_settings(compose(COH, f"seed={seed}")))]
    assert orders(0) == orders(0) and orders(0) != orders(1)
    assert set(orders(0)) == {"positive_negative", "negative_positive"}
    phrases = {c.blocks[0][0] for c in record_chains(PROMPT, record, coh_settings(compose(COH)))}
    assert len(phrases) > 2  # several wordings of the dialogue set are drawn


# ---------------------------------------------------------------- truncation
def test_truncation_cuts_the_prompt_first(compose):
    tok = WordTokenizer()
    record = {**RECORD, "truncation_mode": "keep_end"}
    prompt = " ".join(f"p{i}" for i in range(10))
    (chain,) = record_chains(prompt, record, coh_settings(compose(COH, *SMALL_SET,
                                                                   *only("positive_negative"))))
    out = tokenize_chain(chain, tok, max_length=10, max_prompt_length=4)
    # keep_end keeps the last 4 prompt tokens; both phrase + answer blocks survive whole
    assert tok.words(out["chosen_input_ids"]) == [" p6", " p7", " p8", " p9", " Good:", " b2",
                                                  EOS, " Bad:", " a1", EOS]


def test_truncation_keeps_each_phrase_with_its_answer(compose):
    tok = WordTokenizer()
    record = {"responses": [" " + " ".join(f"w{i}" for i in range(8)),
                            " " + " ".join(f"b{i}" for i in range(3))],
              "pairs": [(1, 0)], "sft_target": None, "truncation_mode": "keep_start"}
    (chain,) = record_chains("Q: x y z", record, coh_settings(compose(COH, 
        *SMALL_SET, *only("positive_negative"))))
    out = tokenize_chain(chain, tok, max_length=12, max_prompt_length=3)
    words = tok.words(out["chosen_input_ids"])
    # prompt cut to 3, then the longer (worse) answer is cut; the short one keeps its EOS
    assert words == ["Q:", " x", " y", " Good:", " b0", " b1", " b2", EOS, " Bad:", " w0", " w1",
                     " w2"]
    assert len(words) == 12
    # when even phrase + one answer token cannot fit, the block goes whole, never its answer alone
    out = tokenize_chain(chain, tok, max_length=5, max_prompt_length=2)
    assert tok.words(out["chosen_input_ids"]) == ["Q:", " x", " Good:", " b0", " b1"]


def test_fit_blocks_cuts_longest_answers_first():
    blocks = [([1], [2] * 10), ([3], [4] * 2), ([5], [6] * 6)]
    fitted = fit_blocks(blocks, budget=3 + 10, uid="u")
    assert [len(a) for _, a in fitted] == [4, 2, 4] and all(p for p, _ in fitted)
    with pytest.raises(ValueError, match="raise max_length"):
        fit_blocks(blocks, budget=1, uid="u")


# ---------------------------------------------------------------- phrase sets and bad input
def test_every_shipped_set_parses_with_every_order(compose):
    for name in compose(COH).loss.feedback_sets:
        cfg = compose(COH, f"loss.feedback_set={name}", "loss.chain_weights.comparison=1",
                       "loss.chain_weights.positive=1", "loss.chain_weights.negative=1")
        settings = coh_settings(cfg)
        assert settings.pairs and settings.comparisons and settings.inference_phrase.strip()


@pytest.mark.parametrize("overrides, error, message", [
    (["loss.feedback_set=nope"], ValueError, r"'nope'.*\['dialogue', 'helpful', 'qa', 'summary'\]"),
    (["+loss.feedback_sets.x={pairs:[{positive:' Good:',negative:' Bad:{answer}'}]}",
      "loss.feedback_set=x"], ValueError, r"loss.feedback_sets.x.pairs\[0\].positive.*no answer slot"),
    (["+loss.feedback_sets.x={pairs:[{positive:' Good:{answer} ok',negative:' Bad:{answer}'}]}",
      "loss.feedback_set=x"], ValueError, "text after its last slot"),
    (["+loss.feedback_sets.x={pairs:[{positive:' G:{answer}',negative:' B:{answer}'}]}",
      "loss.feedback_set=x", "loss.chain_weights.comparison=1"], ValueError, "no 'comparison'"),
    (["+loss.feedback_sets.x={comparison:[' W:{worse} B:{better}']}", "loss.feedback_set=x"],
     ValueError, "'pairs'"),
    (["loss.feedback_sets.dialogue.comparison=[' B:{better}']"], ValueError, r"comparison\[0\].*{worse}"),
    (only("nothing"), ValueError, "all 0"),
    (["+loss.chain_weights.sideways=1"], ValueError, "loss.chain_weights.sideways"),
    (["loss.fcm_max=1.5"], ValueError, "fcm_max"),
    (["loss.pt_loss_weight=0.1"], ValueError, "loss.pt_data"),
    (["loss.pt_data=/no/such/corpus.txt"], FileNotFoundError, "loss.pt_data"),
    (["+loss.typo=1"], ValueError, "loss.typo"),
])
def test_bad_coh_config_is_named_before_loading(overrides, error, message, compose):
    with pytest.raises(error, match=message):
        check_config(compose(COH, *overrides))


def test_user_set_from_a_yaml_file(tmp_path, compose):
    path = tmp_path / "sets.yaml"
    path.write_text("review:\n  pairs:\n    - {positive: ' A fitting review:{answer}', "
                    "negative: ' A misfit review:{answer}'}\n")
    settings = coh_settings(compose(COH, f"loss.feedback_sets_file={path}", "loss.feedback_set=review"))
    assert settings.inference_phrase == " A fitting review:"
    (tmp_path / "bad.yaml").write_text("review: [unclosed")
    with pytest.raises(ValueError, match="feedback_sets_file"):
        coh_settings(compose(COH, f"loss.feedback_sets_file={tmp_path}/bad.yaml"))


def test_parse_template_slots():
    assert parse_template(" A:{better} B:{worse}", ("better", "worse"), "k") == (
        (" A:", "better"), (" B:", "worse"))
    with pytest.raises(ValueError, match="k = .*repeated"):
        parse_template(" A:{answer} B:{answer}", ("answer",), "k")


# ---------------------------------------------------------------- every registered dataset
@pytest.mark.parametrize("spec", [f"hh:{FIX}/hh", f"shp:{FIX}/shp", f"se:{FIX}/se",
                                  f"sharegpt:{FIX}/sharegpt.json", f"prefs:{FIX}/annotations.json",
                                  f"json:{FIX}/pairs.jsonl", f"json:{FIX}/canonical.json", "toy"])
def test_chains_from_every_dataset(spec, compose):
    tokenizer = load_tokenizer("assets/tiny_model")
    fmt_settings = coh_settings(compose(COH))
    data = get_dataset(spec, "train", silent=True)
    chains = [c for p, r in data.items() for c in record_chains(p, r, fmt_settings)]
    n_pairs = sum(max(1, len(r["pairs"])) for r in data.values())
    assert len(chains) == n_pairs
    if not any(r["pairs"] for r in data.values()):  # sharegpt: SFT data -> positive-only chains
        assert {c.order for c in chains} == {"positive (no pair)"}
    for chain in chains[:20]:
        out = tokenize_chain(chain, tokenizer, max_length=2048, max_prompt_length=1024)
        trained = [i for i, label in zip(out["chosen_input_ids"], out["chosen_labels"])
                   if label != -100]
        expected = "".join(answer + tokenizer.eos_token for _, answer in chain.blocks)
        assert tokenizer.decode(trained) == expected


def test_chains_batch_through_the_standard_iterator(compose):
    settings = coh_settings(compose(COH))
    examples = load_examples(["toy"], "test", sft_mode=False,
                             record_examples=lambda p, r: record_chains(p, r, settings))
    tokenizer = load_tokenizer("assets/tiny_model")
    batch = next(BatchIterator(examples, tokenizer, batch_size=4, shuffle=False, seed=0,
                               max_length=128, max_prompt_length=64,
                               tokenize=tokenize_chain).epoch_batches(0))
    assert batch["chosen_input_ids"].shape == batch["chosen_labels"].shape
    phrase = tokenizer(" A helpful answer:", add_special_tokens=False)["input_ids"]
    assert batch["prompt_input_ids"][:, -len(phrase):].tolist() == [phrase] * 4
    assert OmegaConf.select(compose(COH), "loss.inference_phrase") is None


def test_sampling_prompt_suffix_is_the_positive_phrase(compose):
    from harness.objectives import sampling_prompt_suffix
    assert sampling_prompt_suffix(compose(COH)) == " A helpful answer:"
    assert sampling_prompt_suffix(compose(COH, "loss.feedback_set=qa")) == " A correct answer:"
    assert sampling_prompt_suffix(compose(COH, "loss.inference_phrase=' Best:'")) == " Best:"
    assert sampling_prompt_suffix(compose("loss=sft")) == ""
