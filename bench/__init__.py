"""Benchmarks: our engine and API against bare `model.generate`, concurrency,
image preprocessing and warm-up. Scripts, not tests; see docs/performance.md."""
