"""Parallelism: launching ranks (distributed) and applying TP / AC / compile / FSDP2 to a finished model (parallelize)."""
