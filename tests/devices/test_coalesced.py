"""The coalesced-PIO ring (kvmm/coalesced.py) replayed as KVM fills it, on a fake ring."""

from __future__ import annotations

import struct

from kvmm.coalesced import CoalescedPio
from kvmm.devices.bus import PioBus

ENTRY = struct.Struct("<QII8s")
PAGE = 4096
CAPACITY = (PAGE - 8) // ENTRY.size


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class FakeVm:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self.coalesced_pio: set[tuple[int, int]] = set()

    def coalesce_pio(self, port: int, size: int, enable: bool = True) -> None:
        self.calls.append((port, size, enable))
        (self.coalesced_pio.add if enable else self.coalesced_pio.discard)((port, size))


def setup() -> tuple[CoalescedPio, bytearray, Recorder, FakeVm]:
    ring = bytearray(PAGE)
    pio = PioBus()
    dev = Recorder()
    pio.register(0x3F8, 8, dev)
    vm = FakeVm()
    return CoalescedPio(vm, memoryview(ring), pio), ring, dev, vm  # type: ignore[arg-type]


def push(ring: bytearray, port: int, data: bytes) -> None:
    """What KVM does for one queued write: the entry at ``last``, then ``last`` moves."""
    first, last = struct.unpack_from("<II", ring, 0)
    ENTRY.pack_into(ring, 8 + last * ENTRY.size, port, len(data), 1, data.ljust(8, b"\0"))
    struct.pack_into("<I", ring, 4, (last + 1) % CAPACITY)


def test_queued_writes_are_replayed_in_order_and_consumed() -> None:
    c, ring, dev, _ = setup()
    for b in b"abc":
        push(ring, 0x3F8, bytes([b]))
    assert c.pending()
    assert c.drain() == 3
    assert dev.writes == [(0, 1, ord("a")), (0, 1, ord("b")), (0, 1, ord("c"))]
    assert not c.pending() and struct.unpack_from("<I", ring, 0)[0] == 3


def test_the_ring_wraps() -> None:
    c, ring, dev, _ = setup()
    struct.pack_into("<II", ring, 0, CAPACITY - 2, CAPACITY - 2)
    for b in b"wxyz":
        push(ring, 0x3F8, bytes([b]))
    assert c.drain() == 4 and bytes(v for _, _, v in dev.writes) == b"wxyz"
    assert struct.unpack_from("<II", ring, 0) == (2, 2)


def test_indices_outside_the_ring_are_dropped_not_followed() -> None:
    c, ring, dev, _ = setup()
    struct.pack_into("<II", ring, 0, 0, 10_000)
    assert c.drain() == 0 and dev.writes == []
    assert not c.pending()


def test_entries_of_impossible_length_are_skipped() -> None:
    c, ring, dev, _ = setup()
    push(ring, 0x3F8, b"")
    push(ring, 0x3F8, b"z")
    assert c.drain() == 2 and dev.writes == [(0, 1, ord("z"))]


def test_a_zone_change_drains_first_and_is_not_repeated() -> None:
    c, ring, dev, vm = setup()
    c.set_zone(0x3F8, 1, True)
    push(ring, 0x3F8, b"q")
    c.set_zone(0x3F8, 1, True)  # already on: nothing
    c.set_zone(0x3F8, 1, False)  # the queued write is replayed before the zone goes
    assert vm.calls == [(0x3F8, 1, True), (0x3F8, 1, False)]
    assert dev.writes == [(0, 1, ord("q"))]
