"""Chat templates (harness/data/chat.py): one rendering of prompts and responses for training,
sampling, the reward model, PPO and the server; on the bundled tiny tokenizer with and without a
chat template (tests/fixtures/chat_template.jinja). The SmolLM2 golden ids: test_real_model.py."""

from pathlib import Path

import pytest

from harness.data import chat
from harness.data.dialogue import dialogue, human_prompt, messages_prompt, to_messages
from harness.data.sources import DATASETS
from preference_datasets import get_dataset, make_example, tokenize_example

FIX = Path(__file__).parent / "fixtures"
TINY = str(Path(__file__).parent.parent / "assets" / "tiny_model")
TEMPLATE = str(FIX / "chat_template.jinja")
# one local raw-schema copy of every registered dataset (a new loader must add its own)
SPECS = {"hh": f"hh:{FIX}/hh", "shp": f"shp:{FIX}/shp", "se": f"se:{FIX}/se",
         "sharegpt": f"sharegpt:{FIX}/sharegpt.json", "prefs": f"prefs:{FIX}/annotations.json",
         "json": f"json:{FIX}/pairs.jsonl", "jsonl": f"jsonl:{FIX}/canonical.json", "toy": "toy",
         "trl": f"trl:{FIX}/trl/preference_conversational.jsonl",
         "ultrafeedback": f"ultrafeedback:{FIX}/ultrafeedback"}


@pytest.fixture(scope="module")
def plain():
    from harness.models.modeling import load_tokenizer
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def templated():
    from harness.models.modeling import load_tokenizer
    return load_tokenizer(TINY, TEMPLATE)


def test_to_messages_inverts_the_dialogue_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": " two  spaces"}, {"role": "user", "content": "Bye"}]
    assert to_messages(messages_prompt(msgs)) == msgs
    assert to_messages(dialogue([("a", "b")], "c")) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}]
    assert to_messages(human_prompt("q") + " A helpful answer:")[-1] == {
        "role": "assistant", "content": "A helpful answer:"}  # a prefill, continued
    assert to_messages("plain text") == [{"role": "user", "content": "plain text"}]


def test_every_registered_dataset_has_a_fixture_here():
    assert set(SPECS) == set(DATASETS)


@pytest.mark.parametrize("use_template", [False, True], ids=["reference", "chat_template"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_prompt_tokens_are_a_prefix_of_prompt_plus_response(name, use_template, plain, templated):
    """For every dataset and both templates: tokens(prompt) is a prefix of tokens(prompt +
    response), and what training concatenates is what the tokenizer makes of the whole text,
    through exactly one end-of-turn token."""
    tok = templated if use_template else plain
    data = get_dataset(SPECS[name], "train", silent=True)
    for prompt, record in list(data.items())[:20]:
        prompt_ids = chat.encode_prompt(tok, prompt)
        for response in record["responses"][:2]:
            response_ids = chat.encode_response(tok, response)
            if use_template:
                msgs = to_messages(prompt) + [{"role": "assistant", "content": response[1:]}]
                whole = tok.apply_chat_template(msgs, tokenize=False)
            else:
                whole = prompt + response
            joint = tok(whole, add_special_tokens=False)["input_ids"]
            assert joint[:len(prompt_ids)] == prompt_ids, (name, prompt[:60])
            assert joint[:len(prompt_ids) + len(response_ids) - 1] + [tok.eos_token_id] == \
                prompt_ids + response_ids
            assert response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in response_ids[:-1]


def test_labels_cover_exactly_the_answer_and_its_end_token(templated):
    prompt = dialogue([("Hi", "Hello")], "Write a positive review of the cafe for Anna.")
    ex = make_example(prompt, " The cafe was lovely.", " Bad.", "keep_end")
    out = tokenize_example(ex, templated, max_length=128, max_prompt_length=64)
    ids, labels = out["chosen_input_ids"], out["chosen_labels"]
    answer = [i for i, lab in zip(ids, labels) if lab != -100]
    assert templated.decode(answer) == "The cafe was lovely.<|endoftext|>"
    assert labels[:out["prompt_length"]] == [-100] * out["prompt_length"]
    assert templated.decode(ids[:out["prompt_length"]]).endswith("### assistant:\n")
    assert ids.count(templated.eos_token_id) == 4  # two earlier turns end, the prompt's, the answer's


def test_none_is_the_reference_format_and_auto_without_template_too(plain, templated, caplog):
    import logging
    from harness.models.modeling import load_tokenizer
    with caplog.at_level(logging.INFO, logger="harness.data.chat"):
        load_tokenizer(TINY + "/.")
        load_tokenizer(TINY + "/.")
    assert caplog.text.count("has no chat template: prompts use the reference dialogue") == 1
    none = load_tokenizer(TINY, "none")
    prompt = human_prompt("Tell Sam something positive about the park.")
    ex = make_example(prompt, " The park was nice.", None, "keep_start")
    reference = tokenize_example(ex, plain, 64, 32)
    assert tokenize_example(ex, none, 64, 32) == reference
    assert reference["prompt_input_ids"] == plain(prompt, add_special_tokens=False)["input_ids"]
    assert tokenize_example(ex, templated, 64, 32) != reference


def test_truncation_drops_whole_turns_first(templated):
    turns = [(f"question {i} " + "word " * 10, f"answer {i}") for i in range(4)]
    prompt = "Be brief." + dialogue(turns, "final question?")
    full = chat.encode_prompt(templated, prompt)
    cut = chat.encode_prompt(templated, prompt, "x", "keep_end", len(full) - 5)
    text = templated.decode(cut)
    assert text.startswith("### system:\nBe brief.") and "question 0" not in text
    assert "answer 3" in text and text.endswith("final question?<|endoftext|>\n### assistant:\n")
    tiny = chat.encode_prompt(templated, human_prompt("word " * 50), "x", "keep_start", 40)
    assert len(tiny) <= 40 and templated.decode(tiny).endswith("### assistant:\n")
    with pytest.raises(ValueError, match="max_prompt_length"):
        chat.encode_prompt(templated, human_prompt("word " * 50), "x", "keep_start", 3)


def test_coh_chain_blocks_are_assistant_turns(templated):
    from harness.objectives.coh import Chain, tokenize_chain
    prompt = human_prompt("Write a review.")
    chain = Chain(prompt, ((" A helpful answer:", " Good."), (" An unhelpful answer:", " Bad.")),
                  "keep_start", "positive_negative", " A helpful answer:", "u")
    out = tokenize_chain(chain, templated, 128, 64)
    text = templated.decode(out["chosen_input_ids"])
    assert text.endswith("### assistant:\nA helpful answer: Good.<|endoftext|>\n### assistant:\n"
                         "An unhelpful answer: Bad.<|endoftext|>")
    trained = [i for i, lab in zip(out["chosen_input_ids"], out["chosen_labels"]) if lab != -100]
    assert templated.decode(trained) == " Good.<|endoftext|> Bad.<|endoftext|>"
    # the inference prompt (what sampling and evaluate.py's suffix continue) is the chain's start
    assert out["prompt_input_ids"] == chat.encode_prompt(templated, prompt + " A helpful answer:")
    assert out["chosen_input_ids"][:len(out["prompt_input_ids"])] == out["prompt_input_ids"]


def test_bad_templates_and_texts_are_refused(templated):
    from harness.models.modeling import load_tokenizer
    with pytest.raises(ValueError, match="broken_template.jinja"):
        load_tokenizer(TINY, str(FIX / "broken_template.jinja"))
    with pytest.raises(ValueError, match="chat_template='nope.jinja'"):
        chat.check_option("nope.jinja")
    with pytest.raises(ValueError, match="example abc: user text contains the special token"):
        chat.encode_prompt(templated, human_prompt("hi <|endoftext|> there"), "abc")


def test_the_server_renders_chat_requests_as_training_does(templated, tiny):
    from harness.feedback.serving import ModelBackend
    msgs = [{"role": "user", "content": "Write a positive review of the cafe for Anna."}]
    backend = ModelBackend("m", tiny[0], templated)
    assert backend.chat_prompt(msgs) == chat.render_prompt(templated, messages_prompt(msgs))
    assert ModelBackend("m", tiny[0], tiny[1]).chat_prompt(msgs) == messages_prompt(msgs)


def test_checkpoints_sample_with_their_runs_template(tmp_path, templated):
    """load_checkpoint gives a checkpoint the tokenizer of its run's chat_template option."""
    import torch
    from harness.models.modeling import load_checkpoint
    ckpt = tmp_path / "run" / "step-1"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(
        f"model:\n  name_or_path: {TINY}\n  tokenizer_name_or_path: null\nchat_template: {TEMPLATE}\n")
    from harness.models.modeling import load_model
    torch.save({"step_idx": 1, "state": load_model(TINY, "float32").state_dict()}, ckpt / "policy.pt")
    _, tok = load_checkpoint(str(ckpt / "policy.pt"))
    assert tok.chat_template == templated.chat_template
