"""Evaluation: timing, benchmarks and the lmms-eval plugin. Uses only vtprune's public API."""
