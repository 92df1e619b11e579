"""The host end of the guest console: buffered output, line watching, terminal input.

:class:`ConsoleOutput` receives the bytes the guest transmits, writes them to stdout or a
file (flushed at each newline and periodically), keeps the last lines for error reports,
and hands every complete line to listeners, which is how kvmm notices a kernel panic or
the start of init. :class:`TerminalInput` puts a terminal into raw mode and restores it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import termios
import threading
import time
import tty
from collections import deque
from typing import TYPE_CHECKING, Callable, Protocol

from .ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from .eventloop import EventLoop

LOG = logging.getLogger(__name__)
_LOG = RateLimitedLog(LOG)  # output is flushed as often as the guest writes lines

LineListener = Callable[[bytes], None]
FLUSH_THRESHOLD = 4096
TRANSCRIPT_LIMIT = 16 << 20
LINE_LIMIT = 64 << 10  # the longest line handed to line listeners
ESCAPE_CHAR = 0x01  # Ctrl-A, then 'x' quits (as QEMU's -nographic)


class ConsoleInput(Protocol):
    """A device that takes the host's console input (the UART, virtio-console)."""

    def receive(self, data: bytes) -> int:
        """Queue input for the guest; returns how many bytes were accepted."""

    def rx_room(self) -> int:
        """How many more bytes :meth:`receive` would accept now."""


class ConsoleOutput:
    def __init__(self, fd: int | None = None, path: str | None = None, keep_lines: int = 100) -> None:
        self._own_fd = False
        if path is not None:
            from .errors import ConfigError
            from .files import open_output

            fd = open_output(path, "console file", ConfigError)  # a FIFO with no reader: refused, not waited for
            self._own_fd = True
        self.fd = sys.stdout.fileno() if fd is None else fd
        self.lock = threading.Lock()
        self._pending = bytearray()
        self._line = bytearray()
        self.last_lines: deque[bytes] = deque(maxlen=keep_lines)
        self.listeners: list[LineListener] = []
        self.bytes_written = 0
        # The transcript that expect() searches (bounded: the oldest output goes first).
        self.transcript = bytearray()
        self._cursor = 0
        self._cond = threading.Condition(self.lock)
        self.ended: str | None = None  # why the VM ended, once it has

    def write(self, data: bytes) -> None:
        """Guest output (a vCPU thread, often one byte per call: kept cheap). Waiters in
        :meth:`expect` are woken at a line end here, else by the I/O thread's periodic
        :meth:`flush`."""
        lines = None
        with self.lock:
            self.transcript += data
            if len(self.transcript) > TRANSCRIPT_LIMIT:
                cut = len(self.transcript) - TRANSCRIPT_LIMIT
                del self.transcript[:cut]
                self._cursor = max(0, self._cursor - cut)
            self._pending += data
            self.bytes_written += len(data)
            self._line += data
            if b"\n" in data:
                lines = self._line.split(b"\n")
                self._line = bytearray(lines.pop())
                self._flush_locked()
                self._cond.notify_all()
                self._unsignalled = False
            else:
                if len(self._line) > LINE_LIMIT:  # a guest that never ends its line: keep the tail
                    del self._line[: len(self._line) - LINE_LIMIT]
                self._unsignalled = True
                if len(self._pending) >= FLUSH_THRESHOLD:
                    self._flush_locked()
        if lines:
            for raw in lines:
                line = bytes(raw).rstrip(b"\r")
                self.last_lines.append(line)
                for listener in self.listeners:
                    listener(line)

    _unsignalled = False

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        data = bytes(self._pending)
        self._pending.clear()
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a non-blocking terminal that is full: drop rather than stall the vCPU
        except OSError as exc:
            _LOG.warning("console output failed: %s", exc.strerror)

    def flush(self) -> None:
        with self.lock:
            self._flush_locked()
            if self._unsignalled:  # output without a line end (a prompt) reaches expect() too
                self._unsignalled = False
                self._cond.notify_all()

    def expect(self, pattern: str | bytes | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait for ``pattern`` (a regex) in the output since the last match; raises
        :class:`~kvmm.errors.ConsoleTimeout` with the last console lines if it does not
        appear within ``timeout`` seconds or the VM ends first."""
        from .errors import ConsoleTimeout

        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        from .config import check_seconds

        deadline = time.monotonic() + (check_seconds(timeout, "expect's timeout") or 0.0)
        with self._cond:
            while True:
                m = regex.search(self.transcript, self._cursor)
                if m:
                    self._cursor = m.end()
                    return m
                left = deadline - time.monotonic()
                if self.ended is not None or left <= 0:
                    why = f"the VM ended ({self.ended})" if self.ended else f"{timeout:g} s passed"
                    raise ConsoleTimeout(regex.pattern, why, self.tail(20))
                self._cond.wait(left)

    send_input: Callable[[bytes], None] | None = None  # set by the machine

    def send(self, text: str | bytes) -> None:
        """Type ``text`` on the guest's console (its primary console device)."""
        if self.send_input is None:
            raise RuntimeError("this console has no input")
        self.send_input(text.encode() if isinstance(text, str) else text)

    def mark_ended(self, why: str) -> None:
        with self._cond:
            self.ended = why
            self._cond.notify_all()

    def tail(self, n: int = 20) -> str:
        return "\n".join(line.decode(errors="replace") for line in list(self.last_lines)[-n:])

    def close(self) -> None:
        self.flush()
        if self._own_fd:
            os.close(self.fd)
            self._own_fd = False


class TerminalInput:
    """Raw mode on a terminal stdin (restored by :meth:`restore`), with a Ctrl-A escape."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.is_tty = os.isatty(fd)
        self._saved: list | None = None  # type: ignore[type-arg]
        self._escape = False

    def enter_raw(self) -> None:
        """Raw input (every key goes to the guest), but output still post-processed: a
        kvmm log line or a guest's bare newline starts at the left margin (ONLCR), where
        tty.setraw alone would leave the cursor mid-line."""
        if self.is_tty and self._saved is None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
            attrs = termios.tcgetattr(self.fd)
            attrs[1] |= termios.OPOST | termios.ONLCR  # oflag
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def filter(self, data: bytes) -> tuple[bytes, bool]:
        """Strip the escape sequences from terminal input; ``(bytes for the guest, quit)``."""
        if not self.is_tty:
            return data, False
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    return bytes(out), True
                out.append(b)  # Ctrl-A Ctrl-A sends one Ctrl-A
            elif b == ESCAPE_CHAR:
                self._escape = True
            else:
                out.append(b)
        return bytes(out), False


class StdinPump:
    """Host input to the guest's primary console, on the I/O thread: stdin in raw mode on a
    terminal (restored by :meth:`stop`), the Ctrl-A escape (``Ctrl-A x`` calls
    ``on_quit``), and back-pressure: stdin is read only while the console device has
    room, so input waits in the terminal, not in kvmm."""

    def __init__(self, loop: EventLoop, device: ConsoleInput, on_quit: Callable[[], None], fd: int = 0) -> None:
        self.loop = loop
        self.device = device
        self.on_quit = on_quit
        self.fd = fd
        self.term: TerminalInput | None = None

    def start(self) -> None:
        term = TerminalInput(self.fd)
        try:
            self.loop.add_reader(self.fd, self._readable)
            self.term = term
            term.enter_raw()
        except (ValueError, OSError, PermissionError, termios.error):
            pass  # stdin closed or not pollable (a regular file): no input (or no raw mode)

    def poll(self) -> None:
        """Read stdin again once the device has room; stop while it has none."""
        if self.term is None:
            return
        room = self.device.rx_room() > 0
        if room and not self.loop.has_reader(self.fd):
            self.loop.add_reader(self.fd, self._readable)
        elif not room and self.loop.has_reader(self.fd):
            self.loop.remove_reader(self.fd)

    def stop(self) -> None:
        if self.term is not None:
            self.term.restore()
            self.loop.remove_reader(self.fd)
            self.term = None

    def _readable(self) -> None:
        term = self.term
        if term is None:
            return
        try:
            data = os.read(self.fd, min(512, max(self.device.rx_room(), 1)))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the guest just sees no more input
            term.restore()
            self.loop.remove_reader(self.fd)
            self.term = None
            return
        data, quit_requested = term.filter(data)
        if data:
            self.device.receive(data)
        if quit_requested:
            self.on_quit()
