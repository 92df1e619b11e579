"""Nothing acknowledged is lost: kill kvmm with SIGKILL in the middle of guest writes."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm


def test_flushed_writes_survive_sigkill(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The guest writes sector k = k (repeated), flushes every 8 sectors and prints
    # "flushed K" once the FLUSH completed: sectors 0..K-1 were acknowledged as durable.
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "kvmm", "-q", "--kernel", str(guests("blk_writer")), "--mem", "64M",
                             "--disk", str(disk)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        if line.startswith(b"flushed "):
            acknowledged = int(line.split()[1])
        if acknowledged >= 2048:
            break
    proc.send_signal(signal.SIGKILL)  # mid-stream: the guest is still writing
    rest = proc.stdout.read()
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines():  # lines the guest printed before the kill landed
        if line.startswith(b"flushed ") and line.split()[1].isdigit():
            acknowledged = max(acknowledged, int(line.split()[1]))
    data = disk.read_bytes()
    lost = [k for k in range(acknowledged) if data[k * 512 : (k + 1) * 512] != struct.pack("<Q", k) * 64]
    assert acknowledged >= 2048 and lost == [], f"{len(lost)} of {acknowledged} acknowledged sectors lost"
