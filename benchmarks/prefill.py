"""Prefill time of dense vs pruned LLaVA-1.5-shaped models: now `vtprune bench` (vtprune/eval/bench.py), which also
reports the overhead-free bound, TTFT, end-to-end time, peak memory, KV cache and FLOPs, all as ratios to dense.

    python benchmarks/prefill.py                              # CLIP-L/336 tower, Llama 16 x 2048 (random weights)
    python benchmarks/prefill.py --llm-layers 4 --repeats 2   # quicker; any `vtprune bench` flag works
"""

import sys

from vtprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--model", "llava-1.5-7b", "--llm-hidden", "2048", "--llm-layers", "16", *sys.argv[1:]]))
