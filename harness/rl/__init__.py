"""Online RL: the rollout loop (loop.py) and its methods: PPO, GRPO, RLOO, online DPO."""
