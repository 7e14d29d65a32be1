"""AI feedback: the OpenAI-compatible server engine, judges, the OpenAI client, resumable results, sample files."""
