"""Every code block and every shell command of the README runs as written, on a fresh copy of the repository.

Each ```python block is executed on its own (so each must be self-contained); where a line ends in a comment that is
a Python literal (``tokprune.methods()  # ['cls', ...]``) the expression must equal it, and where a ``print(...)``
line's comment shows the output, the printed text must start with it.

Shell commands are every line of the ```bash blocks and every inline command of the prose (a code span starting
with ``tokprune``, ``python``, ``bash``, ``pytest`` or ``pip``), except the spans that only name a command
(:data:`MENTIONS`). Each runs in a temporary copy of the repository's tracked files (``git ls-files``), as a fresh
clone has them, so relative paths (``benchmarks/...``, an ``--out`` that holds committed results) mean what they mean
to a new user and nothing in the checkout changes: ``tokprune`` through ``tokprune.cli.main``, ``python`` / ``bash``
as subprocesses. A command must exit 0 and write the files its ``--out`` / ``--save`` / ``--json`` name. Options
that only make a command smaller are appended (fewer samples, one repeat: :data:`FASTER`, :data:`SCRIPT_FASTER`;
argparse keeps the last value of an option). Not run here: installs and the test suite itself, hub models and
lmms-eval (no network), the CUDA script, and the two long benchmark runs (:data:`SLOW`, marked ``slow``: they run,
as written, under ``pytest -m slow``).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: appended to a README ``tokprune`` line: the same command, smaller (argparse keeps the last value of an option)
FASTER = {
    "demo": ["--new-tokens", "2"],  # tiny models (--family); the reference models get --samples 20
    "bench": ["--n-text", "8", "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--no-progress"],
    "flops": [],
    "show": [],
    "eval": ["--limit", "20", "--no-progress"],
    "report": [],
    "tune": ["--samples", "8", "--trials", "4", "--no-progress"],
}
#: appended to a README ``python`` / ``bash`` line, by the script it runs
SCRIPT_FASTER = {
    # the full-size CLIP-L/336 tower: minutes on a loaded CPU; the same script on the tiny config
    "benchmarks/flowcut_encoder.py": ["--config", "tiny-llava", "--keep", "4", "--repeats", "1"],
    # a LLaVA-1.5-7B-width proxy: minutes a method on a loaded CPU; the same script on the tiny config
    "benchmarks/speed.py": ["--config", "tiny-llava", "--keep", "8", "--min-repeats", "1", "--max-repeats", "1",
                            "--warmup", "0"],
    # a Qwen2.5-VL-3B-width proxy: minutes on a loaded CPU; the same script on the tiny config
    "benchmarks/mixed_batch.py": ["--config", "tiny-qwen2-vl", "--repeats", "1"],
    "benchmarks/cdpruner_greedy.py": ["--tokens", "64", "--dim", "64", "--text", "8", "--keep", "8", "--prompt", "16",
                                      "--repeats", "1"],
    "benchmarks/received_lse.py": ["--patches", "300", "--rounds", "1"],  # a 5476-patch block: ~10 s a round
    "benchmarks/catp_greedy.py": ["--repeats", "1", "--images", "2", "--tokens", "64", "--dim", "256", "--text", "16"],
    "benchmarks/kept_pictures.py": ["--samples", "2", "--models", "llava-shapes"],  # both README pictures still
    "tokprune.compat": ["--families", "llava", "--methods", "cls,fastv"],  # tests/test_compat.py: the whole matrix
}
#: inline code that names a command in the prose rather than giving one to run
MENTIONS = {"tokprune bench", "tokprune flops", "tokprune eval", "tokprune tune", "tokprune flops --method",
            "tokprune <command> -h", "tokprune report DIR", "tokprune eval --methods"}
#: installs and the suite this test belongs to
SKIPPED = ("pip install", "pip uninstall", "python -m pytest", "pytest")
#: need a CUDA device
GPU = ("bash benchmarks/gpu.sh", "bash integrations/vllm/bench/gpu.sh")
#: as written, too long for every CI run (the README gives their time); ``pytest -m slow`` runs them
SLOW = {
    "bash benchmarks/cpu.sh": "12-25 minutes of CPU (tests/test_speed.py runs the script on tiny configs)",
    "bash benchmarks/cpu_tables.sh": "about 70 minutes on a quiet 2-core CPU",
    "python benchmarks/icl_accuracy.py": "about 11 minutes of CPU",
}
WRITES = ("--save", "--out", "--json")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def block_commands() -> list[str]:
    """Every command of the README's bash blocks (lines split at ``&&``, comments dropped)."""
    out = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            out += [c.strip() for c in line.split("#")[0].split("&&") if c.strip()]
    return out


def inline_commands() -> list[str]:
    """Every code span of the prose (outside code blocks) that is a shell command, joined when it wraps a line."""
    prose = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    spans = (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose))
    return [s for s in spans if re.match(r"(tokprune|python|bash|pytest|pip) ", s) and s not in MENTIONS]


def commands() -> list[str]:
    """Block and inline commands, each once, in README order of kind (blocks first)."""
    return list(dict.fromkeys(block_commands() + inline_commands()))


def _param(command: str):
    slow = [pytest.mark.slow] if any(command.startswith(c) for c in SLOW) else []
    return pytest.param(command, marks=slow, id=command[:80])


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """The repository's tracked files, copied as a clone has them (no build outputs, no runs, no venv)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the fresh-clone copy needs `git ls-files`")
    dest = tmp_path_factory.mktemp("clone")
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_the_readme_has_code_to_check():
    assert len(code_blocks("python")) >= 3 and len(block_commands()) >= 6 and len(inline_commands()) >= 6


def test_inline_commands_are_found_and_mentions_are_real():
    """The prose's commands are collected (the three that once failed among them), and every :data:`MENTIONS`
    entry still occurs in the README (a stale entry would hide nothing, but says something false)."""
    found = inline_commands()
    assert "python benchmarks/flowcut_encoder.py --out runs/flowcut" in found
    assert "tokprune show --model qwen2vl-shapes --scores" in found
    assert any(c.startswith("tokprune eval --model llava-shapes --methods pdrop,transprune") for c in found)
    prose = " ".join(README.read_text(encoding="utf-8").split())
    assert all(f"`{m}`" in prose for m in MENTIONS)


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


def _written(argv: list[str], cwd: Path) -> list[Path]:
    """The files a command names with --out / --save / --json, removed first so that the run must write them."""
    out = []
    for option in WRITES:
        if option in argv:
            path = cwd / argv[argv.index(option) + 1]
            if path.is_file():
                path.unlink()
            out.append(path)
    return out


@pytest.mark.parametrize("command", [_param(c) for c in commands()])
def test_shell_command_runs_as_written(command, fresh_clone, monkeypatch, capsys):
    if command.startswith(SKIPPED):
        pytest.skip("installs / the test suite itself")
    if command.startswith(("lmms-eval ", "accelerate launch ")):  # hub models (downloads), real tasks
        assert "llava-hf/" in command or "pretrained=..." in command, f"an lmms-eval line to test here: {command!r}"
        pytest.skip("lmms-eval on a hub model; the same CLI on a local task runs in tests/test_eval_lmms.py")
    if command.startswith(("vllm ", "python -m vllm.")):
        pytest.skip("needs vLLM's own venv (transformers < 5.20): .ci/vllm.sh serves the reference models that way")
    if command.startswith(GPU):
        pytest.skip("needs CUDA (tests/test_speed.py runs benchmarks/gpu.sh on tiny configs; the vLLM one checks "
                    "itself on the CPU proxy with TOKPRUNE_VLLM_BENCH_PROXY=1, in vLLM's venv)")
    argv = shlex.split(command)
    if "--model" in argv and "/" in argv[argv.index("--model") + 1]:
        pytest.skip("a hub model: downloads weights, which this machine cannot (the README says so)")
    monkeypatch.chdir(fresh_clone)  # relative paths resolve in the copy, as on a fresh clone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    slow = any(command.startswith(c) for c in SLOW)
    written = _written(argv, fresh_clone)
    if argv[0] == "tokprune":
        _run_tokprune(argv, capsys)
    else:
        assert argv[0] in ("python", "bash"), f"the README shows a command this test cannot run: {command!r}"
        script = argv[2] if argv[1] == "-m" else argv[1]
        extra = [] if slow else SCRIPT_FASTER.get(script, [])
        exe = sys.executable if argv[0] == "python" else "bash"
        env = {**os.environ, "PYTHONPATH": str(fresh_clone), "PYTHON": sys.executable, "MPLBACKEND": "Agg"}
        if not slow:  # small models: a second thread only contends on a shared CPU (the slow runs time things)
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run([exe, *argv[1:], *extra], cwd=fresh_clone, env=env, capture_output=True, text=True,
                              timeout=None if slow else 600)
        tail = proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, f"{command!r} exited {proc.returncode}:\n{tail}"
    for path in written:
        assert path.exists(), f"{command!r} wrote no {path.relative_to(fresh_clone)}"


def _run_tokprune(argv: list[str], capsys) -> None:
    sub = argv[1]
    extra = [] if sub.startswith("-") else FASTER[sub]
    if sub == "demo" and "--family" not in argv:
        extra = ["--samples", "20"]
    try:
        rc = main(argv[1:] + extra)
    except SystemExit as e:  # --version
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 0, captured.out[-2000:] + captured.err[-2000:]
    if sub == "--version":
        assert captured.out.startswith("tokprune ")


def test_kept_pictures_exits_non_zero_when_a_picture_fails(tmp_path, monkeypatch):
    """benchmarks/kept_pictures.py once printed an error and exited 0, leaving a stale picture in the docs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kept_pictures", ROOT / "benchmarks" / "kept_pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SHOW", {"bad.png": ["--model", "tiny:llava", "--methods", "cls", "--keep", "999"]})
    monkeypatch.setattr(module, "picture", lambda *a, **k: pytest.fail("kept pictures are not this test's"))
    monkeypatch.setattr(sys, "argv", ["kept_pictures.py", "--models", "", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as err:
        module.main()
    assert err.value.code not in (0, None) and "bad.png" in str(err.value.code)
    assert not (tmp_path / "bad.png").exists()


def test_catp_greedy_report_and_readme_quote_its_own_numbers():
    """benchmarks/catp_greedy.py's report is rendered from its JSON (no fixed prose that can contradict it), the
    committed report is that rendering, and the README quotes the same figures."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("catp_greedy", ROOT / "benchmarks" / "catp_greedy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = ROOT / "benchmarks" / "results" / "cpu-amd-epyc-2c" / "catp-greedy"
    res = json.loads(base.with_suffix(".json").read_text())
    assert base.with_suffix(".md").read_text() == module.markdown(res)
    speedup = res["plain_loop_scaled_s"] / res["vectorised_s"]
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert f"take {res['vectorised_s']:.1f} s here with the vectorised greedy ({speedup:.0f}x faster" in readme
    assert f"{100 * res['share_of_prefill']:.2f} % of the LLM prefill" in readme


def test_readme_lists_every_notebook():
    listed = re.search(r"\[notebooks/\]\(notebooks\) \(([^;]+);", " ".join(README.read_text().split())).group(1)
    assert {n.strip(" `") for n in listed.split(",")} == {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}


def test_eval_doc_names_the_methods_that_take_flops_ratio():
    """docs/eval.md once said no method takes --flops-ratio; the list is the registry's."""
    import tokprune
    from tokprune.eval.validate import supports_flops_ratio

    takers = [f"`{m}`" for m in tokprune.methods() if supports_flops_ratio(m)]
    doc = " ".join((ROOT / "docs" / "eval.md").read_text().split())
    assert f"`flops_ratio` option: {', '.join(takers[:-1])} and {takers[-1]};" in doc
