"""lmms-eval task folders shipped with vtprune; pass this folder as `--include_path`."""
