"""Debug ports: the POST-code port 0x80 and a debug-exit port for test guests.

Port 0x80 writes are counted and the last value kept (Linux uses the port as an I/O
delay, so logging each write would flood). A write of ``v`` to the debug-exit port
(0x501, as QEMU's isa-debug-exit) ends the VM with ``v``; the CLI exits with 64 + (v & 63).
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
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def pio_read(self, offset: int, size: int) -> int:
        return 0xFF

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value & 0xFF)
