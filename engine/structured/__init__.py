"""Structured outputs: constrained decoding with llguidance (see compiler.py for why)."""
