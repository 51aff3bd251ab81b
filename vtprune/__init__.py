"""vtprune: drop the visual tokens a vision-language model does not need, without retraining."""

__version__ = "0.1.0"
