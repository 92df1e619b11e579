"""Threads: KVM_RUN releases the GIL, so vCPU threads and the I/O thread run in parallel."""

from __future__ import annotations

import threading
import time

import pytest

from kvmm.vm import Machine, VmConfig

pytestmark = pytest.mark.kvm


def count_for(seconds: float, stop: threading.Event | None = None) -> int:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        n += 1
    return n


def test_kvm_run_releases_the_gil(guests) -> None:  # type: ignore[no-untyped-def]
    # A Python thread counts while the vCPU thread sits in KVM_RUN for 1-2 s. Were the GIL
    # held across the ioctl, the counter would stall; released, it runs near full speed.
    baseline = count_for(0.3) / 0.3
    counts: list[float] = []
    done = threading.Event()

    def counter() -> None:
        t = time.monotonic()
        n = count_for(30, done)
        counts.append(n / (time.monotonic() - t))

    with Machine(VmConfig(kernel=str(guests("spin_seconds")), mem_size=64 << 20, console_path="/dev/null", stdin=False)) as m:
        th = threading.Thread(target=counter)
        th.start()
        result = m.run(timeout=60)
        done.set()
        th.join()
    assert result.debug_value == 0x11
    # Only the I/O thread's 20 Hz wake-ups and a few exits compete with the counter.
    assert counts[0] > 0.25 * baseline, f"counter ran at {counts[0]:.0f}/s against {baseline:.0f}/s alone"
