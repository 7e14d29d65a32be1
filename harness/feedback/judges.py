"""Judges that label a pair (instruction, output_1, output_2) with a preference in [1, 2].

    judge = make_judge("llm", args)          # any OpenAI-compatible endpoint, both orders
    judge = make_judge("gold:toy", args)     # a registered gold reward (harness.data.gold)
    judge = make_judge("reward_model:RUN", args)  # a loss=reward checkpoint (harness.models.reward_model)

A judge splits a pair into independent units of work (`units`: the two presentation orders
for an LLM, one scoring for a reward), judges each unit (`judge_unit`, which may raise
openai_client.GaveUp: the unit is then recorded as failed, never guessed) and combines the
unit records into one preference (`combine`). Units are what the labeller's results log
records, so a killed run redoes at most the units in flight. New judges register with
@register_judge(NAME); `--judge NAME:ARG` passes ARG to the factory.
"""

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from harness import registry
from harness.checkpoints import REPO_ROOT
from harness.data.dialogue import human_prompt
from harness.data.gold import get_gold_reward
from harness.feedback.openai_client import RetryableError, choice_of, usage_of

TEMPLATE_DIR = REPO_ROOT / "assets" / "judge_templates"
PLACEHOLDERS = ("{instruction}", "{output_a}", "{output_b}")
JUDGES = {}


register_judge = registry.decorator(JUDGES, "judge")


def make_judge(spec: str, args):
    """A judge from 'NAME' or 'NAME:ARG' (e.g. llm, gold:toy, reward_model:RUN/LATEST)."""
    name, _, arg = spec.partition(":")
    if name not in JUDGES:
        raise ValueError(f"unknown judge {spec!r}; registered judges: {sorted(JUDGES)} "
                         "(use e.g. --judge llm or --judge gold:toy)")
    return JUDGES[name](arg or None, args)


# ---------------------------------------------------------------- prompt templates

@dataclass(frozen=True)
class JudgeTemplate:
    system: str
    user: str
    answers: tuple[str, str]  # the letters naming the first and the second shown output
    source: str

    def messages(self, instruction: str, output_a: str, output_b: str) -> list[dict]:
        user = self.user
        # one pass, so an output containing "{output_b}" is never substituted again
        values = dict(zip(PLACEHOLDERS, (instruction, output_a, output_b)))
        user = re.sub("|".join(map(re.escape, PLACEHOLDERS)), lambda m: values[m.group(0)], user)
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": user}]

    def parse_user(self, text: str) -> dict | None:
        """Recover {instruction, output_a, output_b} from a rendered user message, found
        anywhere in `text` (a completions prompt has the system text around it); None if the
        text was not made from this template. The server's scripted judge uses it."""
        pattern, pos = "", 0
        for m in re.finditer("|".join(map(re.escape, PLACEHOLDERS)), self.user):
            pattern += re.escape(self.user[pos:m.start()]) + f"(?P<{m.group(0)[1:-1]}>.*)"
            pos = m.end()
        match = re.search(pattern + re.escape(self.user[pos:]), text, flags=re.DOTALL)
        return match.groupdict() if match else None


def load_template(name_or_path: str) -> JudgeTemplate:
    """A template by name (assets/judge_templates/NAME.json) or path: JSON with 'user' (holding
    {instruction}, {output_a}, {output_b}), optional 'system' and 'answers' (default A, B)."""
    path = Path(name_or_path)
    if not path.exists():
        path = TEMPLATE_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
        raise FileNotFoundError(f"judge template {name_or_path!r}: no such file or named "
                                f"template (named templates: {known})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("user"), str):
        raise ValueError(f"{path}: a judge template needs a 'user' string")
    missing = [p for p in PLACEHOLDERS if p not in raw["user"]]
    if missing:
        raise ValueError(f"{path}: 'user' lacks placeholder(s) {missing}")
    answers = tuple(raw.get("answers", ("A", "B")))
    if len(answers) != 2 or answers[0] == answers[1]:
        raise ValueError(f"{path}: 'answers' must be two different strings, got {answers}")
    return JudgeTemplate(raw.get("system", ""), raw["user"], answers, str(path))


# ---------------------------------------------------------------- verdicts

def verdict_from_text(text: str, answers: tuple[str, str]) -> float:
    """P(second shown output is better) from an answer like 'B', '(A)', 'Response B.'.

    Only the start of the answer counts: a judge that rambles first is unusable (retried)."""
    a, b = map(re.escape, answers)
    m = re.match(rf"[\s*(\[\"'#]*(?:(?i:response|output|answer|review)[\s:]*)?[(\[]?({a}|{b})(?!\w)",
                 text or "")
    if not m:
        raise RetryableError(f"garbage verdict (expected {answers[0]} or {answers[1]}): "
                             f"{(text or '')[:80]!r}")
    return 1.0 if m.group(1) == answers[1] else 0.0


def _first_token_alternatives(choice: dict) -> list[tuple[str, float]]:
    logprobs = choice.get("logprobs") or {}
    if isinstance(logprobs.get("content"), list) and logprobs["content"]:  # chat schema
        first = logprobs["content"][0]
        return [(t["token"], t["logprob"]) for t in first.get("top_logprobs") or []]
    tops = logprobs.get("top_logprobs")  # completions schema: [{token: logprob}] per position
    if isinstance(tops, list) and tops and isinstance(tops[0], dict):
        return list(tops[0].items())
    return []


def verdict_from_logprobs(choice: dict, answers: tuple[str, str]) -> float:
    """P(second shown output is better) = P(B) / (P(A) + P(B)) over the first answer token's
    top alternatives (tokens equal to a letter after stripping spaces), as AlpacaEval's
    weighted judges do. No mass on either letter = unusable answer (retried)."""
    import math
    mass = {answers[0]: 0.0, answers[1]: 0.0}
    for token, logprob in _first_token_alternatives(choice):
        if token.strip() in mass and logprob is not None:
            mass[token.strip()] += math.exp(logprob)
    total = mass[answers[0]] + mass[answers[1]]
    if total <= 0:
        raise RetryableError("garbage verdict: no top_logprobs for the answer letters "
                             f"{answers} (does the endpoint return logprobs?)")
    return mass[answers[1]] / total


# ---------------------------------------------------------------- judges

DISAGREEMENT_RULES = ("tie", "mean")


def combine_orders(p_first: float, p_swapped: float, rule: str = "tie") -> tuple[float, bool]:
    """(preference in [1, 2], disagreed) from two judgments of the same pair.

    p_first: P(output_2 is better) as judged with output_1 shown first.
    p_swapped: the same probability judged with the outputs shown in swapped order, already
        mapped back to output_2's side.
    Position bias shows as the two orders picking different winners (flagged either way). Rule
    "tie": such a pair is a tie (1.5), never resolved in favour of either order. Rule "mean"
    (balanced position calibration, Wang et al. 2023, "Large Language Models are not Fair
    Evaluators"): the mean decides even then, so a judge whose bias moves both orders' logprob
    verdicts alike keeps what it tells apart; hard text verdicts that disagree still average
    to exactly 1.5. Otherwise the preference is 1 + the mean of the two probabilities (a hard
    verdict gives exactly 1 or 2).
    """
    if rule not in DISAGREEMENT_RULES:
        raise ValueError(f"order-disagreement rule {rule!r}: expected one of {DISAGREEMENT_RULES}")
    for p in (p_first, p_swapped):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a judged probability must be in [0, 1], got {p}")
    disagreed = (p_first - 0.5) * (p_swapped - 0.5) < 0
    if disagreed and rule == "tie":
        return 1.5, True
    return 1.0 + (p_first + p_swapped) / 2, disagreed


ORDERS = ("ab", "ba")  # ab: output_1 shown as A; ba: swapped


@register_judge("llm")
class LLMJudge:
    """An LLM behind an OpenAI-compatible endpoint, asked in both orders."""
    units = ORDERS

    def __init__(self, arg, args):
        from harness.feedback.openai_client import client_from_args
        if not args.judge_base_url or not args.judge_model:
            raise ValueError("--judge llm needs --judge-base-url and --judge-model")
        self.template = load_template(args.template)
        self.model, self.endpoint, self.verdict = args.judge_model, args.endpoint, args.verdict
        self.max_tokens = 1 if self.verdict == "logprobs" else args.judge_max_tokens
        self.disagreement = args.orders_disagree  # how results combine, not what is asked
        self.client = client_from_args(args, args.judge_base_url)
        self.name = f"llm:{self.model}"
        self.config = {"judge": "llm", "model": self.model, "endpoint": self.endpoint,
                       "verdict": self.verdict, "max_tokens": self.max_tokens,
                       "template": [self.template.system, self.template.user,
                                    list(self.template.answers)]}

    def _request(self, client, messages):
        params = {"max_tokens": self.max_tokens, "temperature": 0}
        if self.endpoint == "chat":
            if self.verdict == "logprobs":
                params.update(logprobs=True, top_logprobs=5)
            answer = client.chat(self.model, messages, **params)
            choice = choice_of(answer)
            text = (choice.get("message") or {}).get("content")
        else:  # completions: the messages as one plain prompt
            if self.verdict == "logprobs":
                params["logprobs"] = 5
            prompt = "\n\n".join(m["content"] for m in messages) + "\n"
            answer = client.completion(self.model, prompt, **params)
            choice = choice_of(answer)
            text = choice.get("text")
        p = verdict_from_logprobs(choice, self.template.answers) if self.verdict == "logprobs" \
            else verdict_from_text(text, self.template.answers)
        return p, text, usage_of(answer)

    def judge_unit(self, pair: dict, unit: str, on_retry=None) -> dict:
        first, second = (pair["output_1"], pair["output_2"]) if unit == "ab" else \
            (pair["output_2"], pair["output_1"])
        messages = self.template.messages(pair["instruction"], first, second)
        (p_second, text, usage), attempts = self.client.call(
            lambda client: self._request(client, messages), on_retry)
        p_output_2 = p_second if unit == "ab" else 1.0 - p_second
        return {"p_output_2": p_output_2, "raw_completion": (text or "")[:200],
                "prompt_tokens": usage[0], "completion_tokens": usage[1], "attempts": attempts}

    def combine(self, records: dict) -> tuple[float, bool]:
        return combine_orders(records["ab"]["p_output_2"], records["ba"]["p_output_2"],
                              self.disagreement)


class ScoreJudge:
    """Labels by comparing a scalar score of each output (gold reward, reward model): no
    position bias, so one unit per pair; equal scores are a tie."""
    units = ("score",)

    def scores(self, prompt: str, outputs: list[str]) -> list[float]:
        raise NotImplementedError

    def judge_unit(self, pair: dict, unit: str, on_retry=None) -> dict:
        # the prompt the prefs loader trains on
        r1, r2 = self.scores(human_prompt(pair["instruction"]),
                             [" " + pair["output_1"], " " + pair["output_2"]])
        p = 1.0 if r2 > r1 else 0.0 if r1 > r2 else 0.5
        return {"p_output_2": p, "score_1": r1, "score_2": r2, "prompt_tokens": 0,
                "completion_tokens": 0, "attempts": 1}

    def combine(self, records: dict) -> tuple[float, bool]:
        return 1.0 + records["score"]["p_output_2"], False


@register_judge("gold")
class GoldJudge(ScoreJudge):
    """A registered gold reward (harness.data.gold), e.g. --judge gold:toy."""

    def __init__(self, arg, args):
        self.reward = get_gold_reward(arg or "toy")
        self.name = f"gold:{arg or 'toy'}"
        self.config = {"judge": self.name}

    def scores(self, prompt, outputs):
        return [self.reward(prompt, o) for o in outputs]


@register_judge("reward_model")
class RewardModelJudge(ScoreJudge):
    """A reward-model checkpoint trained with loss=reward: --judge reward_model:RUN_OR_CKPT_DIR.
    Outputs are re-tokenised with the reward model's own tokenizer (RewardFunction)."""

    def __init__(self, arg, args):
        if not arg:
            raise ValueError("--judge reward_model:PATH needs the reward model's run dir or "
                             "checkpoint dir")
        from harness.models.reward_model import RewardFunction
        self.fn = RewardFunction(arg)
        self._lock = threading.Lock()  # the labeller's threads share one model: one forward at a time
        self.name = f"reward_model:{arg}"
        self.config = {"judge": "reward_model", "meta": self.fn.meta,
                       "path": str(Path(arg).resolve())}

    def scores(self, prompt, outputs):
        with self._lock:
            return self.fn([prompt] * len(outputs), outputs)
