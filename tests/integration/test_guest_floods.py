"""Every per-guest-event record is bounded (docs/security.md; issue 19, defect 4): a
guest repeating an event a million times costs kvmm no more memory than a few thousand
times. The events go in where the vCPU loop hands a port exit to the machine (its port
bus), so every record on the way (POST codes, boot markers, unclaimed-port counters) is
in the path."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Callable

import pytest

from kvmm.vm import Machine, VmConfig
from kvmm.watch import RECENT_MARKERS

pytestmark = pytest.mark.kvm

MILLION = 1_000_000


def growth(action: Callable[[int], None], warm: int, n: int) -> int:
    """Bytes still allocated after ``n`` more events than a warm-up of ``warm`` (records
    that fill a ring or a table reach their size during the warm-up; tracing starts
    before it, so what the flood frees of the warm-up's allocations counts too)."""
    tracemalloc.start()
    try:
        for i in range(warm):
            action(i)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(warm, warm + n):
            action(i)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.fixture
def machine(guests, tmp_path: Path):  # type: ignore[no-untyped-def]
    m = Machine(VmConfig(kernel=str(guests("serial_hello")), mem_size=16 << 20, console_path=str(tmp_path / "c"),
                         stdin=False))
    yield m
    m.close()


@pytest.mark.parametrize("values", ["distinct", "repeated"])
def test_a_million_port_0x80_writes_keep_kvmm_memory_bounded(machine: Machine, values: str) -> None:
    """Port 0x80 writes were kept one entry each (23 -> 202 MiB in a minute): now the
    first time of each of the 256 values and the latest RECENT_MARKERS writes."""
    pio = machine.platform.pio
    value = (lambda i: i & 0xFF) if values == "distinct" else (lambda i: 0x42)
    grown = growth(lambda i: pio.write(0x80, 1, value(i)), 4 * RECENT_MARKERS, MILLION)
    assert grown < 64 << 10, f"a million port 0x80 writes kept {grown} bytes"
    assert len(machine.markers) == RECENT_MARKERS
    assert len(machine.watch.first_marker) == (256 if values == "distinct" else 1)
    assert machine.platform.pio.read(0x80, 1) == value(4 * RECENT_MARKERS + MILLION - 1)


def test_sweeps_of_every_unclaimed_port_keep_kvmm_memory_bounded(machine: Machine) -> None:
    """Unclaimed ports are counted per port: at most 65,536 counters, reached by the first
    sweep; a million more accesses add nothing."""
    pio = machine.platform.pio
    grown = growth(lambda i: pio.read(i & 0xFFFF, 1), 1 << 16, MILLION)
    assert grown < 64 << 10, f"a million unclaimed-port reads kept {grown} bytes"
    assert len(pio.unhandled) <= 1 << 16


def test_console_output_floods_keep_the_transcript_and_line_records_bounded(machine: Machine,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest console output through the UART's transmit register: the transcript kept for
    expect() is a window (16 MiB; 64 KiB here so the flood stays short), the last lines a
    ring of 100, a line without an end a 64 KiB tail."""
    import kvmm.console as C

    monkeypatch.setattr(C, "TRANSCRIPT_LIMIT", 64 << 10)
    pio, console = machine.platform.pio, machine.console
    text = b"a guest line that repeats\n" * 4 + b"x" * 200  # lines, and a long unended run

    def out(i: int) -> None:
        pio.write(0x3F8, 1, text[i % len(text)])

    grown = growth(out, 4 * (64 << 10), 300_000)
    assert grown < 64 << 10, f"300,000 console bytes kept {grown} bytes"
    assert len(console.transcript) <= 64 << 10 and len(console.last_lines) <= 100
