"""A judged win rate against the reference during training (`eval_judge=`, off by default).

    python train.py loss=dpo eval_judge=gold:toy                      # a registered gold reward
    python train.py loss=dpo eval_judge.judge=llm eval_judge.base_url=http://127.0.0.1:8000/v1 \\
        eval_judge.model=judge eval_judge.template=toy eval_judge.api_key_env=OPENAI_API_KEY

At each evaluation the policy samples one completion for each of the first `n_prompts`
distinct eval prompts (keyed sampling: a completion depends on the seed and its prompt's index,
not on the batch); the reference's completions are sampled once, before training (the frozen
reference, the LoRA policy with adapters off, or the starting policy when the loss has no
reference), and kept in the run dir (judge/reference.jsonl), so a resumed run is judged against
the same ones. Each pair (output_1 = reference, output_2 = policy) goes through the judges of
scripts/label_ai_preferences.py: an LLM judge is asked in both orders (position-swapped; orders
that disagree make a tie) through the same OpenAI client, with its retries and redaction. A unit
that fails after its retries is counted as failed, never guessed. Metrics: judge_eval/win_rate
(ties count half), /ci_low, /ci_high, /wins, /losses, /ties, /failed; the pairs with their
verdicts in judge/step-N.jsonl.
"""

import json
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from harness.checkpoints import atomic_write_text
from harness.feedback.judges import make_judge
from harness.feedback.openai_client import GaveUp
from harness.feedback.sample_files import pair_id, strip_output
from harness.feedback.win_rate import win_rate
from harness.data.dialogue import instruction_of


@dataclass(frozen=True)
class JudgeEvalOptions:
    judge: str | None = None        # null: off; llm, gold:NAME or reward_model:RUN
    base_url: str | None = None     # llm: an OpenAI-compatible endpoint
    model: str | None = None        # llm: the judge model's name there
    api_key_env: str | None = None  # llm: the environment variable holding the key
    template: str = "default"       # llm: a judge template (assets/judge_templates) or file
    endpoint: str = "chat"          # llm: chat or completions
    verdict: str = "text"           # llm: the verdict from the answer text or its logprobs
    max_tokens: int = 8             # llm: the judge's answer length (verdict=text)
    api_version: str | None = None  # llm: Azure OpenAI's api-version
    n_prompts: int = 64             # eval prompts judged at each evaluation
    max_new_tokens: int = 64        # sampling, policy and reference alike
    temperature: float = 1.0
    concurrency: int = 8            # judge requests in flight
    max_attempts: int = 5
    timeout: float = 60.0

    def __post_init__(self):
        if self.judge is not None and not (isinstance(self.judge, str) and self.judge):
            raise ValueError(f"eval_judge.judge={self.judge!r}: a judge name such as llm or gold:toy")
        if self.judge == "llm" and not (self.base_url and self.model):
            raise ValueError("eval_judge.judge=llm needs eval_judge.base_url and eval_judge.model")
        for key in ("n_prompts", "max_new_tokens", "concurrency", "max_attempts", "max_tokens"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ValueError(f"eval_judge.{key}={getattr(self, key)!r} must be an integer >= 1")
        if not self.temperature >= 0 or not self.timeout > 0:
            raise ValueError("eval_judge.temperature must be >= 0 and eval_judge.timeout > 0")
        if self.endpoint not in ("chat", "completions") or self.verdict not in ("text", "logprobs"):
            raise ValueError("eval_judge.endpoint: chat|completions; eval_judge.verdict: text|logprobs")


def judge_options(value) -> JudgeEvalOptions:
    """The options of `eval_judge`: null, a judge name (shorthand), or a mapping of options."""
    if value is None or isinstance(value, str):
        return JudgeEvalOptions(judge=value)
    given = dict(value)
    known = {f.name for f in fields(JudgeEvalOptions)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"eval_judge.{unknown[0]} is not an option; options: {sorted(known)}")
    return JudgeEvalOptions(**given)


def check_eval_judge(value):
    """Refuse a bad eval_judge before any model loads: its options, the judge's name, an LLM
    judge's template and key variable."""
    from harness.feedback.judges import JUDGES, load_template
    from harness.feedback.openai_client import api_key_from_env
    options = judge_options(value)
    if options.judge is None:
        return
    if options.judge.partition(":")[0] not in JUDGES:
        raise ValueError(f"eval_judge.judge={options.judge!r}: registered judges are "
                         f"{sorted(JUDGES)} (e.g. llm, gold:toy, reward_model:RUN)")
    if options.judge == "llm":
        load_template(options.template)
        api_key_from_env(options.api_key_env)


class JudgedEval:
    def __init__(self, options: JudgeEvalOptions, run_dir, seed: int, prompt_suffix: str = ""):
        o = options
        args = types.SimpleNamespace(
            judge_base_url=o.base_url, judge_model=o.model, api_key_env=o.api_key_env,
            template=o.template, endpoint=o.endpoint, verdict=o.verdict,
            judge_max_tokens=o.max_tokens, max_attempts=o.max_attempts, timeout=o.timeout,
            backoff=1.0, backoff_max=60.0, organization=None, project=None, header=None,
            api_version=o.api_version, token_limit_param="auto", orders_disagree="tie")
        self.options, self.judge = o, make_judge(o.judge, args)
        self.folder, self.seed, self.suffix = Path(run_dir) / "judge", seed, prompt_suffix
        self.reference: dict[str, str] | None = None

    def _sample(self, model, tokenizer, prompts: list[str], synced: bool) -> list[str]:
        from harness.models.generation import SamplingConfig, sample
        o = self.options
        cfg = SamplingConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                             batch_size=16, seed=self.seed)
        keys = list(range(len(prompts))) if o.temperature > 0 else None
        return [strip_output(s.completion) for s in sample(
            model, tokenizer, prompts, cfg, progress=False, keys=keys, synced=synced)]

    def prepare(self, prompts: list[str], reference, tokenizer, synced: bool, is_main: bool):
        """The reference's completions: read back from the run dir, else sampled and kept."""
        self.prompts = list(dict.fromkeys(prompts))[:self.options.n_prompts]
        path = self.folder / "reference.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.reference = {r["prompt"]: r["completion"] for r in rows}
            return
        outs = self._sample(reference, tokenizer, self.prompts, synced)
        self.reference = dict(zip(self.prompts, outs))
        if is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                            for p, c in self.reference.items()))

    def _judge_pair(self, pair: dict) -> dict:
        if pair["output_1"] == pair["output_2"]:  # nothing to judge: a tie
            return {**pair, "preference": 1.5}
        records = {}
        for unit in self.judge.units:
            try:
                records[unit] = {"status": "ok", **self.judge.judge_unit(pair, unit)}
            except GaveUp as e:
                return {**pair, "preference": None, "error": e.errors[-1]}
        preference, disagreed = self.judge.combine(records)
        return {**pair, "preference": preference, "order_disagreement": disagreed}

    def evaluate(self, policy, tokenizer, step: int, synced: bool, is_main: bool) -> dict:
        """judge_eval/* metrics of the policy's completions against the reference's."""
        outs = self._sample(policy, tokenizer, [p + self.suffix for p in self.prompts], synced)
        if not is_main:
            return {}
        pairs = []
        for prompt, out in zip(self.prompts, outs):
            instruction, ref = instruction_of(prompt), self.reference[prompt]
            pairs.append({"id": pair_id(instruction, ref, out), "instruction": instruction,
                          "output_1": ref, "output_2": out, "generator_1": "reference",
                          "generator_2": f"policy@{step}"})
        with ThreadPoolExecutor(self.options.concurrency) as pool:
            rows = list(pool.map(self._judge_pair, pairs))
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / f"step-{step}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        rate = win_rate([r["preference"] for r in rows])
        keep = ("win_rate", "ci_low", "ci_high", "wins", "losses", "ties", "failed")
        return {f"judge_eval/{k}": v for k, v in asdict(rate).items() if k in keep}
