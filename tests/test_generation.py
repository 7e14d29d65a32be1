"""Inference helpers on the bundled tiny model: checkpoint resolution, seeded sampling, scoring."""

import json

import pytest
import torch

from harness.checkpoints import REPO_ROOT, resolve_checkpoint
from harness.models.generation import (KeyedSampling, SamplingConfig, completion_logps,
                                       completion_token_logps, encode_completions, hash32,
                                       plan_batches, sample)
from harness.models.modeling import load_checkpoint
from harness.data.toy_task import toy_records

TINY = str(REPO_ROOT / "assets" / "tiny_model")
PROMPTS = list(toy_records("test", n_prompts=6))


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(TINY)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny):
    model, tok = tiny
    cfg = SamplingConfig(seed=3, batch_size=4, max_new_tokens=24)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample(model, tok, PROMPTS, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == sample(model, tok, PROMPTS, cfg, progress=False)
    assert a != sample(model, tok, PROMPTS, SamplingConfig(seed=4, batch_size=4, max_new_tokens=24),
                       progress=False)
    for s in a:
        assert s.finished == (s.completion_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in s.completion_ids[:-1]
        assert len(s.completion_ids) <= 24 and s.prompt in PROMPTS


def test_hash32_is_lowbias32():
    def lowbias32(x):  # the published C code, on Python integers
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    assert lowbias32(1) != lowbias32(2) != 0


def test_keyed_sampling_draws_from_softmax_at_temperature():
    """Gumbel-max: over many keys, the argmax of the perturbed scores follows softmax(l / T)."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n, temperature = 40_000, 0.5
    scores = KeyedSampling(7, list(range(n)), temperature, prompt_width=3)(
        torch.zeros(n, 3, dtype=torch.long), logits.expand(n, 4))
    freq = torch.bincount(scores.argmax(-1), minlength=4) / n
    e = [1.0, 7.389056, 54.59815, 0.135335]  # exp(l / 0.5)
    expected = torch.tensor(e) / sum(e)      # 0.0159, 0.1173, 0.8647, 0.0021
    torch.testing.assert_close(freq, expected, atol=0.006, rtol=0)
    # a row's draw depends on its key and the step, not on its position in the batch
    again = KeyedSampling(7, [5, 3], temperature, prompt_width=3)(
        torch.zeros(2, 3, dtype=torch.long), logits.expand(2, 4))
    torch.testing.assert_close(again, scores[[5, 3]])
    next_step = KeyedSampling(7, [5], temperature, prompt_width=2)(
        torch.zeros(1, 3, dtype=torch.long), logits[None])
    assert not torch.equal(next_step[0], scores[5])


def test_keyed_sampling_with_top_p_draws_from_the_nucleus():
    """top_p=0.9 at T=1 on probabilities 0.6, 0.25, 0.1, 0.05: HF's warper keeps the tokens
    outside the lowest 10% of the mass (0.6, 0.25, 0.1); draws follow them renormalised."""
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 40_000
    scores = KeyedSampling(11, list(range(n)), 1.0, prompt_width=1, top_p=0.9)(
        torch.zeros(n, 1, dtype=torch.long), probs.log().expand(n, 4))
    freq = torch.bincount(scores.argmax(-1), minlength=4) / n
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.25, 0.1, 0.0]) / 0.95, atol=0.006, rtol=0)
    assert scores[:, 3].isinf().all()  # never drawn, whatever the noise


def test_keyed_samples_do_not_depend_on_the_batch(tiny):
    model, tok = tiny
    keys = [10, 11, 12, 13, 14, 15]
    whole = sample(model, tok, PROMPTS, SamplingConfig(seed=3, batch_size=6, max_new_tokens=24),
                   progress=False, keys=keys)
    split = sample(model, tok, PROMPTS[::-1], SamplingConfig(seed=3, batch_size=4,
                                                             max_new_tokens=24),
                   progress=False, keys=keys[::-1])
    assert whole == split[::-1]
    assert len({s.completion for s in whole}) > 3  # samples, not one greedy answer
    # nor on how the batches are planned or which KV cache holds them (PPO's loss.static_cache)
    levers = SamplingConfig(seed=3, batch_size=4, max_new_tokens=24, sort_by_length=True,
                            static_cache=True)
    assert sample(model, tok, PROMPTS, levers, progress=False, keys=keys) == whole
    other_seed = sample(model, tok, PROMPTS, SamplingConfig(seed=4, batch_size=6,
                                                            max_new_tokens=24),
                        progress=False, keys=keys)
    assert whole != other_seed
    with pytest.raises(ValueError, match="keyed sampling"):
        sample(model, tok, PROMPTS, SamplingConfig(temperature=0), progress=False, keys=keys)


def test_left_padding_does_not_change_greedy_completions(tiny):
    model, tok = tiny
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    batched = sample(model, tok, PROMPTS, SamplingConfig(**{**greedy.__dict__, "batch_size": 6}),
                     progress=False)
    alone = sample(model, tok, PROMPTS, SamplingConfig(**{**greedy.__dict__, "batch_size": 1}),
                   progress=False)
    assert [s.completion_ids for s in batched] == [s.completion_ids for s in alone]


def test_plan_batches_by_hand():
    lengths = [5, 9, 2, 7, 3]
    assert plan_batches(lengths, SamplingConfig(batch_size=2)) == [[0, 1], [2, 3], [4]]
    # longest first: 9 7 | 5 3 | 2
    assert plan_batches(lengths, SamplingConfig(batch_size=2, sort_by_length=True)) == \
        [[1, 3], [0, 4], [2]]
    # KV-cache positions rows x (longest + 4 new tokens) <= 30: [9+4] x 2 = 26 fits, x 3 = 39
    # does not; then 5 3 2: 3 x (5 + 4) = 27 fits
    cfg = SamplingConfig(batch_size=8, sort_by_length=True, batch_tokens=30, max_new_tokens=4)
    assert plan_batches(lengths, cfg) == [[1, 3], [0, 4, 2]]
    # in prompt order, budget 24: 5 | 9 (2 x 13 = 26) | 2 7 (2 x 11 = 22) | 3 (3 x 11 = 33)
    cfg = SamplingConfig(batch_size=8, batch_tokens=24, max_new_tokens=4)
    assert plan_batches(lengths, cfg) == [[0], [1], [2, 3], [4]]
    # a prompt longer than the budget still gets a batch of its own
    assert plan_batches([50, 1], SamplingConfig(batch_tokens=8, max_new_tokens=4)) == [[0], [1]]


def test_speed_levers_keep_greedy_output_and_repeat_samples(tiny):
    """sort_by_length, batch_tokens and a static KV cache: the same greedy completions as the
    default batching; sampling with a static cache draws the same samples as the dynamic one;
    with sorting, samples repeat for the same settings and come back in prompt order."""
    model, tok = tiny
    prompts = [p * (1 + i % 3) for i, p in enumerate(PROMPTS)]  # 1-3 copies: varied lengths
    base = SamplingConfig(temperature=0, max_new_tokens=16, batch_size=2)
    plain = sample(model, tok, prompts, base, progress=False)
    lengths = [len(s.prompt_ids) for s in plain]
    for levers in ({"sort_by_length": True}, {"batch_tokens": 120}, {"static_cache": True},
                   {"sort_by_length": True, "batch_tokens": 120, "static_cache": True}):
        cfg = SamplingConfig(**{**base.__dict__, **levers})
        # the batches really differ from the default's [[0, 1], [2, 3], [4, 5]]
        assert (plan_batches(lengths, cfg) != plan_batches(lengths, base)) == \
            (levers != {"static_cache": True})
        assert sample(model, tok, prompts, cfg, progress=False) == plain, levers
    sampled = SamplingConfig(seed=5, max_new_tokens=16, batch_size=2)
    dynamic = sample(model, tok, prompts, sampled, progress=False)
    static = SamplingConfig(**{**sampled.__dict__, "static_cache": True})
    assert sample(model, tok, prompts, static, progress=False) == dynamic
    assert dynamic != plain  # sampled, not greedy
    sort = SamplingConfig(**{**sampled.__dict__, "sort_by_length": True})
    first = sample(model, tok, prompts, sort, progress=False)
    assert first == sample(model, tok, prompts, sort, progress=False)
    assert [s.prompt for s in first] == prompts


def test_min_new_tokens_holds_back_eos(tiny):
    model, tok = tiny
    free = sample(model, tok, PROMPTS, SamplingConfig(seed=1, max_new_tokens=24), progress=False)
    assert any(len(s.completion_ids) < 12 for s in free)  # the tiny model ends early otherwise
    cfg = SamplingConfig(seed=1, max_new_tokens=24, min_new_tokens=12)
    for s in sample(model, tok, PROMPTS, cfg, progress=False):
        assert len(s.completion_ids) >= 12 and tok.eos_token_id not in s.completion_ids[:12]
    full = SamplingConfig(seed=1, max_new_tokens=12, min_new_tokens=12)
    assert all(len(s.completion_ids) == 12 and not s.finished
               for s in sample(model, tok, PROMPTS, full, progress=False))
    with pytest.raises(ValueError, match="min_new_tokens"):
        sample(model, tok, PROMPTS, SamplingConfig(max_new_tokens=4, min_new_tokens=5))
    with pytest.raises(ValueError, match="batch_tokens"):
        sample(model, tok, PROMPTS, SamplingConfig(batch_tokens=0))


def test_token_logps_sum_to_sequence_logps(tiny):
    model, tok = tiny
    samples = sample(model, tok, PROMPTS, SamplingConfig(seed=0, batch_size=3), progress=False)
    logps, n = completion_logps(model, tok, samples, batch_size=4)
    per_token = completion_token_logps(model, tok, samples, batch_size=5, chunk_size=7)
    assert n.tolist() == [len(s.completion_ids) for s in samples]
    assert [len(t) for t in per_token] == n.tolist()
    torch.testing.assert_close(torch.stack([t.sum() for t in per_token]), logps, atol=1e-4,
                               rtol=1e-5)
    assert (logps < 0).all()


def test_encode_completions_appends_eos(tiny):
    _, tok = tiny
    [s] = encode_completions(tok, PROMPTS[:1], [" The cafe was lovely."])
    assert s.completion_ids[-1] == tok.eos_token_id and s.finished
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        encode_completions(tok, PROMPTS[:1], ["a", "b"])


def test_empty_prompt_set_is_an_error(tiny):
    with pytest.raises(ValueError, match="prompt set is empty"):
        sample(*tiny, [], progress=False)


def _fake_run(tmp_path, model_dir=TINY, state=None):
    """A run dir laid out as train.py writes it: config.yaml + step-N/policy.pt + LATEST."""
    run = tmp_path / "run"
    (run / "step-8").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name_or_path: {model_dir}\n"
                                     "  tokenizer_name_or_path: null\n")
    torch.save({"step_idx": 8, "state": state, "metrics": {}}, run / "step-8" / "policy.pt")
    (run / "LATEST").symlink_to("step-8")
    return run


def test_resolve_checkpoint_forms(tmp_path, tiny):
    run = _fake_run(tmp_path, state=tiny[0].state_dict())
    for path in (run, run / "LATEST", run / "LATEST" / "policy.pt"):
        ref = resolve_checkpoint(str(path))
        assert ref.model == TINY and ref.tokenizer == TINY and ref.archive.endswith("policy.pt")
    assert resolve_checkpoint(TINY).archive is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "bare").mkdir()
    torch.save({"state": {}}, tmp_path / "bare" / "policy.pt")
    with pytest.raises(ValueError, match="base model"):
        resolve_checkpoint(str(tmp_path / "bare" / "policy.pt"))


def test_archive_that_does_not_fit_the_model(tmp_path, tiny):
    state = {k: v for k, v in tiny[0].state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(10, 64)
    run = _fake_run(tmp_path, state=state)
    with pytest.raises(ValueError, match="does not fit the base model"):
        load_checkpoint(str(run))


def test_tokenizer_of_another_model(tmp_path):
    """A model whose embedding table is smaller than the tokenizer's vocabulary."""
    small = tmp_path / "small"
    small.mkdir()
    cfg = json.loads((REPO_ROOT / "assets" / "tiny_model" / "config.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(**{**cfg, "vocab_size": 100})).save_pretrained(small)
    with pytest.raises(ValueError, match="do not belong together"):
        load_checkpoint(str(small), tokenizer=TINY)
