#!/usr/bin/env bash
# CI eval step (called by .ci/run after the main tests): lmms-eval installed the lean way into .venv-ci so the CPU
# torch stays (see docs/eval.md), then the tokprune.eval tests, this time with lmms-eval, datasets and matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
HF_DATASETS_CACHE="$(mktemp -d)"
export HF_DATASETS_CACHE
. .venv-ci/bin/activate
python -m pip install -q -e ".[eval]"
# what lmms-eval's evaluator, tasks and CLI import; filelock<4: 0.7.3 imports filelock._api, gone in filelock 4
python -m pip install -q accelerate evaluate loguru pytablewriter pytz sacrebleu tenacity "filelock<4"
python -m pip install -q --no-deps lmms-eval==0.7.3   # its declared deps would replace CPU torch with a CUDA one
python -m pip uninstall -y -q torchvision 2>/dev/null || true
python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
python -m pytest -q -p no:cacheprovider tests/test_eval.py tests/test_eval_lmms.py
