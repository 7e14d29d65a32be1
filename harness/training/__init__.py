"""What both training loops share: the single/sharded strategy, the schedule, run logging, the reference log-prob cache."""
