"""Models: loading and log-probs, LoRA, sampling and scoring, the reward model."""
