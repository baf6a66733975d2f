#!/usr/bin/env bash
# The main CPU speed tables of issue #28 for a QUIET machine: every registered method on both proxies, medians of
# exactly 5 round-robin rounds (no time budget cuts rounds short), plus one profile per method kind.
#
#   bash benchmarks/cpu_tables.sh --estimate   # ~1 min: times one unpruned prefill per proxy, prints the run time
#   bash benchmarks/cpu_tables.sh              # the run: writes benchmarks/results/cpu-<cpu>-<cores>c-quiet/
#   TOKPRUNE_BENCH_TINY=1 OUT=/tmp/x bash benchmarks/cpu_tables.sh   # seconds: tiny configs, checks the script only
#
#   1. LLaVA-1.5-7B proxy (full CLIP-L/336, LLM 4 of 32 layers, 95 text + 576 visual tokens, fp32, batch 1):
#      keep 192/128/64; catp on its own 5-image few-shot prompt (speed-<tag>-icl).
#   2. Qwen2.5-VL-7B proxy (1024x1024 image = 1369 visual tokens, LLM 4 of 28, ViT 4 of 32 blocks): keep_ratio
#      0.5/0.25/0.125 (cls / vtc_cls need a [CLS] token: their rows say so).
#   3. README-snippet.md: the Speed table ready to paste.
# The estimate: rounds x (1 + sum over cases of the case's analytic FLOPs ratio + the same for each distinct schedule
# the cost bound replays, + 1 for the unpruned replay) x the measured unpruned prefill, per proxy (catp's few-shot
# prompt counted as 5 images); a quiet Xeon 2-core takes 4.9 s (LLaVA proxy) and 11.4 s (Qwen proxy) per unpruned
# prefill. Run it only on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ROUNDS=${TOKPRUNE_ROUNDS:-5}
if [[ "${TOKPRUNE_BENCH_TINY:-0}" == 1 ]]; then
    NAME=tiny-check
    LLAVA=(--config tiny-llava --llm-layers 4 --keep 8,4 --n-text 10)
    QWEN=(--config tiny-qwen2.5-vl --llm-layers 4 --vision-layers 2 --keep-ratio 0.5,0.25 --n-text 10)
    ROUNDS=1
else
    NAME=$($PY -c "from tokprune.eval.speed import cpu_model; import os, re
print(re.sub(r'[^a-z0-9]+', '-', cpu_model().lower()).strip('-') + f'-{os.cpu_count()}c-quiet')")
    LLAVA=(--config llava-1.5-7b --llm-layers 4 --keep 192,128,64 --n-text 95 --icl-images 5)
    QWEN=(--config qwen2.5-vl-7b --llm-layers 4 --vision-layers 4 --keep-ratio 0.5,0.25,0.125 \
          --image-size 1024x1024 --n-text 95)
fi
OUT=${OUT:-benchmarks/results/cpu-$NAME}

if [[ "${1:-}" == "--estimate" ]]; then
    $PY - "$ROUNDS" <<'PYEOF'
import sys, time, torch, tokprune
from tokprune import configs, flops
from tokprune.eval.proxy import reduce_depth
rounds, total = int(sys.argv[1]), 0.0
for name, budgets, llm, vis, size, icl in [
        ("llava-1.5-7b", [dict(keep=k) for k in (192, 128, 64)], 4, None, None, 5),
        ("qwen2.5-vl-7b", [dict(keep_ratio=r) for r in (0.5, 0.25, 0.125)], 4, 4, (1024, 1024), 0)]:
    cfg, _ = reduce_depth(configs.load(name), llm, vis)
    model = configs.build_model(cfg, "cpu", torch.float32)
    inputs = configs.example_inputs(model.config, n_text=95, image_size=size)
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
        t0 = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        unit = time.perf_counter() - t0
    units, replays = 1.0, {}
    for m in tokprune.methods():
        for b in budgets:
            try:
                s = tokprune.api.schedule(cfg, m, image_size=size, **b)
                r = flops.for_budget(cfg, schedule=s, n_text=95, image_size=size).ratio()
            except Exception:
                continue  # refused on this family: the row is an error, no prefill
            n = icl if (m == "catp" and icl) else 1
            units += n * r
            key = (n, tuple(s.plan()))
            replays[key] = n * r  # a replay of this schedule costs about what a pruned prefill does
    if icl:
        units += 2 * icl  # the unpruned few-shot prompt and its replay
    # the cost bound (tokprune.eval.cost): one replay per distinct LLM token schedule per round (a prefill at the
    # schedule's FLOPs ratio, at most) plus the unpruned schedule's replay (the check); probe / encoder pieces timed
    # alone take seconds and are left out
    units += 1 + sum(replays.values())
    del model
    secs = rounds * units * unit
    total += secs
    print(f"{name} proxy: one unpruned prefill {unit:.1f} s here; {rounds} rounds x {units:.1f} prefill units "
          f"(cases and their schedules' replays) = ~{secs / 60:.0f} min")
print(f"estimated run time (this machine, as loaded now): ~{total / 60:.0f} min, plus ~2 min of model builds "
      "and profiles")
PYEOF
    exit 0
fi

mkdir -p "$OUT"
START=$(date +%s)
echo "== tokprune CPU tables -> $OUT ($ROUNDS rounds per case; $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo "== 1/3 LLaVA-1.5-7B proxy"
$PY benchmarks/speed.py "${LLAVA[@]}" --min-repeats "$ROUNDS" --max-repeats "$ROUNDS" --warmup 1 --profile \
    --out "$OUT"
echo "== 2/3 Qwen2.5-VL-7B proxy"
$PY benchmarks/speed.py "${QWEN[@]}" --min-repeats "$ROUNDS" --max-repeats "$ROUNDS" --warmup 1 --icl-methods "" \
    --out "$OUT"
echo "== 3/3 README snippet"
$PY -c "import sys, glob; from tokprune.eval.speed import readme_snippet
print(readme_snippet(sorted(glob.glob(sys.argv[1] + '/speed-*.json'))))" "$OUT" > "$OUT/README-snippet.md"
cat "$OUT/README-snippet.md"
echo "== done in $(( $(date +%s) - START ))s"
