#!/usr/bin/env bash
# The GPU benchmark in one run: prefill at the full LLaVA-1.5-7B, LLaVA-NeXT-7B and Qwen3-VL-8B shapes (random weights, fp16),
# with SDPA and, where the flash-attn package is installed, FlashAttention-2; then the Triton compaction kernels.
# Every number is a ratio to the dense model (or to the torch kernels) measured in the same run.
#
#     bash benchmarks/gpu.sh [OUT]        # OUT defaults to out/gpu; needs a CUDA GPU with ~24 GiB and vtprune installed
#     QUICK=1 bash benchmarks/gpu.sh      # small shapes, 2 repeats: checks the script end to end in a few minutes
#     QUICK=1 DEVICE=cpu bash benchmarks/gpu.sh /tmp/gpu-smoke   # the same check without a GPU (kernels part skipped)
#
# Writes OUT/<part>/bench.md (+ csv, json, png) for the `vtprune bench` parts and OUT/<part>.md for the others, and
# prints every table. Refuses an OUT that already holds results (delete it or pass another folder).
set -euo pipefail

OUT=${1:-out/gpu}
PY=${PYTHON:-python}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "benchmarks/gpu.sh: $OUT already holds results; pass another folder or delete it" >&2
    exit 2
fi
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA GPU visible to torch; run it on a GPU machine (or DEVICE=cpu QUICK=1 to check the script)")'
fi
mkdir -p "$OUT"

if [ "${QUICK:-0}" = 1 ]; then
    SHAPE=(--llm-layers 4 --llm-hidden 512 --vision-layers 2 --vision-hidden 256) REPEATS=2 DTYPE=float32
    QWEN3=(--llm-layers 4 --llm-hidden 256 --vision-layers 1 --vision-hidden 144)
else
    SHAPE=(--llm-layers 32 --llm-hidden 4096 --vision-layers 24 --vision-hidden 1024) REPEATS=5 DTYPE=float16
    QWEN3=(--llm-layers 36 --llm-hidden 4096 --vision-layers 27 --vision-hidden 1152)
fi
ATTNS=(sdpa)
if "$PY" -c 'import flash_attn' 2>/dev/null; then ATTNS+=(flash_attention_2); fi

{ if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
  echo "attention: ${ATTNS[*]}"; } | tee "$OUT/machine.txt"

for attn in "${ATTNS[@]}"; do
    echo "== LLaVA-1.5-7B shape (${SHAPE[*]}), $DTYPE, $attn"
    "$PY" -m vtprune bench --model llava-1.5-7b "${SHAPE[@]}" --dtype "$DTYPE" --device "$DEVICE" --attn "$attn" \
        --methods vtc-cls random visionzip fastv:layer=2 dart transprune:preset=high pyramiddrop:preset=avg64 \
        pyramiddrop:preset=avg128 pyramiddrop:preset=avg192 \
        --budgets 64 128 192 --repeats "$REPEATS" --new-tokens 32 --out "$OUT/llava15-$attn"

    echo "== LLaVA-NeXT-7B shape (${SHAPE[*]}), one 672x672 anyres image (2928 visual tokens), $DTYPE, $attn"
    "$PY" benchmarks/prefill_anyres.py "${SHAPE[@]}" --dtype "$DTYPE" --device "$DEVICE" --attn "$attn" \
        --repeats "$REPEATS" | tee "$OUT/next-$attn.md"

    echo "== Qwen3-VL-8B shape (${QWEN3[*]}), a 2,024-token image and a 32-frame video, $DTYPE, $attn"
    "$PY" -m vtprune bench --model qwen3-vl-image qwen3-vl-video "${QWEN3[@]}" --dtype "$DTYPE" --device "$DEVICE" \
        --attn "$attn" --methods pool divprune fastv:layer=2 --budgets 0.25 0.1 --repeats "$REPEATS" --new-tokens 32 \
        --out "$OUT/qwen3vl-$attn"
done

if [ "$DEVICE" = cuda ]; then
    echo "== Triton compaction kernels vs torch"
    "$PY" benchmarks/triton_kernels.py --e2e | tee "$OUT/kernels.md"
fi
