#!/usr/bin/env bash
# vLLM throughput of every servable method against unpruned on the real LLaVA-1.5-7B checkpoint, on a CUDA GPU
# (issue #27; integrations/vllm/bench/throughput.py with the checkpoint's weights, one fresh engine per method).
#
#   bash integrations/vllm/bench/gpu.sh                                  # llava-hf/llava-1.5-7b-hf, keep 64, bf16
#   CHECKPOINT=/data/llava-1.5-7b-hf KEEP=128 METHODS=cls,divprune bash integrations/vllm/bench/gpu.sh
#   TOKPRUNE_VLLM_BENCH_PROXY=1 METHODS=cls bash integrations/vllm/bench/gpu.sh   # no GPU: checks the script on the
#                                                                        # CPU proxy (random weights, tiny run)
#
# Needs, in the python on PATH (or PYTHON=...): vLLM 0.32 (CUDA build) with the plugin installed
# (pip install --no-deps -e . -e integrations/vllm), a CUDA GPU, and the checkpoint's weights on disk (a folder, or
# the Hugging Face cache: nothing is downloaded, HF_HUB_OFFLINE=1). It stops with the reason when one is missing.
# Writes integrations/vllm/bench/results/<gpu>/llava-1.5-7b-keep<KEEP>.md (OUT=... to change the folder).
# Cost (unmeasured estimate): about 1-2 min per engine on an H100 (load + CUDA graphs), 9 engines.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python}
KEEP=${KEEP:-64}
METHODS=${METHODS:-cls,vtc_cls,visionzip,hiprune,random,divprune,vispruner,downsample}
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

if [[ "${TOKPRUNE_VLLM_BENCH_PROXY:-0}" == 1 ]]; then
    OUT=${OUT:-$(mktemp -d)}
    ARGS=(--dtype bfloat16 --requests 2 --max-tokens 4 --repeats 1 --enforce-eager --kv-cache-bytes 1073741824
          --note "script check on the CPU proxy, not a measurement")
    NAME=proxy-check
else
    CHECKPOINT=${CHECKPOINT:-llava-hf/llava-1.5-7b-hf}
    NAME=$("$PY" - "$CHECKPOINT" <<'EOF'
import os
import re
import sys

ckpt = sys.argv[1]
try:
    import torch
    import vllm
    import tokprune_vllm  # noqa: F401
except ImportError as e:
    sys.exit(f"gpu.sh: {e.name} is not importable here; install vLLM 0.32 (CUDA) and the plugin in this python: "
             "pip install --no-deps -e . -e integrations/vllm")
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA GPU visible; on a CPU run TOKPRUNE_VLLM_BENCH_PROXY=1 (script check) or "
             "throughput.py without --checkpoint (the CPU proxy)")
if not vllm.__version__.startswith("0.32"):
    print(f"gpu.sh: vLLM {vllm.__version__}, the plugin is tested with 0.32", file=sys.stderr)
if os.path.isdir(ckpt):
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(ckpt)):
        sys.exit(f"gpu.sh: {ckpt} holds no weight files (*.safetensors / *.bin)")
else:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ckpt, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.model"])
    except Exception as e:  # noqa: BLE001  (any miss: the message says what to do)
        sys.exit(f"gpu.sh: the weights of {ckpt} are not on this machine ({type(e).__name__}); download them first "
                 f"(huggingface-cli download {ckpt}) or pass CHECKPOINT=/path/to/folder")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
EOF
)
    OUT=${OUT:-integrations/vllm/bench/results/$NAME}
    ARGS=(--checkpoint "$CHECKPOINT" --dtype bfloat16 --requests 64 --max-tokens 64 --repeats 5
          --note "real weights")
fi
mkdir -p "$OUT"
echo "vLLM throughput on $NAME: unpruned and $METHODS at keep $KEEP -> $OUT"
"$PY" integrations/vllm/bench/throughput.py --method "$METHODS" --keep "$KEEP" "${ARGS[@]}" \
    --out "$OUT/llava-1.5-7b-keep$KEEP.md"
