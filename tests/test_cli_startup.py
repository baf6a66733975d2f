"""A fast and talkative CLI: ``--version``, ``-h`` and argument errors import neither torch nor transformers
(checked in a fresh interpreter), ``tokprune demo`` prints each step as it is done, and a hub model with no
network fails at once with one line (an unreachable endpoint, ``HF_HUB_OFFLINE`` unset)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokprune.cli import main
from tokprune.reference import names

HEAVY = ("torch", "transformers")


def _imports_after(argv: list[str]) -> tuple[int, list[str], str]:
    code = ("import sys\nfrom tokprune.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', "
            "'transformers') and '.' not in m), file=sys.stderr)\nsys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    heavy = next(line for line in run.stderr.splitlines() if line.startswith("HEAVY"))
    return run.returncode, eval(heavy[len("HEAVY "):]), run.stdout + run.stderr  # noqa: S307 (our own list)


@pytest.mark.parametrize("argv", [["--version"], ["-h"], ["flops", "-h"], ["eval", "-h"], ["tune", "-h"],
                                  ["demo", "--keep", "0"], ["flops", "--config", "llava-1.5-7b", "--keep", "x"],
                                  ["eval", "--model", "m", "--tasks", "shapes", "--keep", "8,8", "--out", "o"],
                                  ["nosuch"]])
def test_version_help_and_argument_errors_import_no_torch(argv: list[str]) -> None:
    rc, heavy, out = _imports_after(argv)
    assert rc in (0, 2), out
    assert heavy == [], f"{argv} imported {heavy}"


def test_the_tune_command_lists_the_samplers_of_the_tuner() -> None:
    from tokprune.commands import tune as command
    from tokprune.eval import tune

    assert command.SAMPLERS == tune.SAMPLERS


@pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")
def test_demo_prints_each_step_as_it_is_done(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tokprune.reference import evaluate

    seen: list[str] = []  # what was printed before each pass over the samples
    real = evaluate.predict

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(capsys.readouterr().out)
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "predict", spy)
    assert main(["demo", "--samples", "10", "--show", "0"]) == 0
    assert len(seen) == 3  # cls, random, unpruned
    assert "loading torch, transformers and llava-shapes" in seen[0] and "demo: llava-shapes" in seen[0]
    assert seen[1].startswith("cls        : accuracy")
    assert seen[2].startswith("random     : accuracy")
    assert capsys.readouterr().out.startswith("unpruned   : accuracy")


def test_a_hub_model_without_network_fails_at_once_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    for argv in (["eval", "--model", "nobody/no-such-model", "--tasks", "shapes", "--out", str(tmp_path / "o")],
                 ["show", "--model", "nobody/no-such-model", "--out", str(tmp_path / "k.png")]):
        run = subprocess.run([sys.executable, "-m", "tokprune.cli", *argv], capture_output=True, text=True, env=env,
                             timeout=600)
        err = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(err) == 1, run.stderr
        assert "the hub (http://127.0.0.1:9) cannot be reached" in err[0] and "HF_HUB_OFFLINE=1" in err[0]


def test_the_probe_reads_the_cache_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprune import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    calls: list[dict[str, Any]] = []

    def loader(name: str, **kwargs: Any) -> str:
        calls.append(kwargs)
        return "cached"

    assert hub.unreachable("http://127.0.0.1:9") is not None
    assert hub.load(loader, "someone/cached-model", dtype="x") == "cached"
    assert calls == [{"local_files_only": True, "dtype": "x"}]  # never a network try with its retries


def test_the_probe_goes_through_the_proxy_requests_would_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprune import hub

    monkeypatch.setenv("HTTPS_PROXY", "127.0.0.1:9")
    hub.unreachable.cache_clear()
    try:
        why = hub.unreachable("https://huggingface.co")
    finally:
        hub.unreachable.cache_clear()
    assert why is not None and "through the proxy 127.0.0.1:9" in why
