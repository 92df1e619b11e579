"""The i8042 keyboard controller, as far as a guest needs it to reset the machine.

Linux's ``reboot=k`` waits for the input buffer to be empty (status bit 1 clear) and
writes the pulse-reset command 0xFE to the command port 0x64.
"""

from __future__ import annotations

from typing import Callable

I8042_DATA = 0x60
I8042_COMMAND = 0x64
CMD_RESET = 0xFE
STATUS_SYSTEM_FLAG = 0x04  # self-test passed


class I8042:
    """Ports 0x60 and 0x64 (register twice: data at offset 0 of 0x60, command at 0x64)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.resets = 0

    def pio_read(self, offset: int, size: int) -> int:
        return STATUS_SYSTEM_FLAG if offset == 4 else 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and value & 0xFF == CMD_RESET:
            self.resets += 1
            self.on_reset()
