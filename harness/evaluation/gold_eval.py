"""Evaluate a checkpoint against a gold reward: how much it aligns, and how far it drifts.

For held-out prompts, the policy and its reference each sample one completion per prompt (same
seed, same settings). From those samples:

    gold reward      mean of gold(prompt, policy completion), with a 95% interval
    KL               KL(policy || reference) per sequence, estimated from the policy's samples as
                     mean_i sum_t [log pi(y_it | x_i, y_i<t) - log ref(y_it | x_i, y_i<t)]
                     (the Monte Carlo form of E_{y~pi} log pi(y|x) / ref(y|x), the quantity on the
                     x axis of the DPO paper's Figure 2), with a 95% interval
    length           mean completion length in tokens (EOS not counted)
    win rate         share of prompts where the policy's completion beats the reference's under
                     the gold reward; a tie counts half a win, with a 95% interval

The KL estimate is unbiased only when the samples come from the policy itself, i.e. at
temperature=1 and top_p=1 (the defaults); other settings report the mean log-ratio of the
tempered samples, which is no longer a KL. Intervals are normal approximations,
mean +- 1.96 * sd / sqrt(n), with sd the sample standard deviation (n - 1).
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace


from harness.checkpoints import (atomic_write_text, default_reference, resolve_checkpoint,
                                 run_config)
from harness.checkpoints import output_path as checkpoint_output_path
from harness.data.chat import encode_prompt
from harness.data.gold import get_gold_reward
from harness.evaluation.stats import mean_ci, sequence_kl, win_scores
from harness.models.generation import SamplingConfig, completion_logps, sample
from harness.models.modeling import load_checkpoint
from harness.objectives import sampling_prompt_suffix

# ------------------------------------------------------------------------------ inputs
def load_prompts(dataset: str = "toy", split: str = "test", n_prompts: int | None = None,
                 prompts_file: str | None = None) -> list[str]:
    """Held-out prompts: the first n of a registered dataset's split (NAME or NAME:PATH), or of
    a file (a JSON list of strings, or JSONL rows with a "prompt" key)."""
    if prompts_file:
        prompts = _read_prompts_file(prompts_file)
        where = f"prompts file {prompts_file!r}"
    else:
        from preference_datasets import get_dataset
        prompts = list(get_dataset(dataset, split, silent=True))
        where = f"dataset {dataset!r} split {split!r}"
    if n_prompts is not None:
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts}: need at least one prompt")
        prompts = prompts[:n_prompts]
    if not prompts:
        raise ValueError(f"{where} has no prompts: the prompt set is empty")
    return prompts


def _read_prompts_file(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    text = open(path, encoding="utf-8").read()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = []
    for i, row in enumerate(rows, 1):
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: entry {i} is not a string or a row with a 'prompt' string")
        prompts.append(prompt)
    return prompts


def output_path(policy_path: str, gold: str, seed: int) -> str:
    """The JSON goes next to the checkpoint: into its checkpoint / model dir."""
    return checkpoint_output_path(policy_path, f"eval_{gold}_seed{seed}.json")


# -------------------------------------------------------------------------- evaluation
@dataclass
class EvalConfig:
    gold: str = "toy"
    dataset: str = "toy"
    split: str = "test"
    n_prompts: int | None = None
    prompts_file: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # text appended to the prompts the policy samples from: "auto" = what its run config's loss
    # asks for (CoH: the positive feedback phrase, others: nothing), "none", or the text itself
    policy_prompt_suffix: str = "auto"
    base_model: str | None = None      # base model of a policy.pt without a run config
    reference_base_model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"


def policy_prompt_suffix(policy_path: str, option: str = "auto",
                         base_model: str | None = None) -> str:
    """The text the policy's prompts end with when it is sampled (see EvalConfig). A CoH model
    is meant to be prompted with its positive phrase, so "auto" reads it from the run config."""
    if option != "auto":
        return "" if option == "none" else option
    archive = resolve_checkpoint(policy_path, base_model).archive
    if archive is None:  # a Hugging Face dir or hub id: no training config to read
        return ""
    cfg = run_config(archive)
    return sampling_prompt_suffix(cfg) if cfg is not None else ""


def _check_same_tokenizer(tok_a, tok_b):
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError("the policy and the reference use different tokenizers; a token-level KL "
                         "needs one tokenizer (evaluate checkpoints of the same base model)")


def _reference_samples(cache: dict, key, model, tok, prompts, sampling):
    """Reference samples and gold rewards are the same for every policy sharing a reference:
    computed once per process."""
    if key not in cache:
        cache[key] = sample(model, tok, prompts, sampling, desc="reference samples")
    return cache[key]


def evaluate(policy_path: str, reference_path: str | None = None, cfg: EvalConfig = EvalConfig(),
             cache: dict | None = None) -> dict:
    """Every metric of the module docstring for one checkpoint, as a JSON-ready dict."""
    gold_fn = get_gold_reward(cfg.gold)  # fail before loading anything
    prompts = load_prompts(cfg.dataset, cfg.split, cfg.n_prompts, cfg.prompts_file)
    reference_path = reference_path or default_reference(policy_path)
    policy, tok = load_checkpoint(policy_path, cfg.base_model, dtype=cfg.dtype, device=cfg.device)
    reference, ref_tok = load_checkpoint(reference_path, cfg.reference_base_model, dtype=cfg.dtype,
                                         device=cfg.device)
    _check_same_tokenizer(tok, ref_tok)
    s = cfg.sampling
    suffix = policy_prompt_suffix(policy_path, cfg.policy_prompt_suffix, cfg.base_model)
    pi_samples = sample(policy, tok, [p + suffix for p in prompts], s, desc="policy samples")
    key = (str(resolve_checkpoint(reference_path, cfg.reference_base_model)), str(asdict(s)),
           hashlib.sha256(json.dumps(prompts).encode()).hexdigest())
    ref_samples = _reference_samples(cache if cache is not None else {}, key, reference, ref_tok,
                                     prompts, s)
    pi_logps, _ = completion_logps(policy, tok, pi_samples, s.batch_size, desc="policy logps")
    if suffix:  # the KL compares what was sampled, pi(y | x + suffix), with ref(y | x); the
        # gold reward and the reference see the plain prompt
        pi_samples = [replace(x, prompt=p, prompt_ids=tuple(encode_prompt(tok, p)))
                      for x, p in zip(pi_samples, prompts)]
    ref_logps, _ = completion_logps(reference, tok, pi_samples, s.batch_size, desc="ref logps")
    pi_rewards = [gold_fn(x.prompt, x.completion) for x in pi_samples]
    ref_rewards = [gold_fn(x.prompt, x.completion) for x in ref_samples]
    lengths = [len(x.completion_ids) - x.finished for x in pi_samples]
    result = {"checkpoint": policy_path, "reference": reference_path, "gold_reward_name": cfg.gold,
              "prompts": cfg.prompts_file or f"{cfg.dataset}:{cfg.split}", "n_prompts": len(prompts),
              "sampling": asdict(s), "policy_prompt_suffix": suffix}
    for name, values in (("gold_reward", pi_rewards), ("reference_gold_reward", ref_rewards),
                         ("kl", sequence_kl(pi_logps, ref_logps)), ("length", lengths),
                         ("win_rate", win_scores(pi_rewards, ref_rewards))):
        result[name], result[f"{name}_ci95"] = mean_ci(values)
    result["finished_fraction"] = sum(x.finished for x in pi_samples) / len(pi_samples)
    result["win_rate_ties"] = "a tie under the gold reward counts as half a win"
    result["examples"] = [{"prompt": x.prompt, "policy": x.completion, "reference": y.completion}
                          for x, y in zip(pi_samples[:5], ref_samples[:5])]
    return result


def write_result(result: dict, path: str):
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def format_line(result: dict) -> str:
    r = result
    return (f"eval {r['checkpoint']}: gold {r['gold_reward']:.4f} +- {r['gold_reward_ci95']:.4f}"
            f" | KL {r['kl']:.3f} +- {r['kl_ci95']:.3f} nats | length {r['length']:.1f}"
            f" | win rate {r['win_rate']:.3f} (ties half) vs reference gold "
            f"{r['reference_gold_reward']:.4f} | n={r['n_prompts']} seed={r['sampling']['seed']}"
            + (f" | policy prompts end with {r['policy_prompt_suffix']!r}"
               if r.get("policy_prompt_suffix") else ""))
