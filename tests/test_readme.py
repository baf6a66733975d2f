"""Every code block of the README runs as written.

Each ```python block is executed on its own (so each must be self-contained); where a line ends in a comment that is
a Python literal (``tokprune.methods()  # ['cls', ...]``) the expression must equal it, and where a ``print(...)``
line's comment shows the output, the printed text must start with it. Each ``tokprune`` line of a ```bash block runs
through ``tokprune.cli.main`` in a scratch folder, with options appended that only make it faster (fewer samples,
one repeat), and must exit 0 and write the files it names; ``pip install`` and the test suite itself are skipped.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from tokprune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
#: appended to a README command line: the same command, smaller (argparse keeps the last value of an option)
FASTER = {
    "demo": ["--new-tokens", "2"],  # tiny models (--family); the reference models get --samples 20
    "bench": ["--n-text", "8", "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--no-progress"],
    "flops": [],
    "show": [],
    "eval": ["--limit", "20"],
    "report": [],
    "tune": ["--no-progress"],
}
SKIPPED = ("pip install", "python -m pytest")  # installs, and the suite this test belongs to
WRITES = ("--save", "--out", "--json")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def commands() -> list[str]:
    """Every command of the README's bash blocks (lines split at ``&&``, comments dropped)."""
    out = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            out += [c.strip() for c in line.split("#")[0].split("&&") if c.strip()]
    return out


def test_the_readme_has_code_to_check():
    assert len(code_blocks("python")) >= 3 and len(commands()) >= 6


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs_as_written(index, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = code_blocks("python")[index]
    namespace: dict = {}
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    for line in block.splitlines():
        code, _, comment = line.partition("  # ")
        code = code.strip()
        if not comment or code.startswith(("with ", "for ", "def ", "if ")):
            continue
        if code.startswith("print("):
            shown = comment.split(" (")[0].strip()
            assert shown in printed, f"README says {line.strip()!r}, it printed {printed!r}"
            continue
        try:
            expected = ast.literal_eval(comment.strip())
        except (ValueError, SyntaxError):
            continue  # a comment in words, not a value
        assert eval(code, namespace) == expected, f"README line {line.strip()!r}"


@pytest.mark.parametrize("command", commands())
def test_bash_command_runs_as_written(command, tmp_path, monkeypatch, capsys):
    if command.startswith(SKIPPED):
        pytest.skip("installs / the test suite itself")
    if command.startswith(("lmms-eval ", "accelerate launch ")):  # hub models (downloads), real tasks
        assert "llava-hf/" in command or "pretrained=..." in command, f"an lmms-eval line to test here: {command!r}"
        pytest.skip("lmms-eval on a hub model; the same CLI on a local task runs in tests/test_eval_lmms.py")
    argv = shlex.split(command)
    assert argv[0] == "tokprune", f"the README shows a command this test cannot run: {command!r}"
    if "--model" in argv and "/" in argv[argv.index("--model") + 1]:
        pytest.skip("a hub model: downloads weights, which this machine cannot (the README says so)")
    monkeypatch.chdir(tmp_path)  # --save / --out land in a scratch folder
    sub = argv[1]
    extra = [] if sub.startswith("-") else FASTER[sub]
    if sub == "demo" and "--family" not in argv:
        extra = ["--samples", "20"]
    try:
        rc = main(argv[1:] + extra)
    except SystemExit as e:  # --version
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0, out
    if sub == "--version":
        assert out.startswith("tokprune ")
    for option in WRITES:
        if option in argv:
            assert (tmp_path / argv[argv.index(option) + 1]).exists(), f"{command!r} wrote no {option} file"
