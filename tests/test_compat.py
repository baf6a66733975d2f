"""The transformers window: untested releases are refused loudly, and the compat check can tell a broken one."""

from __future__ import annotations

import warnings

import pytest

import tokprune
import tokprune.patches.compat as compat
from tokprune.compat import check
from tokprune.testing import tiny_model


def test_installed_release_is_in_the_tested_window():
    assert compat.MINOR in compat.TESTED
    compat.check_transformers()  # no error, no warning


def test_untested_release_is_refused_with_the_window_and_the_override(monkeypatch):
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    with pytest.raises(RuntimeError) as err:
        compat.check_transformers("5.30.1")
    msg = str(err.value)
    assert "5.30.1" in msg and all(v in msg for v in compat.TESTED) and compat.OVERRIDE_ENV in msg
    assert "python -m tokprune.compat --check" in msg


def test_apply_refuses_an_untested_release_before_touching_the_model(monkeypatch):
    model, _ = tiny_model("llava")
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(compat.transformers, "__version__", "5.21.0")  # the object compat reads: building
    # a tiny model earlier in the session can re-create sys.modules['transformers'] (transformers' lazy module)
    with pytest.raises(RuntimeError, match="tested with transformers"):
        tokprune.apply(model, "random", keep=4)
    assert not tokprune.is_patched(model)


def test_override_lets_it_run_and_warns_once(monkeypatch):
    model, _ = tiny_model("llava")
    monkeypatch.setenv(compat.OVERRIDE_ENV, "1")
    monkeypatch.setattr(compat.transformers, "__version__", "5.99.0")
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokprune.apply(model, "random", keep=4)
        tokprune.apply(model, "random", keep=4)
    tokprune.remove(model)
    untested = [w for w in caught if "not tested" in str(w.message)]
    assert len(untested) == 1 and "5.99.0" in str(untested[0].message)


def test_override_zero_does_not_override(monkeypatch):
    monkeypatch.setenv(compat.OVERRIDE_ENV, "0")
    with pytest.raises(RuntimeError):
        compat.check_transformers("6.0.0")


def test_cache_is_read_under_either_name():
    marker = object()
    assert compat.get_cache({"cache": marker}) is marker
    assert compat.get_cache({"past_key_values": marker}) is marker
    assert compat.get_cache({}) is None
    assert set(compat.cache_kwargs(marker)) == {compat.CACHE_KWARG}


def test_compat_check_passes_here():
    lines: list[str] = []
    assert check(["llava", "qwen2_vl"], ["random", "fastv"], log=lines.append)
    assert lines[-1].startswith("verdict: every check passed")


def test_compat_check_fails_when_a_hook_misreads_the_forward(monkeypatch):
    """Simulate the 5.24 breakage (the cache read under its old name only): the check must say FAIL."""
    import tokprune.patches.base as base
    import tokprune.patches.llm_stage as llm_stage

    other = "past_key_values" if compat.CACHE_KWARG == "cache" else "cache"
    for mod in (base, llm_stage):
        monkeypatch.setattr(mod, "get_cache", lambda kw: kw.get(other))
    lines: list[str] = []
    assert not check(["llava"], ["random"], log=lines.append)
    assert "FAIL" in lines[1] and "FAILED" in lines[-1]


def test_pyproject_declares_the_tested_window():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    lo, hi = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', text).groups()
    assert lo == compat.TESTED[0] and hi == compat._next_minor(compat.TESTED[-1])


@pytest.mark.parametrize("argv", [["demo", "--family", "llava"], ["show", "--model", "tiny:llava", "--out", "k.png"],
                                  ["bench", "--config", "tiny-llava", "--methods", "cls", "--keep", "4"]])
def test_cli_refuses_an_untested_release_in_one_line(argv, monkeypatch, capsys, tmp_path):
    """The refusal is one line and exit code 2, like every other CLI error, and comes before any model loads."""
    from tokprune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(compat.transformers, "__version__", "5.99.0")
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tokprune {argv[0]}: error: tokprune was tested with transformers")
    assert "5.99.0" in lines[0] and compat.OVERRIDE_ENV in lines[0] and "Traceback" not in captured.err
    assert captured.out == "" and not list(tmp_path.iterdir())  # nothing ran


def test_ci_matrix_loop_reads_the_older_releases():
    """.ci/run swaps transformers to each older tested release: its one-liner yields exactly those."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    one_liner = re.search(r'for OLDER in \$\(python -c "([^"]+)"\)', ci).group(1)
    out = subprocess.run([sys.executable, "-c", one_liner], capture_output=True, text=True, check=True).stdout.split()
    assert out == list(compat.TESTED_RELEASES.values())[:-1]
    assert all(r.startswith(f"{m}.") for m, r in compat.TESTED_RELEASES.items())


def test_readme_and_compat_doc_name_the_tested_window():
    """The window is written in three places besides compat.py: a new release is added to all or the suite fails."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    *older, newest = compat.TESTED
    readme = (root / "README.md").read_text()
    assert f"Tested on **transformers {', '.join(older)} and {newest}**" in readme
    doc = (root / "docs" / "compat.md").read_text()
    assert f"(`TESTED`: {', '.join(compat.TESTED)})" in doc
    assert f"`transformers>={compat.TESTED[0]},<{compat._next_minor(newest)}`" in doc
