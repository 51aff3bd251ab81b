"""The vtprune_toy_vqa task folder (YAML, lmms-eval utils, documents)."""
