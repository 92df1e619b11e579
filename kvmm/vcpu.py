"""The vCPU threads: one per vCPU sits in KVM_RUN (the ioctl releases the GIL) and serves
the exits that come back to kvmm.

- Port and MMIO exits are dispatched inline to the buses (the hot path: no call per exit
  beyond the device's own).
- Every other exit goes through :func:`exit_outcome`, a pure function from an exit to how
  the machine ends (or None: go on), tested without /dev/kvm.
- ``KVM_EXIT_INTERNAL_ERROR`` first goes to the instruction emulator (kvm_pvm's
  emulator cannot run some instructions: :mod:`kvmm.emulate`), which also explains the
  ones it does not handle.
- Pause and stop: :meth:`VcpuRunner.kick` brings every vCPU out of KVM_RUN
  (``immediate_exit`` for the next entry, a signal for one already inside); a vCPU that
  sees a pause request parks until resumed, with the instruction it was in completed.

Nothing a guest does raises out of a vCPU thread: an error ends the run with a result.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from typing import Any, Callable, Protocol

from .coalesced import CoalescedPio
from .config import Outcome, VmResult
from .devices.bus import MmioBus, PioBus
from .errors import KvmmError
from .kvm import ioctls as K
from .kvm import exits as X
from .kvm.exits import InternalErrorExit, InterruptedExit, IoExit, MmioExit
from .kvm.system import Vcpu

LOG = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> bool:
    """vCPU threads are kicked out of KVM_RUN with a signal; its handler must exist (or the
    signal would kill the process), and only the main thread can install it. Importing
    kvmm from the main thread does that once, so machines may run in any thread.
    Returns whether a handler is in place."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None)


install_kick_handler()


def exit_outcome(ex: X.Exit, vcpu_id: int, rip: int | None = None, detail: str | None = None) -> VmResult | None:
    """How the machine ends after exit ``ex`` of vCPU ``vcpu_id`` (at ``rip``, for an
    internal error; ``detail``: the emulator's explanation of it), or None to go on. For
    every exit but port/MMIO I/O and an internal error the host recovered from (the
    vCPU loop serves those itself). A reset is
    reported as RESET; the boot watch turns it into a panic if the kernel had panicked
    (BootWatch.explain)."""
    if isinstance(ex, InterruptedExit):
        return None
    if isinstance(ex, X.ShutdownExit):
        return VmResult(Outcome.RESET, "guest triple fault (KVM_EXIT_SHUTDOWN)")
    if isinstance(ex, X.SystemEventExit):
        if ex.type == K.KVM_SYSTEM_EVENT_SHUTDOWN:
            return VmResult(Outcome.POWEROFF, "guest powered off")
        if ex.type == K.KVM_SYSTEM_EVENT_CRASH:
            return VmResult(Outcome.PANIC, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
        return VmResult(Outcome.RESET, f"guest reset (system event {ex.type})")
    if isinstance(ex, X.HltExit):
        return VmResult(Outcome.POWEROFF, "guest halted")
    if isinstance(ex, X.FailEntryExit):
        return VmResult(Outcome.VCPU_ERROR,
                        f"vCPU {vcpu_id}: KVM could not enter the guest (hardware reason {ex.hardware_reason:#x})")
    if isinstance(ex, InternalErrorExit):
        if detail:
            return VmResult(Outcome.VCPU_ERROR, f"vCPU {vcpu_id}: {detail}")
        what = ("KVM could not emulate an instruction" if ex.suberror == K.KVM_INTERNAL_ERROR_EMULATION
                else f"KVM internal error {ex.suberror}")
        insn = ex.insn.hex(" ") if ex.insn else "unavailable"
        where = f" at RIP {rip:#x}" if rip is not None else ""
        return VmResult(Outcome.VCPU_ERROR, f"vCPU {vcpu_id}: {what}{where} (instruction bytes: {insn})")
    return VmResult(Outcome.VCPU_ERROR, f"vCPU {vcpu_id}: unhandled exit {ex}")


class Recovery(Protocol):
    """What the host can do about a KVM internal error (kvm_pvm's emulator):
    :class:`kvmm.emulate.Emulator`."""

    def recover(self, vcpu: Vcpu, ex: InternalErrorExit) -> bool:
        """True if the vCPU may go on (the instruction was dealt with)."""

    def explain(self, vcpu: Vcpu, ex: InternalErrorExit) -> str:
        """Why the internal error stops the vCPU (disassembly, RIP, symbol, advice)."""

    def counters(self) -> dict[str, int]: ...

    def where(self, rip: int) -> str:
        """`` (symbol+offset, from FILE)`` for a guest kernel address, or ``""``."""


class VcpuRunner:
    """The vCPU threads of one machine. ``stop(result)`` ends the machine's run; the
    runner calls it for a guest-requested end or a vCPU failure, and the machine calls
    :meth:`halt` to bring the threads out."""

    def __init__(self, vcpus: list[Vcpu], pio: PioBus, mmio: MmioBus, coalesced: CoalescedPio | None,
                 recovery: Recovery, stop: Callable[[VmResult], None]) -> None:
        self.vcpus = vcpus
        self.pio = pio
        self.mmio = mmio
        self.coalesced = coalesced
        self.recovery = recovery
        self.stop = stop
        self.exit_kinds: Counter[type] = Counter()  # counted by exit class (cheap)
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self._pause_requested = False
        self._parked = 0
        self._pause_cond = threading.Condition()
        self._dump_lock = threading.Lock()
        self._dump_pending: set[int] = set()
        self._dump_extra: Callable[[], str] = lambda: ""

    # --- threads ---------------------------------------------------------------------------
    def start(self) -> None:
        if not install_kick_handler():
            raise KvmmError("import kvmm from the main thread first: vCPU kicks need a signal handler")
        self.threads = [threading.Thread(target=self._thread, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True)
                        for vcpu in self.vcpus]
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def halt(self, timeout: float | None = None) -> None:
        """Bring every vCPU out for good; with ``timeout``, wait that long for each thread."""
        self.stopping = True
        self.kick()
        with self._pause_cond:  # parked vCPUs leave too
            self._pause_cond.notify_all()
        if timeout is not None:
            for t in self.threads:
                if t is not threading.current_thread():
                    t.join(timeout)
                    if t.is_alive():
                        LOG.warning("%s did not stop within %g s", t.name, timeout)

    def kick(self) -> None:
        """Bring every vCPU out of KVM_RUN: immediate_exit for the next entry, a signal for
        one already inside (a thread that just ended is no error)."""
        me = threading.get_ident()
        for vcpu, thread in zip(self.vcpus, self.threads):
            vcpu.kick()
            if thread.ident is not None and thread.ident != me and thread.is_alive():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def _thread(self, vcpu: Vcpu) -> None:
        try:
            self._loop(vcpu)
        except KvmmError as exc:
            self.stop(VmResult(Outcome.VMM_ERROR, f"vCPU {vcpu.id}: {exc}"))
        except Exception as exc:  # a kvmm bug: report it, never leave the VM half-running
            LOG.exception("vCPU %d: internal error", vcpu.id)
            self.stop(VmResult(Outcome.VMM_ERROR, f"vCPU {vcpu.id}: internal error: {exc!r}"))

    def _loop(self, vcpu: Vcpu) -> None:
        pio = self.pio
        exits = self.exit_kinds
        run = vcpu.run
        coalesced = self.coalesced
        while not self.stopping:
            # Dispatch on the exact class: cheaper per exit than isinstance() chains.
            ex: Any = run()
            if coalesced is not None and coalesced.pending():
                coalesced.drain()  # this vCPU's queued writes come before the access that exited
            kind = type(ex)
            exits[kind] += 1
            if kind is IoExit:
                size = ex.size
                data = ex.data
                if ex.is_write:
                    if size == 1 and ex.count == 1:
                        pio.write(ex.port, 1, data[0])
                    else:
                        for i in range(0, size * ex.count, size):
                            pio.write(ex.port, size, int.from_bytes(data[i : i + size], "little"))
                else:
                    for i in range(0, size * ex.count, size):
                        data[i : i + size] = pio.read(ex.port, size).to_bytes(size, "little")
            elif kind is MmioExit:
                if ex.is_write:
                    self.mmio.write(ex.phys_addr, ex.length, int.from_bytes(ex.data, "little"))
                else:
                    ex.data[:] = self.mmio.read(ex.phys_addr, ex.length).to_bytes(ex.length, "little")
            elif kind is InterruptedExit:
                if self._pause_requested:
                    self._park()
                if self._dump_pending:
                    self._dump(vcpu)
            elif kind is InternalErrorExit and self.recovery.recover(vcpu, ex):
                continue
            else:
                rip = detail = None
                if kind is InternalErrorExit:
                    rip = vcpu.get_regs().rip
                    detail = self.recovery.explain(vcpu, ex)
                result = exit_outcome(ex, vcpu.id, rip, detail)
                if result is not None:
                    self.stop(result)
                    if result.outcome is Outcome.VCPU_ERROR:
                        return

    # --- pause ----------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._pause_requested

    def pause(self, timeout: float) -> None:
        """Park every running vCPU (each one's KVM_RUN returned EINTR, so KVM finished the
        instruction it was in: its state is consistent). Raises KvmmError after
        ``timeout`` seconds, with the vCPUs let go again."""
        if self._pause_requested:
            return
        self._pause_requested = True
        self.kick()
        deadline = time.monotonic() + timeout
        with self._pause_cond:
            while self._parked < sum(t.is_alive() for t in self.threads) and not self.stopping:
                if time.monotonic() > deadline:
                    self._pause_requested = False
                    self._pause_cond.notify_all()
                    raise KvmmError(f"the vCPUs did not pause within {timeout:g} s")
                self._pause_cond.wait(0.02)

    def resume(self) -> None:
        with self._pause_cond:
            self._pause_requested = False
            self._pause_cond.notify_all()

    def _park(self) -> None:
        with self._pause_cond:
            self._parked += 1
            self._pause_cond.notify_all()
            while self._pause_requested and not self.stopping:
                self._pause_cond.wait()
            self._parked -= 1

    # --- register dump (SIGUSR2) ------------------------------------------------------------
    def request_dump(self, extra: Callable[[], str] = lambda: "") -> None:
        """Every vCPU logs its registers at its next exit (``extra()`` adds to each line)."""
        with self._dump_lock:
            self._dump_extra = extra
            self._dump_pending = {vcpu.id for vcpu in self.vcpus}
        self.kick()

    def _dump(self, vcpu: Vcpu) -> None:
        with self._dump_lock:  # each vCPU dumps once per request, whichever order they come in
            if vcpu.id not in self._dump_pending:
                return
            self._dump_pending.discard(vcpu.id)
            extra = self._dump_extra
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        LOG.warning("vCPU %d: RIP %#x%s RSP %#x RFLAGS %#x CR0 %#x CR3 %#x; exits %s; unclaimed ports %s%s",
                    vcpu.id, regs.rip, self.recovery.where(regs.rip), regs.rsp, regs.rflags, sregs.cr0, sregs.cr3,
                    {k.__name__: n for k, n in self.exit_kinds.items()},
                    {hex(p): n for p, n in self.pio.unhandled.most_common(8)}, extra())
