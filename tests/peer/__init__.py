"""Peer suite: transformers' own model tests run dense and with a keep-all vtprune session (README.md)."""
