"""The code passes the linter configured in ``pyproject.toml`` (``[tool.ruff]``: pycodestyle
errors and warnings, pyflakes, bugbear), so an unused import, an undefined name, a shadowed
loop variable or a mutable default argument fails the suite rather than a review."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    local = Path(sys.executable).with_name("ruff")  # installed with '.[test]' into this environment
    if local.exists():
        return [str(local)]
    found = shutil.which("ruff")
    assert found, "ruff is not installed: pip install -e '.[test]' installs it (Testing/requirements-test.txt)"
    return [found]


def test_ruff_check_passes():
    paths = ["LesionSeg", "LesionSegTraining", "Testing"]
    out = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", *paths],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_catches_what_it_is_configured_for(tmp_path):
    """The configuration really selects the rules named above (a config that selects nothing
    would pass every file)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(x=[]):\n    return undefined_name\n")
    out = subprocess.run([*_ruff(), "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), "--output-format", "concise",
                          str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    for rule in ("F401", "B006", "F821"):
        assert rule in out.stdout, out.stdout
