#!/usr/bin/env bash
# The one script to run when a GPU is lent (docs/decode_attention.md, issue
# "current JAX" item 4). Prints one JSON line per measurement into $OUT (or
# ./gpu-bench) and a summary at the end; each step has its own time limit so
# one failure does not cost the rest.
#   bash benchmarks/gpu.sh            # after: pip install -e '.[cuda12,kernels]'
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"
MJ=${MUSICJAX:-musicjax}
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" >&2
  if timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    echo "ok   $name" >&2
  else
    echo "FAIL $name (rc $?; see $OUT/$name.log)" >&2
  fi
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
python -c 'import jax; print(jax.__version__, jax.devices())' >> "$OUT/gpu.txt" 2>&1
# Kernel bandwidth: ours (the wrapper auto picks) and the shipped kernels, at
# B = 1 and 8, 4k and 8k contexts, as % of HBM; then ours over block sizes.
for seq in 4096 8192; do
  step "decode_attention_s$seq" 300 $MJ bench decode-attention --batch 1,8 --seq $seq --shipped native
done
step decode_attention_sweep 300 $MJ bench decode-attention --batch 1,8 --seq 8192 --sweep --shipped none
# The LM's decode loop and training step on the GPU.
step lm_decode 300 $MJ bench lm-decode --config configs/lm/bench_tiny.py --frames 200,1000,4000
step lm_train 300 $MJ bench lm-train --config configs/lm/bench_tiny.py
# The paper-size LM (its config: bfloat16, remat 'dots'): one training step
# at batch 1 on the one GPU, and its memory plan.
step lm_train_3b 600 $MJ bench lm-train --config configs/lm/heartmula_3b.py \
  --config.data.batch_size=1
step lm_memory_3b 300 $MJ bench lm-memory --config configs/lm/heartmula_3b.py
echo "results in $OUT/" >&2
