"""The console's host end: the terminal's raw mode."""

from __future__ import annotations

import os
import termios

from kvmm.console import TerminalInput


def test_raw_mode_keeps_output_newlines_at_the_left_margin() -> None:
    # Regression: tty.setraw turned off output post-processing too, so a kvmm log line
    # printed while the guest console had the terminal started mid-line.
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        term = TerminalInput(slave)
        term.enter_raw()
        iflag, oflag, cflag, lflag = termios.tcgetattr(slave)[:4]
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)  # every key reaches the guest
        assert oflag & termios.OPOST and oflag & termios.ONLCR
        os.write(slave, b"kvmm: line\n")
        assert os.read(master, 100) == b"kvmm: line\r\n"
        term.restore()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
