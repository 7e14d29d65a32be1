"""The gold-reward table: programmatic scorers fn(prompt, completion) -> float.

Evaluation (scripts/evaluate.py --gold NAME), judging (--judge gold:NAME), the reward model's
binned ratings (loss.rating_source) and PPO's logged gold reward look scorers up here by name.
A scorer registers itself with `@register_gold_reward("name")` from its own module; the built-in
ones are imported by name on first use (BUILTIN), so this table imports none of them.
"""

import importlib
from typing import Callable

from harness import registry

GoldReward = Callable[[str, str], float]
GOLD_REWARDS: dict[str, GoldReward] = {}
# built-in scorers: name -> the module that registers it (imported on first lookup)
BUILTIN = {"toy": "harness.data.toy_task"}

# decorator: @register_gold_reward("name") makes `fn(prompt, completion) -> float` available as
# get_gold_reward(name)
register_gold_reward = registry.decorator(GOLD_REWARDS, "gold reward")


def get_gold_reward(name: str) -> GoldReward:
    if name not in GOLD_REWARDS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in GOLD_REWARDS:
        raise KeyError(f"unknown gold reward {name!r}; registered: "
                       f"{sorted(set(GOLD_REWARDS) | set(BUILTIN))}")
    return GOLD_REWARDS[name]


def check_scorer(key: str, name: str) -> GoldReward:
    """A registered gold scorer, or an error naming the config key that asked for it."""
    try:
        return get_gold_reward(name)
    except KeyError as e:
        raise ValueError(f"{key}={name!r}: {e.args[0]}") from None
