#!/usr/bin/env bash
# The GPU tables of issues #16 and #28: real full-depth LLaVA-1.5-7B and Qwen2.5-VL-7B, random weights, bf16.
#
# TIME ESTIMATE, NOT A MEASUREMENT (no GPU figure exists yet; the per-step seconds below are guesses for one
# H100/H200-class GPU, mostly model building and the budgets given to each step; ~40 GB of GPU memory at most):
#
#   bash benchmarks/gpu.sh          # = "quick", ONE call, estimated ~8.5 min (< a 10-minute command): kernels
#                                   #   (~0.5 min) -> syncs (~0.5) -> peers: every reference style, batch 1/4/8 at 576
#                                   #   and 2880 tokens, equality checked, peak memory per case in a fresh process, 6
#                                   #   at once (~3) -> speed: batch 1, every method against its bounds (analytic and
#                                   #   measured cost bound), LLaVA and Qwen, profiles (~4.5; 60 s round budget each)
#   bash benchmarks/gpu.sh rest     # the optional SECOND call, estimated ~7.5 min: bench (prefill/TTFT/decode/KV,
#                                   #   batch 1 and 8, ~5), speed at batch 8 (~2.5)
#   bash benchmarks/gpu.sh all      # both (~16 min: does not fit one 10-minute command; set GPU_BUDGET_S=1200)
#   bash benchmarks/gpu.sh speed peers   # or any steps by name: kernels syncs speed peers bench speed8
#                                        #   peers-memory (peers' memory table alone, peers-memory.{json,md})
#   TOKPRUNE_BENCH_TINY=1 OUT=/tmp/x bash benchmarks/gpu.sh all   # no GPU: tiny configs on the CPU, checks the script
#
# Every step prints its elapsed seconds. A step whose estimate would take the call past GPU_BUDGET_S (default 570 s,
# under a 600 s command limit) is skipped with a line naming the call that runs it; TOKPRUNE_BENCH_TINY ignores it.
#
# Outputs (benchmarks/results/<gpu>/, name from the device):
#   kernels_cuda.{json,md}         Triton vs the PyTorch chain at real shapes, with a KEEP / REMOVE verdict per kernel
#                                  (issue #28: a kernel stays only where it is >= 2x faster at every shape)
#   syncs.md                       host syncs tokprune's code runs per method on this device (tiny models)
#   speed-<model>[-b8].{json,md}   prefill speed-up against the analytic bound, scoring + selection share
#   speed-<model>-icl.*            the few-shot methods (catp) on a 5-image prompt (LLaVA; speed.py --icl-methods)
#   peers.{json,md}                benchmarks/peers.py: tokprune vs the methods' own eager-attention style (FasterVLM,
#                                  VTC-CLS, VisionZip, HiPrune, VisPruner, FastV, LightCompress), kept sets and logits
#                                  checked equal; peak memory per case in a fresh process
#   bench-<model>-b<B>.{json,md}   ("rest") tokprune bench: prefill, TTFT, decode tok/s, KV cache, peak memory
#   profile-<model>.md, trace-*    one profiled prefill per method kind (batch 1, with speed)
#   README-snippet.md              the README "Speed" table
# Methods: every registered one (speed.py and bench default to tokprune.methods(); none is named here).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK="kernels syncs peers speed"  # peers before speed: speed's rounds are the part most likely to overrun
REST="bench speed8"
STEPS=" "
for a in ${*:-quick}; do
    case "$a" in
        quick) STEPS+="$QUICK " ;;
        rest) STEPS+="$REST " ;;
        all) STEPS+="$QUICK $REST " ;;
        kernels|syncs|speed|peers|bench|speed8|peers-memory) STEPS+="$a " ;;
        *) echo "gpu.sh: unknown step '$a' (quick, rest, all, or: $QUICK $REST)" >&2; exit 2 ;;
    esac
done
want() { [[ "$STEPS" == *" $1 "* ]]; }
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
BUDGET=${GPU_BUDGET_S:-570}
if [[ "${TOKPRUNE_BENCH_TINY:-0}" == 1 ]]; then
    NAME=${TOKPRUNE_GPU_NAME:-tiny-check}
    BUDGET=1000000
    DEV=(--device cpu --dtype float32)
    LLAVA=tiny-llava; QWEN=tiny-qwen2.5-vl; QSIZE=()
    KEEP=8,4; RATIOS=0.5,0.25; B8=2
    BENCH_RUNS=(--warmup 0 --repeats 1 --new-tokens 2); SPEED_RUNS=(--min-repeats 1 --max-repeats 1 --warmup 0)
    SPEED_BUDGET=(); ICL_BUDGET=()
    KERNELS=(--cpu --repeats 2 --warmup 1)
    PEERS=(--quick --no-memory); PEERS_MEM=(--quick --memory-settings llava-1.5:1)
else
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device (set TOKPRUNE_BENCH_TINY=1 for the CPU check)')"
    NAME=${TOKPRUNE_GPU_NAME:-$($PY -c "import re, torch
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")}
    DEV=(--device cuda --dtype bfloat16)
    LLAVA=llava-1.5-7b; QWEN=qwen2.5-vl-7b; QSIZE=(--image-size 1024x1024)
    KEEP=192,128,64; RATIOS=0.5,0.25,0.125; B8=8
    BENCH_RUNS=(--warmup 2 --repeats 5 --new-tokens 16); SPEED_RUNS=(--min-repeats 3 --max-repeats 7 --warmup 2)
    SPEED_BUDGET=(--budget-s 60); ICL_BUDGET=(--icl-budget-s 30)
    KERNELS=(--quick --repeats 30 --warmup 5)
    # peers: real CLIP-L/336 (24 layers), LLM 4 of 32 layers (FastV K = 2), every batch and scale; peak memory in
    # a fresh process per case (60 of them, ~10 s each: 6 at once, each reads its own max_memory_allocated)
    PEERS_MEM=(--llm-layers 4 --vision-layers 24 --fastv-layer 2 --batches 1,4,8 --memory-jobs 6)
    PEERS=("${PEERS_MEM[@]}" --rounds 3)
fi
OUT=${OUT:-benchmarks/results/$NAME}
mkdir -p "$OUT"
# Qwen has no [CLS]: its cls rows are errors and bench exits 1; only an unpruned failure stops the run
unpruned_ok() { $PY -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['results'][0]['error'] or 0)" "$1"; }
elapsed() { echo $(( $(date +%s) - START )); }
SKIPPED=()
# step NAME ESTIMATE_S: true if NAME was asked for and fits the budget (else says so and records it)
step() {
    want "$1" || return 1
    if (( $(elapsed) + $2 > BUDGET )); then
        echo "== SKIPPED $1: ${2}s estimated, $(elapsed)s used of ${BUDGET}s; run it as: bash benchmarks/gpu.sh $1"
        SKIPPED+=("$1")
        return 1
    fi
    STEP_T=$(date +%s)
    echo "== [$(elapsed)s] $1 (estimate ${2}s)"
}
done_step() { echo "== $1 took $(( $(date +%s) - STEP_T ))s ($(elapsed)s in)"; }
echo "== tokprune GPU speed run -> $OUT ($(date -u '+%Y-%m-%d %H:%M UTC')); steps:$STEPS; budget ${BUDGET}s"
if step kernels 30; then
    $PY benchmarks/kernel_speed.py "${KERNELS[@]}" --out "$OUT"
    done_step kernels
fi
if step syncs 30; then
    $PY -m tokprune.eval.syncs --config tiny-llava --config tiny-qwen2.5-vl --device "${DEV[1]}" --batch 2 \
        --out "$OUT/syncs.md" > /dev/null
    done_step syncs
fi
if step peers 180; then
    $PY benchmarks/peers.py "${PEERS[@]}" "${DEV[@]}" --out "$OUT"
    done_step peers
fi
if step speed 270; then  # batch 1, every method against its bound (two ~30 s builds, 60 s budgets, icl, profiles)
    $PY benchmarks/speed.py --config "$LLAVA" --keep "$KEEP" "${DEV[@]}" "${SPEED_RUNS[@]}" "${SPEED_BUDGET[@]}" \
        "${ICL_BUDGET[@]}" --profile --out "$OUT"
    $PY benchmarks/speed.py --config "$QWEN" --keep-ratio "$RATIOS" "${QSIZE[@]}" "${DEV[@]}" "${SPEED_RUNS[@]}" \
        "${SPEED_BUDGET[@]}" --profile --icl-methods "" --out "$OUT"
    done_step speed
fi
if step bench 300; then
    for B in 1 "$B8"; do
        $PY -m tokprune.cli bench --config "$LLAVA" --keep "$KEEP" --batch "$B" "${DEV[@]}" "${BENCH_RUNS[@]}" \
            --no-progress --out "$OUT/bench-$LLAVA-b$B.json"
        $PY -m tokprune.cli bench --config "$QWEN" --keep-ratio "$RATIOS" "${QSIZE[@]}" --batch "$B" "${DEV[@]}" \
            "${BENCH_RUNS[@]}" --no-progress --out "$OUT/bench-$QWEN-b$B.json" || unpruned_ok "$OUT/bench-$QWEN-b$B.json"
    done
    done_step bench
fi
if step speed8 150; then
    $PY benchmarks/speed.py --config "$LLAVA" --keep "$KEEP" --batch "$B8" "${DEV[@]}" "${SPEED_RUNS[@]}" \
        "${SPEED_BUDGET[@]}" --icl-methods "" --out "$OUT"
    $PY benchmarks/speed.py --config "$QWEN" --keep-ratio "$RATIOS" "${QSIZE[@]}" --batch "$B8" "${DEV[@]}" \
        "${SPEED_RUNS[@]}" "${SPEED_BUDGET[@]}" --icl-methods "" --out "$OUT"
    done_step speed8
fi
if step peers-memory 120; then
    $PY benchmarks/peers.py "${PEERS_MEM[@]}" "${DEV[@]}" --memory-only --out "$OUT"
    done_step peers-memory
fi
$PY -c "import sys, glob; from tokprune.eval.speed import readme_snippet
print(readme_snippet(sorted(glob.glob(sys.argv[1] + '/speed-*.json'))))" "$OUT" > "$OUT/README-snippet.md"
cat "$OUT/README-snippet.md"
echo "== done in $(elapsed)s: $(ls "$OUT" | tr '\n' ' ')"
if (( ${#SKIPPED[@]} )); then
    echo "== NOT RUN (budget ${BUDGET}s): ${SKIPPED[*]}; run: bash benchmarks/gpu.sh ${SKIPPED[*]}"
fi
