"""CI-only workaround: make the CUDA-built torchvision wheel importable next to the CPU torch (idempotent).

PyPI carries only CUDA builds of torchvision; their compiled extensions need ``libtorch_cuda.so``, so with the CPU
torch ``import torchvision`` fails (``operator torchvision::nms does not exist``). vLLM's LLaVA module imports
``torchvision.transforms.v2`` (pure torch) through pixtral. This script deletes the wheel's compiled extensions
and makes its two ``register_fake("torchvision::nms" / "qnms")`` calls conditional on the ops existing. Users
install torchvision from the PyTorch CPU index instead (``--index-url https://download.pytorch.org/whl/cpu``),
which this machine cannot reach. Run with the vLLM venv's python.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GUARD = 'if torchvision.extension._has_ops() else (lambda f: f))'


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed: nothing to do")
        return
    root = Path(spec.origin).parent
    for so in root.glob("*.so"):
        so.unlink()
        print(f"removed {so.name}")
    meta = root / "_meta_registrations.py"
    text = meta.read_text()
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")\n'
        new = f'@(torch.library.register_fake("torchvision::{op}") {GUARD}\n'
        text = text.replace(old, new)
    meta.write_text(text)
    print(f"guarded register_fake in {meta}")


if __name__ == "__main__":
    main()
