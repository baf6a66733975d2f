"""Start-up time of the ``tokprune`` command against importing torch, on this machine, in one run.

    python benchmarks/cli_startup.py          # writes benchmarks/results/cpu-amd-epyc-2c/cli-startup.{md,json}

``tokprune --version``, ``tokprune -h`` and argument errors import neither torch nor transformers (the
subcommands import them once their arguments are checked), so the command should answer faster than
``python -c "import torch"`` alone: the goal is a ratio below 1. Each command runs ``--repeats`` times in turn
(round robin, so a busy machine slows both alike); the table gives the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "cpu-amd-epyc-2c" / "cli-startup"


def commands() -> dict[str, list[str]]:
    """What is timed: the installed console script (``python -m tokprune.cli`` when it is not on PATH)."""
    script = shutil.which("tokprune")
    cli = [script] if script else [sys.executable, "-m", "tokprune.cli"]
    return {"tokprune --version": [*cli, "--version"], "tokprune -h": [*cli, "-h"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"]}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, float]:
    """Median seconds of each command over ``repeats`` round-robin runs (after one untimed warm-up run each)."""
    cmds = commands()
    for cmd in cmds.values():
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            times[name].append(wall(cmd))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    medians = measure(args.repeats)
    torch_s = medians['python -c "import torch"']
    ratio = medians["tokprune --version"] / torch_s
    device = f"{platform.processor() or platform.machine()}, {platform.system()}, Python {platform.python_version()}"
    lines = [f"# `tokprune` start-up against `import torch` ({device}; medians of {args.repeats} round-robin runs)",
             "", "| command | median s | ratio to import torch |", "|---|---|---|"]
    lines += [f"| `{name}` | {s:.3f} | {s / torch_s:.2f} |" for name, s in medians.items()]
    lines += ["", f"ratio `tokprune --version` / `import torch`: **{ratio:.2f}** (goal: below 1)"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"device": device, "repeats": args.repeats, "median_s": medians,
                                                    "ratio_version_to_torch": ratio}, indent=2) + "\n",
                                        encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
