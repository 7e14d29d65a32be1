"""Evaluation: statistics (z, intervals, win rates), gold-reward evaluation, sweep summaries."""
