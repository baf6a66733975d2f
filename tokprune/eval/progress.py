"""A progress bar for the long commands (bench, tune): tqdm when installed, else a one-line counter on stderr."""

from __future__ import annotations

import sys


class Progress:
    """``total`` steps labelled ``desc`` (e.g. "bench", "tune") counted in ``unit``; silent when not ``enabled``."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str) -> None:
        self.total, self.done, self.enabled, self.desc, self.bar = total, 0, enabled, desc, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        """One step done; ``label`` says which (or the best so far)."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r[{self.desc}] {self.done}/{self.total} {label}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
