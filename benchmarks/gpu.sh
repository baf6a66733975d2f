#!/usr/bin/env bash
# The GPU tables of issue #16 in one command: real full-depth LLaVA-1.5-7B and Qwen2.5-VL-7B, random weights, bf16,
# batch 1 and 8 (~8-10 min on an H100/H200 class GPU, about half of it building random-weight models; ~40 GB of GPU
# memory at most).
#
#   bash benchmarks/gpu.sh                          # writes benchmarks/results/<gpu>/ (name from the device)
#   bash benchmarks/gpu.sh bench speed              # only some steps (bench, speed, syncs, kernels), e.g. to stay
#   bash benchmarks/gpu.sh syncs kernels            #   under a per-command time limit; the README snippet is always made
#   TOKPRUNE_BENCH_TINY=1 OUT=/tmp/x bash benchmarks/gpu.sh   # no GPU: tiny configs on the CPU, checks the script
#
# Per model and batch size:
#   bench-<model>-b<B>.{json,md}   tokprune bench: prefill, TTFT, decode tok/s, KV cache, peak memory, select ms
#                                  (every method at keep 192/128/64; Qwen: keep_ratio 0.5/0.25/0.125, 1024x1024)
#   speed-<model>[-b8].{json,md}   prefill speed-up against the analytic bound, scoring + selection share of the
#                                  prefill and of the vision encoder (round-robin medians)
#   profile-<model>.md, trace-*.json.gz   one profiled prefill per method kind (batch 1)
#   syncs.md                       host syncs tokprune's code runs per method on this device (tiny models)
#   kernels_cuda.{json,md}         benchmarks/kernel_speed.py: Triton vs the PyTorch chain at real shapes (needs triton)
#   speed-<model>[-b8]-icl.*       the few-shot methods (catp) on a 5-image prompt (LLaVA; speed.py --icl-methods)
#   peers.{json,md}                benchmarks/peers.py: tokprune vs the methods' own eager-attention style (FasterVLM,
#                                  VTC-CLS, FastV, LightCompress) at 576 and 2880 visual tokens, batch 1/4/8, with
#                                  equal kept sets and logits checked and peak memory per case in a fresh process
# Methods: every registered one (speed.py and bench default to tokprune.methods(); none is named here).
# Under a 10-minute per-command limit run it as two calls (unmeasured estimate: each < 10 min on an H100):
#   bash benchmarks/gpu.sh speed peers      # every method against its bound + the peer comparison
#   bash benchmarks/gpu.sh bench syncs kernels
#   README-snippet.md              the README "Speed" table
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=" ${*:-bench speed syncs kernels peers} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
if [[ "${TOKPRUNE_BENCH_TINY:-0}" == 1 ]]; then
    NAME=${TOKPRUNE_GPU_NAME:-tiny-check}
    DEV=(--device cpu --dtype float32)
    LLAVA=tiny-llava; QWEN=tiny-qwen2.5-vl; QSIZE=()
    KEEP=8,4; RATIOS=0.5,0.25; BATCHES=(1 2)
    BENCH_RUNS=(--warmup 0 --repeats 1 --new-tokens 2); SPEED_RUNS=(--min-repeats 1 --max-repeats 1 --warmup 0)
    KERNELS=(--cpu --repeats 2 --warmup 1)
    PEERS=(--quick --no-memory)
else
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device (set TOKPRUNE_BENCH_TINY=1 for the CPU check)')"
    NAME=${TOKPRUNE_GPU_NAME:-$($PY -c "import re, torch
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")}
    DEV=(--device cuda --dtype bfloat16)
    LLAVA=llava-1.5-7b; QWEN=qwen2.5-vl-7b; QSIZE=(--image-size 1024x1024)
    KEEP=192,128,64; RATIOS=0.5,0.25,0.125; BATCHES=(1 8)
    BENCH_RUNS=(--warmup 2 --repeats 5 --new-tokens 16); SPEED_RUNS=(--min-repeats 5 --max-repeats 7 --warmup 2)
    KERNELS=()
    # peers: real CLIP-L/336 (24 layers), LLM 4 of 32 layers (FastV K = 2), every batch and scale, memory per case
    # in a fresh process (each builds the small proxy: seconds)
    PEERS=(--llm-layers 4 --vision-layers 24 --fastv-layer 2 --batches 1,4,8 --rounds 5)
fi
OUT=${OUT:-benchmarks/results/$NAME}
mkdir -p "$OUT"
# Qwen has no [CLS]: its cls rows are errors and bench exits 1; only an unpruned failure stops the run
unpruned_ok() { $PY -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['results'][0]['error'] or 0)" "$1"; }
echo "== tokprune GPU speed run -> $OUT ($(date -u '+%Y-%m-%d %H:%M UTC'))"
for B in "${BATCHES[@]}"; do
    if want bench; then
        echo "== tokprune bench, batch $B"
        $PY -m tokprune.cli bench --config "$LLAVA" --keep "$KEEP" --batch "$B" "${DEV[@]}" "${BENCH_RUNS[@]}" \
            --no-progress --out "$OUT/bench-$LLAVA-b$B.json"
        $PY -m tokprune.cli bench --config "$QWEN" --keep-ratio "$RATIOS" "${QSIZE[@]}" --batch "$B" "${DEV[@]}" \
            "${BENCH_RUNS[@]}" --no-progress --out "$OUT/bench-$QWEN-b$B.json" || unpruned_ok "$OUT/bench-$QWEN-b$B.json"
    fi
    if want speed; then
        echo "== speed-up against the analytic bound, batch $B"
        PROFILE=(); [[ "$B" == 1 ]] && PROFILE=(--profile)
        $PY benchmarks/speed.py --config "$LLAVA" --keep "$KEEP" --batch "$B" "${DEV[@]}" "${SPEED_RUNS[@]}" \
            "${PROFILE[@]}" --out "$OUT"
        $PY benchmarks/speed.py --config "$QWEN" --keep-ratio "$RATIOS" "${QSIZE[@]}" --batch "$B" "${DEV[@]}" \
            "${SPEED_RUNS[@]}" "${PROFILE[@]}" --icl-methods "" --out "$OUT"
    fi
done
if want syncs; then
    echo "== host syncs in the selection path on this device (tiny models: the code path is the same)"
    $PY -m tokprune.eval.syncs --config tiny-llava --config tiny-qwen2.5-vl --device "${DEV[1]}" --batch 2 \
        --out "$OUT/syncs.md" > /dev/null
fi
if want kernels; then
    echo "== kernels: Triton vs PyTorch"
    $PY benchmarks/kernel_speed.py "${KERNELS[@]}" --out "$OUT"
fi
if want peers; then
    echo "== tokprune vs reference-style eager-attention implementations (benchmarks/peers.py)"
    $PY benchmarks/peers.py "${PEERS[@]}" "${DEV[@]}" --out "$OUT"
fi
$PY -c "import sys, glob; from tokprune.eval.speed import readme_snippet
print(readme_snippet(sorted(glob.glob(sys.argv[1] + '/speed-*.json'))))" "$OUT" > "$OUT/README-snippet.md"
cat "$OUT/README-snippet.md"
echo "== done in $(( $(date +%s) - START ))s: $(ls "$OUT" | tr '\n' ' ')"
