"""The I/O thread's event loop: an epoll selector over eventfds, the console and sockets.

Queue notifies reach kvmm as KVM ioeventfds and interrupts leave through KVM irqfds, so
the guest's I/O hot path never waits on Python in a vCPU thread: the vCPU stays in
KVM_RUN while this loop serves the device. Callbacks run on the loop's thread only;
other threads hand work over with :meth:`EventLoop.call_soon`.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections import deque
from typing import Any, Callable

LOG = logging.getLogger(__name__)

Callback = Callable[[], None]
_KEEP: Any = object()


class _Handlers:
    """What to call when an fd is readable and when it is writable (either may be None)."""

    __slots__ = ("read", "write")

    def __init__(self) -> None:
        self.read: Callback | None = None
        self.write: Callback | None = None


class EventLoop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._set(self._wake_r, read=self._drain_wakeup)
        self._pending: deque[Callback] = deque()
        self._lock = threading.Lock()
        self._quiescible: set[int] = set()
        self._held: dict[int, Callback] | None = None
        self.owner: int | None = None  # the thread serving the loop (threading.get_ident()), while one does

    @property
    def wakeup_fd(self) -> int:
        """Write a byte here (e.g. ``signal.set_wakeup_fd``) to wake the loop."""
        return self._wake_w

    def add_reader(self, fd: int, callback: Callback, quiesce: bool = True) -> None:
        """Call ``callback`` when ``fd`` is readable. Readers that drive devices
        (``quiesce``, the default) stop while the loop is held (a paused VM); the
        control socket's keep going."""
        if quiesce:
            self._quiescible.add(fd)
            if self._held is not None:
                self._held[fd] = callback
                return
        self._set(fd, read=callback)

    def remove_reader(self, fd: int) -> None:
        self._quiescible.discard(fd)
        if self._held is not None:
            self._held.pop(fd, None)
        self._set(fd, read=None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` while ``fd`` is writable (until :meth:`remove_writer`): a
        non-blocking socket's pending output. Never held by :meth:`hold`."""
        self._set(fd, write=callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, write=None)

    def has_reader(self, fd: int) -> bool:
        key = self.selector.get_map().get(fd)
        return (key is not None and key.data.read is not None) or (self._held is not None and fd in self._held)

    def _set(self, fd: int, read: Callback | None = _KEEP, write: Callback | None = _KEEP) -> None:
        """(Re)register ``fd`` for the events it has a callback for."""
        try:
            key = self.selector.get_map().get(fd)
        except (KeyError, ValueError):  # a closed fd
            key = None
        h = key.data if key is not None else _Handlers()
        if read is not _KEEP:
            h.read = read
        if write is not _KEEP:
            h.write = write
        events = (selectors.EVENT_READ if h.read is not None else 0) | (selectors.EVENT_WRITE if h.write is not None else 0)
        try:
            if not events:
                if key is not None:
                    self.selector.unregister(fd)
            elif key is None:
                self.selector.register(fd, events, h)
            elif key.events != events:
                self.selector.modify(fd, events, h)
        except (KeyError, ValueError, OSError):
            if events:
                raise

    def hold(self) -> None:
        """Stop serving device readers until :meth:`release` (their events wait in the
        kernel: an eventfd's count, a tap's queue)."""
        if self._held is not None:
            return
        self._held = {}
        for fd in list(self._quiescible):
            key = self.selector.get_map().get(fd)
            if key is not None and key.data.read is not None:
                self._held[fd] = key.data.read
                self._set(fd, read=None)

    def release(self) -> None:
        held, self._held = self._held, None
        for fd, callback in (held or {}).items():
            self._set(fd, read=callback)

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the loop's thread (thread-safe)."""
        with self._lock:
            self._pending.append(callback)
        self.wake()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop's thread (where device work runs, so it sees no device
        mid-request) and return its result (or raise its exception) here; directly if
        this is that thread or no thread serves the loop."""
        if self.owner is None or self.owner == threading.get_ident():
            return fn()
        import concurrent.futures

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller's thread
                    fut.set_exception(exc)

        self.call_soon(call)
        while True:
            try:
                return fut.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if self.owner is None and fut.cancel():  # the loop ended before it ran
                    return fn()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already a wake-up pending

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def run_once(self, timeout: float | None) -> None:
        for key, events in self.selector.select(timeout):
            h = key.data
            if events & selectors.EVENT_READ and h.read is not None:
                h.read()
            if events & selectors.EVENT_WRITE and h.write is not None:
                h.write()
        while True:
            with self._lock:
                if not self._pending:
                    break
                cb = self._pending.popleft()
            cb()

    def close(self) -> None:
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def make_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain_eventfd(fd: int) -> int:
    """The eventfd's counter (0 if nothing was signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
