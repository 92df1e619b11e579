"""kvmm type-checks cleanly (mypy is in the test extras)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_type_errors() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "kvmm"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-5000:]
