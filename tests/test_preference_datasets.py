"""Loaders on raw-schema fixtures (tests/fixtures), flattening, tokenisation and batching.

Expected records are worked out by hand from the fixture files."""
import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from harness.data.sources import in_test_split
from preference_datasets import (BatchIterator, collate, get_dataset, load_examples, make_example,
                                 tokenize_example)

FIX = Path(__file__).parent / "fixtures"
P = "\n\nHuman: {}\n\nAssistant:".format
PHOTO = " Plants use sunlight to make food from air and water."


@pytest.fixture
def load(tmp_path):
    """get_dataset with a throwaway datasets cache."""
    def _load(spec, split="train", **kw):
        return get_dataset(spec, split, cache_dir=str(tmp_path / "cache"), silent=True, **kw)
    return _load


@pytest.fixture(scope="module")
def tok():
    """Word-level tokenizer: one token per whitespace-separated word, so counts are easy by hand."""
    words = ["<pad>", "</s>", "<unk>"] + "Human: Assistant: a b c d e f x y z w v".split()
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# ---------------------------------------------------------------- loaders

def test_hh(load):
    data = load(f"hh:{FIX}/hh")
    cat = data[P("What is a good name for a cat?")]
    assert cat["responses"] == [" How about Whiskers?", " Cats do not need names.",
                                " Luna is a popular choice.", " Dog."]
    assert cat["pairs"] == [(0, 1), (2, 3)]
    assert cat["sft_target"] == " Luna is a popular choice."  # the reference keeps the last row's
    assert cat["truncation_mode"] == "keep_end"
    bread = P("Can you help me bake bread?") + " Sure, what kind?" + P("Sourdough.")
    assert data[bread]["responses"] == [" You will need a starter.", " No."]
    assert list(load(f"hh:{FIX}/hh", "test")) == [P("How far away is the moon?")]


def test_shp_keeps_ratio_at_least_two(load, caplog):
    with caplog.at_level(logging.WARNING):
        data = load(f"shp:{FIX}/shp")
    assert list(data) == [P("Why is the sky blue?"), P("How do vaccines work?")]  # black hole: 12/9 < 2
    assert "score ratio < 2: 1" in caplog.text
    sky = data[P("Why is the sky blue?")]
    assert sky["responses"] == [" Rayleigh scattering of sunlight.", " It reflects the ocean.",
                                " It reflects the ocean.", " Air molecules scatter blue light more."]
    assert sky["pairs"] == [(0, 1), (3, 2)]  # labels 1 -> A wins, 0 -> B wins
    assert sky["sft_target"] == " Rayleigh scattering of sunlight."  # score 50
    assert data[P("How do vaccines work?")]["pairs"] == [(1, 0)]
    assert data[P("How do vaccines work?")]["sft_target"] == " They train the immune system."
    assert sky["truncation_mode"] == "keep_start"
    assert list(load(f"shp:{FIX}/shp", "test")) == [P("Why do stars twinkle?")]


def test_se_strips_html_and_splits_by_hash(load):
    train, test = load(f"se:{FIX}/se"), load(f"se:{FIX}/se", "test")
    assert list(test) == [P("How do I reverse a list in python?")]
    reverse = test[P("How do I reverse a list in python?")]
    assert reverse["responses"] == [" Slice it: xs[::-1]", " Write a loop."]
    git = train[P("How do I undo the last git commit?")]
    assert git["responses"] == [" Use git reset HEAD~1 to keep the changes.",
                                " Run:\n\n<code>git reset --soft HEAD~1\n</code>",
                                " Delete the repository & start again."]
    assert git["pairs"] == [(1, 0), (1, 2)]  # the 2-vs-2 tie gives no pair
    assert git["sft_target"] == git["responses"][1]
    amp = train[P("What does the & operator do in C?\n\nI saw it in a book.")]
    assert amp["pairs"] == [] and amp["sft_target"] == " It is bitwise AND, or address-of."


def test_sharegpt_turns(load, caplog):
    with caplog.at_level(logging.WARNING):
        one = load(f"sharegpt:{FIX}/sharegpt.json")
    assert list(one) == [P("Write a haiku about autumn."), P("What is the capital of Australia?")]
    assert one[P("Write a haiku about autumn.")] == {
        "responses": [" Leaves drift and settle."], "pairs": [], "sft_target": " Leaves drift and settle.",
        "truncation_mode": "keep_start"}
    assert "no human->assistant exchange: 1" in caplog.text and "special token strings: 1" in caplog.text
    two = load(f"sharegpt:{FIX}/sharegpt.json", num_turns=2)
    prompt = P("Write a haiku about autumn.") + " Leaves drift and settle." + P("Now one about winter.")
    assert two[prompt]["sft_target"] == " Snow hushes the town."
    assert two[prompt]["truncation_mode"] == "keep_end"
    assert list(load(f"sharegpt:{FIX}/sharegpt.json", "test")) == [P("How do I sort a dict by value?")]


def test_prefs_drops_and_counts_ties_and_nulls(load, caplog):
    with caplog.at_level(logging.WARNING):
        data = load(f"prefs:{FIX}/annotations.json")
    assert list(data) == [P("Suggest a name for a bakery."), P("Explain photosynthesis to a child.")]
    bakery = data[P("Suggest a name for a bakery.")]
    assert bakery["responses"] == [" Rise and Shine.", " Bakery.", " The Crusty Loaf."]
    assert bakery["pairs"] == [(0, 1), (2, 1)]
    assert bakery["sft_target"] == " Rise and Shine."
    photo = data[P("Explain photosynthesis to a child.")]
    assert photo["responses"][photo["pairs"][0][0]] == " Plants use sunlight to make food from air and water."
    assert "missing label: 1" in caplog.text and "tie: 2" in caplog.text
    assert list(load(f"prefs:{FIX}/annotations.json", "test")) == [P("What is a race condition?")]


def test_prefs_path_replaces_source_pairs(load):
    data = load("sharegpt", prefs_path=str(FIX / "annotations.json"))
    assert list(data) == [P("Suggest a name for a bakery."), P("Explain photosynthesis to a child.")]
    with pytest.raises(ValueError, match="prefs_path"):
        load_examples(["sharegpt", "hh"], "train", sft_mode=False, prefs_path=str(FIX / "annotations.json"))


def test_json_pairs_and_canonical(load):
    pairs = load(f"json:{FIX}/pairs.jsonl")
    prime = pairs[P("Name a prime number larger than 100.")]
    assert prime == {"responses": [" 101.", " 100.", " 103 is prime.", " 99."], "pairs": [(0, 1), (2, 3)],
                     "sft_target": " 101.", "truncation_mode": "keep_start"}
    assert load(f"jsonl:{FIX}/pairs.jsonl", "test")[P("How do I sort a dict by value?")]["responses"] == [
        " Use sorted().", " You cannot."]  # a space is prepended when missing
    canon = load(f"json:{FIX}/canonical.json")
    assert canon[P("Who wrote Pride and Prejudice?")]["pairs"] == [(0, 1), (2, 1)]
    assert canon[P("How many legs does a spider have?")]["sft_target"] == " Eight."  # chosen of first pair


def test_toy(load):
    pytest.importorskip("harness.data.toy_task")
    data = load("toy")
    assert data and all(r["truncation_mode"] in ("keep_start", "keep_end") for r in data.values())
    assert not set(data) & set(load("toy", "test"))


@pytest.mark.parametrize("spec", [f"se:{FIX}/se", f"sharegpt:{FIX}/sharegpt.json",
                                  f"prefs:{FIX}/annotations.json", f"json:{FIX}/pairs.jsonl"])
def test_train_test_disjoint(load, spec):
    assert not set(load(spec, "train")) & set(load(spec, "test"))


def test_hash_split_is_stable_and_about_five_percent():
    keys = [P(f"question {i}") for i in range(4000)]
    share = sum(map(in_test_split, keys)) / len(keys)
    assert 0.035 < share < 0.065
    assert [in_test_split(k) for k in keys[:50]] == [in_test_split(k) for k in keys[:50]]


# ---------------------------------------------------------------- bad input

def test_unknown_dataset_lists_names(load):
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*'hh'.*'shp'"):
        load("nope")


def test_malformed_jsonl_names_file_and_line(load, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl.*line 3"):
        load(f"json:{bad}")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "x",\n  "output_1": }\n]')
    with pytest.raises(ValueError, match=r"broken\.json.*line 3"):
        load(f"prefs:{broken}")


def test_missing_key_names_key_index_and_file(load, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl: record 1 is missing key 'rejected'"):
        load(f"json:{rows}")
    shp = tmp_path / "shp.jsonl"
    shp.write_text(json.dumps({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "score_A": 4}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 is missing key 'score_B'"):
        load(f"shp:{shp}")


def test_empty_after_filtering_names_dataset_split_and_reason(load, tmp_path):
    ties = tmp_path / "ties.json"
    ties.write_text(json.dumps([{"instruction": "Suggest a name for a bakery.", "output_1": "a",
                                 "output_2": "b", "preference": 1.5}]))
    with pytest.raises(ValueError, match=r"prefs:.*ties\.json' split 'train' is empty after .*ties"):
        load(f"prefs:{ties}")
    with pytest.raises(ValueError, match=r"'json:.*canonical\.json' split 'test' is empty after the hash"):
        load(f"json:{FIX}/canonical.json", "test")


def test_missing_path_and_bad_split(load):
    with pytest.raises(FileNotFoundError, match="no/such/file.json"):
        load("prefs:no/such/file.json")
    with pytest.raises(ValueError, match="no split 'dev'"):
        load(f"hh:{FIX}/hh", "dev")


# ---------------------------------------------------------------- examples

def test_load_examples_modes_and_order(tmp_path):
    specs = [f"json:{FIX}/pairs.jsonl", f"prefs:{FIX}/annotations.json"]
    pairs = load_examples(specs, "train", sft_mode=False, cache_dir=str(tmp_path), silent=True)
    assert [(e.chosen, e.rejected) for e in pairs] == [
        (" 101.", " 100."), (" 103 is prime.", " 99."), (" Rise and Shine.", " Bakery."),
        (" The Crusty Loaf.", " Bakery."), (PHOTO, " Plants eat light.")]
    sft = load_examples(specs, "train", sft_mode=True, silent=True)
    assert [(e.chosen, e.rejected) for e in sft] == [
        (" 101.", None), (" Rise and Shine.", None), (PHOTO, None)]
    assert len({e.uid for e in pairs}) == len(pairs)
    prime = P("Name a prime number larger than 100.")
    assert pairs[0].uid == make_example(prime, " 101.", " 100.", "keep_start").uid
    with pytest.raises(ValueError, match="no preference pairs"):
        load_examples([f"sharegpt:{FIX}/sharegpt.json"], "train", sft_mode=False, silent=True)


def test_data_fraction_is_seeded_subset_of_prompts(tmp_path):
    rows = [{"prompt": P(f"q{i}"), "chosen": "a", "rejected": "b"} for i in range(200)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = load_examples([f"json:{path}"], "train", sft_mode=True, silent=True)
    prompts = lambda **kw: [e.prompt for e in load_examples([f"json:{path}"], "train", sft_mode=True, **kw)]
    half0, again = prompts(data_fraction=0.5, seed=0), prompts(data_fraction=0.5, seed=0)
    half1 = prompts(data_fraction=0.5, seed=1)
    assert half0 == again and half0 != half1
    assert len(half0) == round(len(full) * 0.5) and set(half0) <= {e.prompt for e in full}
    assert half0 == [e.prompt for e in full if e.prompt in set(half0)]  # original order kept
    test = load_examples([f"json:{path}"], "test", sft_mode=True, data_fraction=0.5)
    assert len(test) == len(load_examples([f"json:{path}"], "test", sft_mode=True))  # train only
    with pytest.raises(ValueError, match="data_fraction"):
        prompts(data_fraction=0.0)


# ---------------------------------------------------------------- tokenize / collate / iterate

def ex(prompt, chosen, rejected=None, mode="keep_start"):
    return make_example(prompt, chosen, rejected, mode)


def test_tokenize_no_truncation(tok):
    out = tokenize_example(ex("a b c", "x y", "z"), tok, max_length=10, max_prompt_length=5)
    a, b, c, x, y, z, eos = (tok.convert_tokens_to_ids(t) for t in "a b c x y z </s>".split())
    assert out["prompt_input_ids"] == [a, b, c] and out["prompt_length"] == 3
    assert out["chosen_input_ids"] == [a, b, c, x, y, eos]
    assert out["chosen_labels"] == [-100, -100, -100, x, y, eos]
    assert out["rejected_input_ids"] == [a, b, c, z, eos]
    assert out["rejected_labels"] == [-100, -100, -100, z, eos]
    assert "rejected_input_ids" not in tokenize_example(ex("a b c", "x y"), tok, 10, 5)


@pytest.mark.parametrize("mode,kept", [("keep_start", "a b c"), ("keep_end", "d e f")])
def test_prompt_truncation_modes(tok, mode, kept):
    # prompt 6 + longer response 3 (x y eos) = 9 > 8 -> prompt cut to 3 tokens
    out = tokenize_example(ex("a b c d e f", "x y", "z", mode), tok, max_length=8, max_prompt_length=3)
    assert out["prompt_input_ids"] == tok(kept, add_special_tokens=False)["input_ids"]
    assert len(out["chosen_input_ids"]) == 6 and out["chosen_labels"][:3] == [-100] * 3


def test_response_truncation_and_overlong_input(tok):
    # prompt 6 -> 3; response 5 (x y w v eos) still too long: 3 + 5 > 6 -> cut to 6 - 3 = 3
    out = tokenize_example(ex("a b c d e f", "x y w v", "z"), tok, max_length=6, max_prompt_length=3)
    assert out["chosen_input_ids"] == tok("a b c x y w", add_special_tokens=False)["input_ids"]
    assert len(out["rejected_input_ids"]) == 5  # z eos fits, untouched
    huge = tokenize_example(ex("a " * 5000, "x " * 5000), tok, max_length=64, max_prompt_length=16)
    assert len(huge["chosen_input_ids"]) == 64


def test_tokenize_errors(tok):
    with pytest.raises(ValueError, match="truncation mode"):
        tokenize_example(ex("a", "b", mode="keep_middle"), tok, 8, 4)
    with pytest.raises(ValueError, match="EOS"):
        tokenize_example(ex("a", "b </s> c"), tok, 8, 4)


def test_collate_padding(tok):
    exs = [ex("a b c", "x", "y z"), ex("a", "x y z w", "v")]
    batch = collate([tokenize_example(e, tok, 32, 16) for e in exs], tok.pad_token_id, exs)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    ids = lambda s: tok.convert_tokens_to_ids(s.split())
    assert batch["prompt_input_ids"].tolist() == [ids("a b c"), [pad, pad] + ids("a")]  # left-padded
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["chosen_input_ids"].tolist() == [ids("a b c x") + [eos, pad], ids("a x y z w") + [eos]]
    assert batch["chosen_attention_mask"].tolist() == [[1] * 5 + [0], [1] * 6]
    assert batch["chosen_labels"].tolist() == [[-100] * 3 + ids("x") + [eos, -100],
                                               [-100] + ids("x y z w") + [eos]]
    assert batch["rejected_labels"].tolist() == [[-100] * 3 + ids("y z") + [eos],
                                                 [-100] + ids("v") + [eos, -100, -100, -100]]
    assert all(t.dtype == torch.long for k, t in batch.items() if isinstance(t, torch.Tensor))
    assert batch["prompt"] == ["a b c", "a"] and batch["rejected_response_only"] == ["y z", "v"]
    assert batch["chosen_response_only"] == ["x", "x y z w"] and batch["uid"] == [e.uid for e in exs]


def test_sft_batch_has_no_rejected(tok):
    exs = [ex("a", "x"), ex("b", "y z")]
    batch = next(BatchIterator(exs, tok, batch_size=2, shuffle=False, seed=0, max_length=8,
                               max_prompt_length=4).epoch_batches(0))
    assert not any(k.startswith("rejected") for k in batch)


def _iterator(tok, n=10, **kw):
    exs = [ex(f"a {'b ' * i}", "x", "y") for i in range(n)]
    args = dict(batch_size=3, shuffle=True, seed=0, max_length=32, max_prompt_length=16) | kw
    return BatchIterator(exs, tok, **args)


def _uids(it, epoch, start=0):
    return [u for b in it.epoch_batches(epoch, start) for u in b["uid"]]


def test_epoch_order_depends_on_seed_and_epoch(tok):
    it = _iterator(tok)
    e0, e1 = _uids(it, 0), _uids(it, 1)
    assert sorted(e0) == sorted(e1) == sorted(e.uid for e in it.examples) and e0 != e1
    assert e0 == _uids(_iterator(tok), 0) and e0 != _uids(_iterator(tok, seed=1), 0)
    assert _uids(_iterator(tok, shuffle=False), 0) == [e.uid for e in it.examples]


def test_resume_from_start_is_exact(tok):
    it = _iterator(tok)
    full = list(it.epoch_batches(2))
    resumed = list(it.epoch_batches(2, start=6))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert a["uid"] == b["uid"] and torch.equal(a["chosen_input_ids"], b["chosen_input_ids"])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        next(it.epoch_batches(0, start=4))


def test_partial_batch_kept_or_dropped(tok):
    keep, drop = _iterator(tok), _iterator(tok, drop_last=True)
    assert len(keep) == 4 and [len(b["uid"]) for b in keep.epoch_batches(0)] == [3, 3, 3, 1]
    assert len(drop) == 3 and [len(b["uid"]) for b in drop.epoch_batches(0)] == [3, 3, 3]


def test_pad_falls_back_to_eos(tok):
    class NoPad:
        pad_token_id, eos_token_id = None, tok.eos_token_id
        __call__ = staticmethod(tok.__call__)
    assert _iterator(NoPad()).pad_token_id == tok.eos_token_id
