"""Online RL: the rollout loop and PPO."""
