"""Bitune: bidirectional instruction-tuning for decoder-only language models."""

__version__ = "0.1.0"
