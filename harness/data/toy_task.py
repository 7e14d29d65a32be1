"""A bundled toy preference task with a programmatic gold reward.

The task mimics the DPO paper's IMDb experiment at toy scale so the whole harness
runs offline on CPU: a prompt asks for a positive or negative review of a topic,

    "\\n\\nHuman: Write a positive review of the cafe for Anna.\\n\\nAssistant:"

and a response is 1-3 short template sentences such as " The cafe was lovely. I hated
the service." The gold reward reads the request (topic, polarity) back out of the
prompt and scores the completion:

    reward = 0.8 * polarity * mean(sentiment of sentiment-bearing words)
           + 0.2 * (mentions requested topic - mentions another topic)

which is graded and bounded in [-1, 1]. The "base" distribution picks sentiment
words and the topic at random regardless of the request, so its expected reward is
about 0; best-of-2 responses (the SFT targets) are better, and the optimum (all
strongest words of the requested polarity, right topic) is close to 1.
"""

import random
import re
from harness.data.dialogue import first_answer, human_prompt, last_human_turn
from harness.data.gold import register_gold_reward

# ---------------------------------------------------------------- vocabulary
# Small word lists keep the BPE vocabulary tiny, so a ~150k-parameter model
# can learn the language well and only the *choice* of words is left to learn.
TOPICS = ["cafe", "movie", "hotel", "book", "park", "concert", "museum", "restaurant",
          "game", "phone", "beach", "bakery", "garden", "library", "album", "festival"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
         "Kate", "Leo", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Omar"]
POLARITIES = {"positive": 1.0, "negative": -1.0}
REQUESTS = [
    "Write a {pol} review of the {topic} for {name}.",
    "{name} wants a {pol} review of the {topic}.",
    "Please give {name} a {pol} opinion about the {topic}.",
    "Describe the {topic} to {name} in a {pol} way.",
    "Tell {name} something {pol} about the {topic}.",
    "Can you write {name} a {pol} note about the {topic}?",
]

# Graded sentiment scores; each list is symmetric around 0 so uniform sampling
# (the base distribution) has mean sentiment 0.
ADJECTIVES = {
    "wonderful": 1.0, "excellent": 0.9, "great": 0.8, "lovely": 0.7, "good": 0.6,
    "pleasant": 0.5, "nice": 0.4, "decent": 0.3, "fine": 0.2, "okay": 0.1,
    "ordinary": 0.0, "average": 0.0,
    "plain": -0.1, "bland": -0.2, "mediocre": -0.3, "dull": -0.4, "poor": -0.5,
    "bad": -0.6, "ugly": -0.7, "horrible": -0.8, "awful": -0.9, "terrible": -1.0,
}
VERBS = {"loved": 1.0, "enjoyed": 0.7, "liked": 0.4, "visited": 0.0, "tried": 0.0,
         "disliked": -0.4, "resented": -0.7, "hated": -1.0}
OPENERS = {"happily": 0.8, "luckily": 0.5, "honestly": 0.0, "frankly": 0.0,
           "sadly": -0.5, "unfortunately": -0.8}
SENTIMENT = {**ADJECTIVES, **VERBS, **OPENERS}
DEGREES = ["very", "quite", "rather", "really", "truly"]  # intensity only, not scored
ASPECTS = ["service", "atmosphere", "price", "experience", "design", "staff"]

SENTIMENT_WEIGHT, TOPIC_WEIGHT = 0.8, 0.2
TOPIC_FOCUS_PROB = 0.5  # base responses talk about the requested topic half the time

# Fixed seeds: the data set must not change with the training seed.
_SPLIT_SEED, _SPLIT_SEEDS = 1234, {"train": 0, "test": 1}
DEFAULT_SIZES = {"train": 2000, "test": 200}
N_TEST_POOL = 400  # prompts held out for the test split (of 3840 in total)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ------------------------------------------------------------------- prompts
def all_prompts() -> list[str]:
    """Every prompt of the task (topic x polarity x request template x name)."""
    return [human_prompt(t.format(pol=pol, topic=topic, name=name))
            for topic in TOPICS for pol in POLARITIES for t in REQUESTS for name in NAMES]


def _prompt_pools() -> dict[str, list[str]]:
    """Split the prompt space once, so train and test prompts are disjoint by construction."""
    prompts = all_prompts()
    random.Random(_SPLIT_SEED).shuffle(prompts)
    return {"test": prompts[:N_TEST_POOL], "train": prompts[N_TEST_POOL:]}


def parse_request(prompt: str) -> tuple[str | None, float]:
    """(requested topic or None, polarity +1/-1 or 0 if unknown) of a prompt.

    Only the last human turn counts, so multi-turn or chained prompts still parse.
    """
    words = _words(last_human_turn(prompt))
    topic = next((w for w in words if w in TOPICS), None)
    polarity = next((POLARITIES[w] for w in words if w in POLARITIES), 0.0)
    return topic, polarity


# ----------------------------------------------------------------- responses
def _sentence(rng: random.Random, subject: str) -> str:
    """One template sentence about `subject` ("the cafe" or "it"), sentiment words at random."""
    adj = rng.choice(list(ADJECTIVES))
    kind = rng.randrange(6)
    if kind == 0:
        return f"{subject.capitalize()} was {adj}."
    if kind == 1:
        return f"{subject.capitalize()} was {rng.choice(DEGREES)} {adj}."
    if kind == 2:
        return f"The {rng.choice(ASPECTS)} was {adj}."
    if kind == 3:
        return f"I {rng.choice(list(VERBS))} {rng.choice([subject, 'the ' + rng.choice(ASPECTS)])}."
    if kind == 4:
        return f"{rng.choice(list(OPENERS)).capitalize()}, {subject} was {adj}."
    return f"We found {subject} {adj}."


def sample_response(rng: random.Random, prompt: str) -> str:
    """A response from the base distribution: sentiment ignores the request, and half
    the time the response talks about a random other topic. Starts with a space, no EOS."""
    topic, _ = parse_request(prompt)
    if topic is None or rng.random() >= TOPIC_FOCUS_PROB:
        topic = rng.choice([t for t in TOPICS if t != topic])
    first = _sentence(rng, f"the {topic}")  # later sentences may say "it" instead
    rest = [_sentence(rng, rng.choice(["it", f"the {topic}"])) for _ in range(rng.randrange(3))]
    return " " + " ".join([first, *rest])


# -------------------------------------------------------------- gold reward
@register_gold_reward("toy")
def gold_reward(prompt: str, completion: str) -> float:
    """Toy gold reward in [-1, 1]; see the module docstring for the formula.

    Robust to any model output: a completion that runs on into a new dialogue turn is
    cut there, and text without sentiment or topic words scores 0.
    """
    topic, polarity = parse_request(prompt)
    words = _words(first_answer(completion))
    scores = [SENTIMENT[w] for w in words if w in SENTIMENT]
    sentiment = sum(scores) / len(scores) if scores else 0.0
    mentioned = {w for w in words if w in TOPICS}
    on_topic = float(topic in mentioned) - float(bool(mentioned - {topic}))
    reward = SENTIMENT_WEIGHT * polarity * sentiment + TOPIC_WEIGHT * on_topic
    return max(-1.0, min(1.0, reward))


# ------------------------------------------------------------------ data set
def toy_records(split: str, n_prompts: int | None = None,
                n_responses: int = 2) -> dict[str, dict]:
    """Canonical preference records for the toy task.

    Returns {prompt: {"responses": [str], "pairs": [(win_idx, lose_idx)], "sft_target": str,
    "scores": [gold reward of each response]}}.
    Responses are base-model samples, pairs are ordered by gold reward (winner first,
    ties skipped) and the SFT target is the best response, as in the reference code
    where sft_target = chosen. Deterministic; train and test prompts are disjoint.
    """
    pools = _prompt_pools()
    if split not in pools:
        raise ValueError(f"unknown toy split {split!r}; choose from {sorted(pools)}")
    n_prompts = DEFAULT_SIZES[split] if n_prompts is None else n_prompts
    if not 0 < n_prompts <= len(pools[split]):
        raise ValueError(f"n_prompts must be in 1..{len(pools[split])} for split {split!r}")
    rng = random.Random(_SPLIT_SEEDS[split])
    records = {}
    for prompt in rng.sample(pools[split], n_prompts):
        responses = [sample_response(rng, prompt) for _ in range(n_responses)]
        rewards = [gold_reward(prompt, r) for r in responses]
        while len(set(rewards)) == 1:  # all tied: no preference to learn from, resample one
            responses[-1] = sample_response(rng, prompt)
            rewards[-1] = gold_reward(prompt, responses[-1])
        pairs = [(i, j) if rewards[i] > rewards[j] else (j, i)
                 for i in range(n_responses) for j in range(i + 1, n_responses)
                 if rewards[i] != rewards[j]]
        best = max(range(n_responses), key=rewards.__getitem__)
        records[prompt] = {"responses": responses, "pairs": pairs, "sft_target": responses[best],
                           "scores": rewards}
    return records


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """`n` full texts (prompt + base response, no EOS) for pretraining the tiny base model.

    Prompts come from the train pool only, so test prompts stay unseen by every model.
    """
    rng = random.Random(seed)
    pool = _prompt_pools()["train"]
    texts = []
    for _ in range(n):
        prompt = rng.choice(pool)
        texts.append(prompt + sample_response(rng, prompt))
    return texts
