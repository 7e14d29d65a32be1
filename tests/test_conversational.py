"""Conversational loaders (trl, ultrafeedback) on raw-schema fixtures, and CoH's graded feedback
from the scores they keep."""

import logging
from pathlib import Path

import pytest

from harness.data.dialogue import dialogue, human_prompt
from preference_datasets import get_dataset, load_examples

FIX = Path(__file__).parent / "fixtures"
CONV, STRINGS, SFT = (f"trl:{FIX}/trl/{n}.jsonl" for n in
                      ("preference_conversational", "preference_strings", "sft"))
UF = f"ultrafeedback:{FIX}/ultrafeedback"


def load(spec, split="train"):
    return get_dataset(spec, split, silent=True)


def test_trl_conversational_preferences_explicit_and_implicit_prompts(caplog):
    with caplog.at_level(logging.WARNING):
        data = load(CONV)
    sky = data[human_prompt("What color is the sky?")]
    assert sky["responses"] == [" It is blue.", " It is green."] and sky["pairs"] == [(0, 1)]
    assert "You answer briefly." + human_prompt("Name a prime number.") in data  # system first
    joke = data[dialogue([("Hi!", "Hello! How can I help?")], "Tell me a joke.")]  # implicit
    assert joke["responses"][1] == " No." and joke["truncation_mode"] == "keep_end"
    paris = data[human_prompt("Where is Paris?")]
    assert paris["pairs"] == [(0, 1), (2, 3)] and paris["scores"] == [9.0, 2.0, 8.0, 1.0]
    assert "scores" not in sky  # no scores in the source: none in the record
    assert len(data) == 4
    log = caplog.text  # bad records: dropped, counted by reason, first record and key named
    assert "dropped 4 of 9 records" in log
    assert "unknown role: 1 (first: record 5, key 'prompt[0].role')" in log
    assert "empty message list: 2 (first: record 6, key 'prompt')" in log
    assert "missing assistant answer: 1 (first: record 8, key 'chosen')" in log


def test_trl_string_preferences_and_sft_rows():
    data = load(STRINGS)
    assert data["The sky is"]["responses"] == [" blue.", " green."]
    assert data[human_prompt("Capital of Italy?")]["responses"] == [" Rome.", " Milan."]
    assert data["The best fruit is the"]["responses"] == [" apple.", " pear."]  # TRL's rule
    sft = load(SFT)
    assert sft[human_prompt("Write a haiku about rain.")]["sft_target"].startswith(" Soft rain")
    assert sft["Be terse." + dialogue([("Hi", "Hi.")], "Bye")]["sft_target"] == " Bye."
    assert sft[human_prompt("Translate 'chat' to English.")]["sft_target"] == " cat"
    assert sft["Once upon a time"]["pairs"] == []
    examples = load_examples([SFT], "train", sft_mode=True)
    assert len(examples) == 4 and all(ex.rejected is None for ex in examples)


def test_ultrafeedback_splits_scores_and_drops():
    train, test = load(UF), load(UF, "test")
    assert len(train) == 4 and len(test) == 2
    spider = train[human_prompt("How many legs does a spider have?")]
    assert spider["responses"] == [" A spider has eight legs.", " Six."]
    assert spider["scores"] == [10.0, 2.0] and spider["sft_target"] == " A spider has eight legs."
    assert not set(train) & set(test)


def test_a_local_folder_of_parquet_files_reads_like_its_json(tmp_path):
    """The hub ships UltraFeedback as parquet: the same rows as parquet files in a local folder
    (read through datasets, imported only on this path) give the same records."""
    import datasets
    for split in ("train_prefs", "test_prefs"):
        source = str(FIX / "ultrafeedback" / f"{split}.jsonl")
        rows = datasets.load_dataset("json", data_files=source, split="train")
        rows.to_parquet(str(tmp_path / f"{split}.parquet"))
    for split in ("train", "test"):
        assert load(f"ultrafeedback:{tmp_path}", split) == load(UF, split)


def test_a_source_with_nothing_usable_is_an_error_naming_the_reasons(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "robot", "content": "x"}], "chosen": [{"role": "assistant", "content": "y"}], "rejected": [{"role": "assistant", "content": "z"}]}\n')
    with pytest.raises(ValueError, match=r"no usable records .*unknown role: 1 \(first: record 0"):
        load(f"trl:{bad}")
    with pytest.raises(ValueError, match="trl:HUB_ID or trl:PATH"):
        load("trl")
    with pytest.raises(FileNotFoundError, match="no such|does not exist"):
        load("trl:./missing.jsonl")


def test_text_that_the_dialogue_format_cannot_hold_is_dropped(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": [{"role": "user", "content": "a\\n\\nAssistant: b"}], '
                 '"chosen": [{"role": "assistant", "content": "c"}], '
                 '"rejected": [{"role": "assistant", "content": "d"}]}\n'
                 '{"prompt": [{"role": "user", "content": "ok"}], '
                 '"chosen": [{"role": "assistant", "content": "c"}], '
                 '"rejected": [{"role": "assistant", "content": "d"}]}\n')
    assert list(load(f"trl:{f}")) == [human_prompt("ok")]


# ------------------------------------------------------------------ graded CoH
BUCKETS = [[8.0, " A great answer:{answer}"], [5.0, " An okay answer:{answer}"],
           [None, " A bad answer:{answer}"]]


def test_coh_conditions_on_score_buckets_when_records_have_scores(compose):
    from harness.objectives.coh import coh_settings, record_chains
    cfg = compose("loss=coh", f"+loss.score_buckets={BUCKETS}".replace("None", "null"))
    settings = coh_settings(cfg)
    assert settings.inference_phrase == " A great answer:"
    paris = load(CONV)[human_prompt("Where is Paris?")]  # scores 9 / 2 and 8 / 1
    chains = record_chains(human_prompt("Where is Paris?"), paris, settings)
    for chain in chains:
        phrases = dict((answer, phrase) for phrase, answer in chain.blocks)
        assert chain.order.startswith("graded ")
        assert phrases[" In France." if " In France." in phrases else " Paris is in France."] \
            == " A great answer:"
        assert phrases.get(" In Spain.", phrases.get(" On the moon.")) == " A bad answer:"
    sky = load(CONV)[human_prompt("What color is the sky?")]  # no scores: pairwise as before
    (chain,) = record_chains(human_prompt("What color is the sky?"), sky, settings)
    assert chain.order == "positive_negative" or chain.order == "negative_positive"
    assert not {p for p, _ in chain.blocks} & {" A great answer:", " A bad answer:"}


@pytest.mark.parametrize("buckets, match", [
    ([[1.0, " A:{answer}"], [2.0, " B:{answer}"], [None, " C:{answer}"]], "highest score down"),
    ([[1.0, " A:{answer}"]], "null exactly"),
    ([[1.0, " A:{answer} tail"], [None, " C:{answer}"]], "text after its last slot"),
])
def test_bad_score_buckets_are_refused(compose, buckets, match):
    from harness.objectives.coh import coh_settings
    cfg = compose("loss=coh", f"+loss.score_buckets={buckets}".replace("None", "null"))
    with pytest.raises(ValueError, match=match):
        coh_settings(cfg)


def test_train_py_check_knows_the_conversational_loaders_before_anything_imports_them():
    """train.py checks datasets= before it imports the data pipeline: trl and ultrafeedback
    must be known there (they were 'unknown dataset' on the command line)."""
    import subprocess
    import sys
    code = ("from harness.data.sources import check_spec; check_spec('ultrafeedback'); "
            "check_spec('trl:tests/fixtures/trl/sft.jsonl'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
