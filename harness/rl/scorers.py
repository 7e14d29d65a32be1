"""What scores a rollout's responses: `loss.scorer=` of GRPO, RLOO and online DPO (and, as a
RewardModelScorer over its own reward model, PPO's reward).

    gold:NAME            a function fn(prompt, completion) -> float from the gold table
                         (harness.data.gold): the toy task's gold reward, or a verifiable reward
                         of your own, registered with @register_gold_reward("NAME") in a module
                         that loss.scorer_import=MODULE imports
    reward_model:PATH    a loss=reward checkpoint (run dir, checkpoint dir or policy.pt), scored
                         on the policy's token ids at the response's EOS (its tokenizer must be
                         the policy's), wrapped by the run's strategy like the policy (sharded
                         under FSDP); loss.normalize_reward applies its held-out mean / std
    judge:llm            an LLM judge behind an OpenAI-compatible endpoint (loss.judge.*,
                         harness.feedback.judges), asked about pairs in both orders; a pair whose
                         orders disagree is a tie. A group's score of a response is its mean win
                         rate against the group's other responses (online DPO: one pair)

A score that fails (a judge that gave up, a non-finite value) comes back as NaN: the method skips
the item and counts it, and never trains on it.
"""

import importlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

from harness.data.gold import check_scorer
from harness.feedback.sample_files import strip_output
from harness.data.dialogue import instruction_of
from harness.models.lora import adapters_disabled
from harness.rl.rollout import Rollout, chunked, score

KINDS = ("gold", "reward_model", "judge")
# loss.judge.* keys and their defaults (scripts/label_ai_preferences.py's flags)
JUDGE_DEFAULTS = {"base_url": None, "model": None, "template": "default", "endpoint": "chat",
                  "verdict": "text", "max_tokens": 8, "concurrency": 8, "max_attempts": 5,
                  "timeout": 60.0, "backoff": 1.0, "backoff_max": 60.0, "api_key_env": None,
                  "organization": None, "project": None, "headers": None, "api_version": None,
                  "token_limit_param": "auto"}


def parse_scorer(key: str, spec, judge: dict | None, scorer_import: str | None):
    """Check `spec` (KIND:ARG) before any model loads; returns (kind, arg)."""
    kind, _, arg = str(spec or "").partition(":")
    if kind not in KINDS or not arg:
        raise ValueError(f"{key}={spec!r}: name what scores the responses: gold:NAME (a "
                         "registered function, e.g. gold:toy), reward_model:RUN_DIR (a loss=reward"
                         " checkpoint) or judge:llm (an LLM judge, configured by loss.judge.*)")
    if scorer_import:
        try:
            importlib.import_module(scorer_import)
        except ImportError as e:
            raise ValueError(f"loss.scorer_import={scorer_import!r}: {e}") from None
    if kind == "gold":
        check_scorer(key, arg)
    if kind == "judge":
        if arg != "llm":
            raise ValueError(f"{key}={spec!r}: the judge scorer is judge:llm")
        unknown = sorted(set(judge or {}) - set(JUDGE_DEFAULTS))
        if unknown:
            raise ValueError(f"loss.judge.{unknown[0]} is not a judge option; the options are "
                             f"{', '.join(JUDGE_DEFAULTS)}")
        settings = {**JUDGE_DEFAULTS, **(judge or {})}
        if not settings["base_url"] or not settings["model"]:
            raise ValueError(f"{key}=judge:llm needs loss.judge.base_url and loss.judge.model "
                             "(an OpenAI-compatible endpoint, e.g. scripts/serve.py or vllm)")
        env = settings["api_key_env"]
        if env and env not in os.environ:  # the key itself never enters a config
            raise ValueError(f"loss.judge.api_key_env={env!r}: that environment variable is "
                             "not set; export it, or leave api_key_env null for a server that "
                             "needs no key")
    elif judge:
        raise ValueError(f"loss.judge is set but {key}={spec!r} is not judge:llm; remove it")
    return kind, arg


class FunctionScorer:
    """A gold-table function of (prompt, completion text)."""
    collective, scalar = False, True

    def __init__(self, name: str):
        self.name, self.fn = f"gold:{name}", check_scorer("loss.scorer", name)

    def score(self, batch: Rollout, group_size: int) -> torch.Tensor:
        values = []
        for s in batch.samples:
            value = self.fn(s.prompt, s.completion)
            try:
                value = float(value)
            except (TypeError, ValueError):  # a bug in the function, not a failed score
                raise TypeError(f"loss.scorer={self.name} returned {value!r} for the completion "
                                f"{s.completion[:60]!r}: a scorer returns a number") from None
            values.append(value if math.isfinite(value) else math.nan)
        return torch.tensor(values, dtype=torch.float32, device=batch.input_ids.device)


class RewardModelScorer:
    """A reward model (wrapped by the strategy) on the rollout's token ids; collective: every
    rank runs the same forwards. With LoRA it may be a model with adapters (PPO's critic),
    run with them disabled. meta: reward_model.json, for normalize."""
    collective, scalar = True, True

    def __init__(self, model, meta: dict, normalize: bool, chunk: int, name="reward_model"):
        self.model, self.meta, self.normalize, self.chunk, self.name = \
            model, meta, normalize, chunk, name

    @torch.no_grad()
    def score(self, batch: Rollout, group_size: int) -> torch.Tensor:
        with adapters_disabled(self.model):
            scores = chunked(batch, self.chunk, lambda mb: score(self.model, mb))
        if self.normalize:
            scores = (scores - self.meta["reward_mean"]) / max(self.meta["reward_std"], 1e-8)
        return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.nan))


class JudgeScorer:
    """Pairwise LLM judgments turned into scores: within each group, every pair is judged in
    both orders (in parallel, loss.judge.concurrency requests at once); a response's score is
    its mean win rate over its judged pairs (a tie or a disagreement counts 1/2), NaN when none
    of its pairs could be judged."""
    collective, scalar = False, False

    def __init__(self, settings: dict):
        from harness.feedback.judges import make_judge
        s = {**JUDGE_DEFAULTS, **settings}
        args = SimpleNamespace(judge_base_url=s["base_url"], judge_model=s["model"],
                               template=s["template"], endpoint=s["endpoint"],
                               verdict=s["verdict"], judge_max_tokens=s["max_tokens"],
                               orders_disagree="tie",
                               max_attempts=s["max_attempts"], timeout=s["timeout"],
                               backoff=s["backoff"], backoff_max=s["backoff_max"],
                               api_key_env=s["api_key_env"], organization=s["organization"],
                               project=s["project"], api_version=s["api_version"],
                               header=[f"{k}={v}" for k, v in (s["headers"] or {}).items()],
                               token_limit_param=s["token_limit_param"])
        self.judge, self.concurrency = make_judge("llm", args), int(s["concurrency"])
        self.name = self.judge.name

    def prefer(self, prompt: str, first: str, second: str):
        """P(second is better) in [0, 1] (ties 1/2), or None when the judge gave up."""
        from harness.feedback.openai_client import GaveUp
        pair = {"instruction": instruction_of(prompt), "output_1": strip_output(first),
                "output_2": strip_output(second)}
        try:
            records = {unit: self.judge.judge_unit(pair, unit) for unit in self.judge.units}
        except GaveUp:
            return None
        return self.judge.combine(records)[0] - 1.0

    def score(self, batch: Rollout, group_size: int) -> torch.Tensor:
        texts = [(s.prompt, s.completion) for s in batch.samples]
        pairs = [(g + i, g + j) for g in range(0, len(texts), group_size)
                 for i in range(group_size) for j in range(i + 1, group_size)]
        with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            judged = list(pool.map(lambda p: self.prefer(texts[p[0]][0], texts[p[0]][1],
                                                         texts[p[1]][1]), pairs))
        wins, counts = [0.0] * len(texts), [0] * len(texts)
        for (a, b), p in zip(pairs, judged):
            if p is not None:
                wins[a], wins[b] = wins[a] + 1 - p, wins[b] + p
                counts[a], counts[b] = counts[a] + 1, counts[b] + 1
        return torch.tensor([w / c if c else math.nan for w, c in zip(wins, counts)],
                            dtype=torch.float32, device=batch.input_ids.device)


def make_scorer(loop, opts, device):
    """The scorer that loss.scorer names (a reward model: loaded here onto `device` and wrapped
    by the loop's strategy; rank 0 reads its weights, the others receive their shards)."""
    kind, arg = parse_scorer("loss.scorer", opts.scorer, opts.judge, opts.scorer_import)
    if kind == "gold":
        return FunctionScorer(arg)
    if kind == "judge":
        return JudgeScorer(opts.judge or {})
    from harness.models.reward_model import check_same_tokenizer, load_reward_model
    model, _, meta = load_reward_model(arg, on_meta=not loop.dist.is_main)
    check_same_tokenizer(meta, loop.tokenizer, f"loss.scorer={opts.scorer}")
    model = loop.dist.wrap(model.to(device).requires_grad_(False), train=False).eval()
    return RewardModelScorer(model, meta, opts.normalize_reward, loop.chunk, f"reward_model:{arg}")
