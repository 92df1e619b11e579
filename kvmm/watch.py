"""The boot watch: what the guest's console and boot markers say about how far it got.

Every complete console line passes :meth:`BootWatch.console_line`: Linux boot milestones
are timed, a kernel panic is remembered (so that the reset ``panic=-1`` causes reads as
a panic, not a reset), and the kernel's exec of init is timed and, where guest user space
cannot run (software-nested KVM), ends the VM. Port 0x80 writes arrive at
:meth:`BootWatch.marker`. Nothing here touches KVM: tests drive it with plain lines.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Callable

from .config import Outcome, VmResult

if TYPE_CHECKING:
    from .vcpu import VcpuRunner

LOG = logging.getLogger(__name__)

PANIC_MARKER = b"Kernel panic - not syncing"
# Console lines that mark the phases of a Linux boot (Machine.boot_times()).
MILESTONES = (("kernel_start", b"Linux version "), ("root_mounted", b"VFS: Mounted root"),
              ("init_started", b" as init process"))
INIT_RE = re.compile(rb"Run (\S+) as init process")
RECENT_MARKERS = 1024  # port 0x80 writes kept in order (a guest may write the port forever)


def init_reached(init: str, host_name: str) -> VmResult:
    """How a boot ends at the kernel's exec of ``init`` where guest user space cannot run."""
    return VmResult(Outcome.INIT_REACHED, f"the guest kernel started {init}; guest user space cannot make system "
                                          f"calls on {host_name} (software-nested KVM), so the boot ends here")


class BootWatch:
    """Milestones, panic, init and boot markers of one run. ``stop`` ends the VM (with
    stop-at-init); ``started`` is the run's start on the monotonic clock."""

    def __init__(self, stop: Callable[[VmResult], None], stop_at_init: bool, host_name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stop = stop
        self.stop_at_init = stop_at_init
        self.host_name = host_name
        self.clock = clock
        self.started = clock()
        self.milestones: dict[str, float] = {}
        self.init_seconds: float | None = None
        self.init: str | None = None  # the program the kernel ran as init
        self.panicked: str | None = None
        # Markers: the first time each value (a byte) was written, and the latest writes.
        self.first_marker: dict[int, float] = {}
        self.markers: deque[tuple[int, float]] = deque(maxlen=RECENT_MARKERS)
        self._markers_cond = threading.Condition()

    def restart(self) -> None:
        """The VM's vCPUs start now: times are counted from here."""
        self.started = self.clock()

    # --- console ---------------------------------------------------------------------------
    def console_line(self, line: bytes) -> None:
        for name, marker in MILESTONES:
            if name not in self.milestones and marker in line:
                self.milestones[name] = self.clock() - self.started
        at = line.find(PANIC_MARKER)
        if at >= 0:  # keep the message, not the printk timestamp before it
            self.panicked = line[at:].decode(errors="replace").strip()
        m = INIT_RE.search(line)
        if m and self.init_seconds is None:
            init = m.group(1).decode(errors="replace")
            self.init_seconds = self.clock() - self.started
            LOG.info("guest kernel ran %s %.1f s after start", init, self.init_seconds)
            self.init = init
            if self.stop_at_init:
                self.stop(init_reached(init, self.host_name))

    def explain(self, result: VmResult) -> VmResult:
        """A guest reset after a kernel panic is the panic (``panic=-1`` resets at once)."""
        if result.outcome is Outcome.RESET and self.panicked:
            return VmResult(Outcome.PANIC, f"guest kernel panic: {self.panicked}")
        return result

    # --- port 0x80 -------------------------------------------------------------------------
    def marker(self, value: int) -> None:
        """A guest write of ``value`` to port 0x80, with the time since start. Bounded: a
        byte has 256 values, and only the latest :data:`RECENT_MARKERS` writes are kept."""
        t = self.clock() - self.started
        with self._markers_cond:
            self.markers.append((value, t))
            if value not in self.first_marker:
                self.first_marker[value] = t
                self._markers_cond.notify_all()

    def wait_marker(self, value: int, timeout: float, ended: Callable[[], bool] = lambda: False) -> float:
        """Seconds from start to the guest's first write of ``value`` to port 0x80; waits
        up to ``timeout`` (or until ``ended()``). Raises TimeoutError."""
        deadline = self.clock() + timeout
        with self._markers_cond:
            while value not in self.first_marker:
                left = deadline - self.clock()
                if left <= 0 or ended():
                    raise TimeoutError(f"the guest did not write marker {value:#x} to port 0x80 within {timeout:g} s")
                self._markers_cond.wait(min(left, 0.1))
            return self.first_marker[value]


class VmStats:
    """Counters of one run: exits by kind, when the vCPUs started, the time to init."""

    def __init__(self, runner: VcpuRunner, watch: BootWatch) -> None:
        self._runner, self._watch = runner, watch

    @property
    def exit_kinds(self) -> Counter[type]:
        return self._runner.exit_kinds

    @property
    def exits(self) -> Counter[str]:
        """Exits to kvmm by exit name (IoExit, MmioExit, ...)."""
        return Counter({kind.__name__: n for kind, n in self._runner.exit_kinds.items()})

    @property
    def started(self) -> float:
        return self._watch.started

    @property
    def init_seconds(self) -> float | None:
        return self._watch.init_seconds
