"""vLLM's own OpenAI-API tests, ported (see README.md)."""
