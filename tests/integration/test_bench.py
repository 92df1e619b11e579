"""scripts/bench runs end to end (a smoke run: one round, quick cases; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parents[2]


def test_bench_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--runs", "1", "--cases", "startup,serial,restore",
                          "--lkvm", str(tmp_path / "no-such-lkvm"), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["startup (s)"]["kvmm"]["median"] > 0
    assert results["serial 8250 (bytes/s)"]["kvmm"]["median"] > 0
    assert 0 < results["snapshot restore, 256 MiB guest (ms)"]["kvmm"]["median"] < 10_000
    assert results["startup (s)"]["kvmtool"].startswith("not available")
    assert "kvmm" in res.stdout and "startup (s)" in res.stdout
