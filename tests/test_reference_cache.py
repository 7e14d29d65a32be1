"""The reference cache key names what computed the table, so a cached table is never reused for
a reference that would give other log-probs."""

from omegaconf import OmegaConf

from harness.training.reference_cache import cache_key

TOK = {"tokenizer": "tok", "max_length": 128, "max_prompt_length": 64}


def model_cfg(**kw):
    return OmegaConf.create({"name_or_path": "m", "archive": None, "policy_dtype": "float32",
                             "reference_dtype": "float32", "lora": {"r": 0}, **kw})


def test_key_follows_the_reference_precision():
    base = cache_key(model_cfg(), TOK, ["a", "b"])
    assert cache_key(model_cfg(), TOK, ["b", "a"]) == base  # order of examples does not matter
    assert cache_key(model_cfg(), TOK, ["a"]) != base
    assert cache_key(model_cfg(reference_dtype="bfloat16"), TOK, ["a", "b"]) != base
    assert cache_key(model_cfg(), TOK, ["a", "b"], amp_dtype="bfloat16") != base
    assert cache_key(model_cfg(), {**TOK, "max_length": 64}, ["a", "b"]) != base


def test_lora_reference_runs_in_the_policy_dtype():
    """With LoRA the reference is the policy with adapters off: reference_dtype is unused."""
    lora = {"lora": {"r": 8}}
    key = cache_key(model_cfg(**lora), TOK, ["a"])
    assert cache_key(model_cfg(reference_dtype="bfloat16", **lora), TOK, ["a"]) == key
    assert cache_key(model_cfg(policy_dtype="bfloat16", **lora), TOK, ["a"]) != key
    assert cache_key(model_cfg(policy_dtype="bfloat16"), TOK, ["a"]) == \
        cache_key(model_cfg(), TOK, ["a"])  # without LoRA the policy dtype does not matter
