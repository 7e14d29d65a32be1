"""Data: sources (hub/local loaders, the dataset table), the dialogue template, tokens, packing, the toy task and the gold-reward table."""
