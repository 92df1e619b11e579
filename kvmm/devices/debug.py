"""Debug ports: the POST-code port 0x80 and debug-exit ports for test guests.

Port 0x80 writes are counted and the last value kept (Linux uses the port as an I/O
delay, so logging each write would flood). Two debug-exit conventions end the VM:

- kvmm's own, always present: a byte ``v`` written to port 0x501 (where QEMU's
  isa-debug-exit sits by default); the CLI exits with 64 + (v & 63), clear of kvmm's
  own statuses;
- QEMU's isa-debug-exit, with ``--debug-exit PORT[,SIZE]`` (kvm-unit-tests: 0xf4,4): a
  write of ``v`` of any width to any of its ports; the CLI exits with ``(v << 1) | 1``
  (its low byte), as QEMU does, so a harness written for QEMU reads kvmm's status as
  QEMU's. Odd statuses then overlap kvmm's own (1, 3, 5): the harness tells them apart
  by kvmm's ``kvmm: error:`` line on stderr, as it does with QEMU's errors.
"""

from __future__ import annotations

from typing import Callable

from ..layout import DEBUG_EXIT, POST

POST_PORT = POST.base
DEBUG_EXIT_PORT = DEBUG_EXIT.base


class PostCode:
    def __init__(self, on_value: Callable[[int], None] | None = None) -> None:
        self.writes = 0
        self.last = 0
        self.on_value = on_value

    def pio_read(self, offset: int, size: int) -> int:
        return self.last

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.last = value & 0xFF
        if self.on_value is not None:
            self.on_value(self.last)


class DebugExit:
    """``on_exit(v)`` at a guest write: ``v`` is the written byte, or with ``full_width``
    the whole value of the access (QEMU's isa-debug-exit takes all of it)."""

    def __init__(self, on_exit: Callable[[int], None], full_width: bool = False) -> None:
        self.on_exit = on_exit
        self.full_width = full_width

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value & ((1 << (8 * size)) - 1) if self.full_width else value & 0xFF)
