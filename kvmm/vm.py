"""The virtual machine as a user drives it: :class:`Machine`, its lifecycle and its API.

A machine is built once (:mod:`kvmm.builder`: for a boot, or from a snapshot), then run
once: :meth:`Machine.run` makes the calling thread the I/O thread (ioeventfds, irqfd
resamples, console input and output, the control socket, signals) while one thread per
vCPU runs the guest (:mod:`kvmm.vcpu`); :meth:`Machine.launch` does the same in a
background thread. A guest-triggered stop (reset, power-off, debug exit, panic), a vCPU
failure, a signal or a timeout ends the run with a :class:`VmResult`;
:meth:`Machine.close` frees everything. docs/architecture.md has the threads and locks.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from . import __version__
from .builder import Platform, PlatformEvents, build_for_boot, build_from_snapshot
from .config import DiskConfig, NetConfig, Outcome, VmConfig, VmResult, check_seconds, config_from_options
from .console import ConsoleOutput, StdinPump
from .defaults import DEFAULT_CMDLINE, EXIT_DEBUG_BASE, EXIT_OK, EXIT_PANIC, EXIT_TIMEOUT, EXIT_VCPU_ERROR, EXIT_VMM_ERROR
from .errors import ConfigError, KvmmError, SnapshotError
from .eventloop import EventLoop
from .host import HostKind, detect_host
from .emulate import Emulator
from .vcpu import VcpuRunner
from .watch import BootWatch, VmStats

if TYPE_CHECKING:  # imported where used: a VM that never snapshots or serves a socket skips them
    from .api import ApiServer
    from .x86 import PreparedVm

LOG = logging.getLogger(__name__)

# The configuration and result types live in kvmm.config; they are kvmm.vm's API too.
__all__ = [
    "DEFAULT_CMDLINE", "EXIT_DEBUG_BASE", "EXIT_OK", "EXIT_PANIC", "EXIT_TIMEOUT", "EXIT_VCPU_ERROR",
    "EXIT_VMM_ERROR", "DiskConfig", "Machine", "NetConfig", "Outcome", "VmConfig", "VmResult", "VmStats",
    "config_from_options",
]


def _weak(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` of a machine, called only while the machine exists: what the platform
    keeps of its machine must not keep a dropped machine alive (its disks locked)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call


class Machine:
    """A configured VM, ready to :meth:`run` once; :meth:`close` frees everything."""

    def __init__(self, config: VmConfig | None = None, *, prepared: PreparedVm | None = None,
                 _restore: Any = None, **options: object) -> None:
        """``Machine(VmConfig(...))``, or the command line's options as keywords:
        ``Machine(kernel="vmlinux", disks=["root.img"], mem="256M", cmdline="root=/dev/vda")``.

        ``prepared``: the guest RAM and VM made for ``config`` by :func:`kvmm.x86.prepare_vm`,
        which the machine then owns (the kvmm command makes them first, kvmm/cli.py)."""
        if config is None:
            config = config_from_options(**options)  # type: ignore[arg-type]
        elif options:
            raise ConfigError("give either a VmConfig or keyword options, not both")
        self.config = config
        self.host = config.host or detect_host()
        self.loop = EventLoop()
        self._result: VmResult | None = None
        self._result_lock = threading.Lock()
        self._done = threading.Event()
        self._closed = False
        self._io_thread: threading.Thread | None = None
        self.api: ApiServer | None = None
        self.restored_in: float | None = None
        self._restore_started: float | None = None
        stop_at_init = (not self.host.userspace_works) if config.stop_at_init is None else config.stop_at_init
        self.watch = BootWatch(_weak(self.stop), stop_at_init, self.host.name)
        events = PlatformEvents(_weak(self.stop), self.watch.marker)
        try:
            self.platform: Platform = (build_for_boot(config, self.host, self.loop, events, prepared) if _restore is None
                                       else build_from_snapshot(_restore, config, self.host, self.loop, events, prepared))
        except BaseException:
            self.loop.close()
            self._closed = True
            raise
        p = self.platform
        self.recovery = Emulator(p.mem, self.host.emulate, config.cpus, config.kernel)
        self.runner = VcpuRunner(p.vm.vcpus, p.pio, p.mmio, p.coalesced, self.recovery, self.stop)
        self.stats = VmStats(self.runner, self.watch)
        self.console: ConsoleOutput = p.console
        self.console.listeners.append(self.watch.console_line)
        self.console.send_input = _weak(self.send)
        if config.api_socket:
            try:
                from .api import ApiServer

                self.api = ApiServer(self, config.api_socket)
            except BaseException:
                self.close()
                raise

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, console_path: str | None = None, stdin: bool = False,
                verify_memory: bool = False, host: HostKind | None = None, api_socket: str | None = None,
                disks: list[str] | None = None, prepared: PreparedVm | None = None) -> Machine:
        """A machine recreated from the snapshot directory ``path``, ready to :meth:`run`
        (or :meth:`launch`): the guest continues where the snapshot paused it. ``disks``
        replaces the snapshot's disk paths in order (copies with their mtime preserved).
        ``prepared``: a VM made ahead for this snapshot (:class:`kvmm.pool.RestorePool`
        hands them out). Raises SnapshotError if the snapshot is damaged or does not match this host and
        its disks."""
        started = time.monotonic()
        from .snapshot import config_from_saved, read_snapshot

        snap = read_snapshot(path, verify_memory=verify_memory, disk_paths=disks)
        config = config_from_saved(snap.manifest.config, console_path=console_path, stdin=stdin, host=host,
                                   api_socket=api_socket)
        machine = cls(config, prepared=prepared, _restore=snap)  # owns ``prepared`` from here, built or not
        machine.restored_in = time.monotonic() - started  # start() updates it once the vCPUs run
        machine._restore_started = started
        return machine

    @staticmethod
    def run_command(command: list[str], **options: Any) -> Any:
        """Run ``command`` in a VM booted on the host's own files (``kvmm run``): a
        :class:`kvmm.run.RunResult` with its exit status and output. The options are
        :func:`kvmm.run.run_command`'s (kernel, root, rw, shares, mem, timeout...)."""
        from .run import run_command

        return run_command(command, **options)

    # --- what the machine's parts know -----------------------------------------------------
    @property
    def restored_from(self) -> str | None:
        return self.platform.restored_from

    @property
    def markers(self) -> list[tuple[int, float]]:
        """The latest port 0x80 writes: (value, seconds from start), in order."""
        return list(self.watch.markers)

    # --- running -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPU threads (run() does; the I/O loop must be served meanwhile)."""
        self.watch.restart()
        self.runner.start()
        if self.restored_from is not None:
            # A notify the guest sent just before the snapshot is in no eventfd of this VM.
            for transport in self.platform.transports:
                self.loop.call_soon(transport.kick_ready_queues)
        if self._restore_started is not None:
            self.restored_in = time.monotonic() - self._restore_started
            LOG.info("restored in %.1f ms (snapshot read, VM rebuilt, vCPUs running)", self.restored_in * 1e3)
            self._restore_started = None

    def run(self, timeout: float | None = None) -> VmResult:
        """Run until the guest or a signal ends the VM (or ``timeout`` seconds pass).

        The calling thread becomes the I/O thread: it serves ioeventfds, irqfd resamples,
        console input and output, and signals, until the VM ends."""
        timeout = check_seconds(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        console, loop, coalesced = self.console, self.loop, self.platform.coalesced
        old_handlers: dict[int, Any] = {}
        old_wakeup = None
        stdin = StdinPump(loop, self.platform.input_device, lambda: self.stop(
            VmResult(Outcome.INTERRUPTED, "quit from the console (Ctrl-A x)", signal=signal.SIGINT)))
        main = threading.current_thread() is threading.main_thread()
        try:
            if main:
                old_wakeup = signal.set_wakeup_fd(loop.wakeup_fd)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    old_handlers[signum] = signal.signal(signum, self._on_signal)
                old_handlers[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda s, f: self.request_dump())
            if self.config.stdin:
                stdin.start()
            loop.owner = threading.get_ident()
            self.start()
            while not self._done.is_set():
                loop.run_once(timeout=0.05)
                if not self.paused:
                    stdin.poll()
                if coalesced is not None and coalesced.pending():
                    coalesced.drain()
                console.flush()
                if not self.runner.alive():
                    self.stop(VmResult(Outcome.VMM_ERROR, "all vCPU threads ended"))
                if deadline is not None and time.monotonic() > deadline:
                    self.stop(VmResult(Outcome.TIMEOUT, f"the VM ran for its {timeout:g} s time limit"))
            self.runner.halt(timeout=5)
        finally:
            loop.owner = None
            if coalesced is not None:
                coalesced.drain()
            stdin.stop()
            if main:
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
                signal.set_wakeup_fd(old_wakeup if old_wakeup is not None else -1)
            console.flush()
            console.mark_ended(self._result.message if self._result else "kvmm stopped")
        assert self._result is not None
        return self._result

    def launch(self, timeout: float | None = None) -> None:
        """Run the VM in a background thread (the I/O thread); returns at once."""
        if self._io_thread is not None:
            raise KvmmError("this machine was already launched")
        check_seconds(timeout)  # here, not in the thread: the caller gets the error
        self._io_thread = threading.Thread(target=self._run_in_background, args=(timeout,), name="kvmm-io", daemon=True)
        self._io_thread.start()

    def _run_in_background(self, timeout: float | None) -> None:
        try:
            self.run(timeout)
        except BaseException as exc:  # surfaces through wait()
            self.stop(VmResult(Outcome.VMM_ERROR, f"kvmm failed: {exc!r}"))

    def wait(self, timeout: float | None = None) -> VmResult:
        """How the VM ended; raises TimeoutError if it still runs after ``timeout``."""
        if self._io_thread is None:
            raise KvmmError("this machine was not launched")
        self._io_thread.join(timeout)
        if self._io_thread.is_alive():
            raise TimeoutError(f"the VM still runs after {timeout} s")
        assert self._result is not None
        return self._result

    def send(self, text: str | bytes) -> None:
        """Type ``text`` on the primary console."""
        data = text.encode() if isinstance(text, str) else text
        while data:
            data = data[self.platform.input_device.receive(data):]
            if data:
                time.sleep(0.01)  # the guest has not drained its input yet

    def stop(self, result: VmResult) -> None:
        """End the run with ``result`` (the first result wins) and bring every vCPU out."""
        with self._result_lock:
            if self._result is None:
                self._result = self.watch.explain(result)
        self.runner.halt()
        self._done.set()
        self.loop.wake()  # the I/O thread may sit in select(): end the run now, not at its timeout

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop(VmResult(Outcome.INTERRUPTED, f"stopped by {signal.Signals(signum).name}", signal=signum))

    @property
    def stopped(self) -> bool:
        return self._done.is_set()

    # --- reports ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "state": "stopped" if self.stopped else "paused" if self.paused else "running",
            "uptime": round(time.monotonic() - self.watch.started, 3),
            "cpus": self.config.cpus, "mem_size": self.config.mem_size, "restored_from": self.restored_from,
            "kvmm_version": __version__,
        }

    def exit_report(self) -> dict[str, int]:
        """Exits to kvmm by kind, how queue notifies arrived (VM exit or ioeventfd), the
        interrupts sent, and every device's and the host recoveries' counters."""
        return {**self.stats.exits, **self.platform.counters(), **self.recovery.counters()}

    def request_dump(self) -> None:
        """Log every vCPU's registers and the exit counts (SIGUSR2 on the command line)."""
        self.runner.request_dump()

    def wait_marker(self, value: int, timeout: float) -> float:
        """Wait until the guest writes ``value`` to port 0x80; returns the seconds from the
        VM's start to that write. Raises TimeoutError."""
        return self.watch.wait_marker(value, timeout, self._done.is_set)

    def boot_times(self) -> dict[str, float]:
        """Seconds from the VM's start to the Linux boot milestones seen on the console."""
        return dict(self.watch.milestones)

    # --- pause, resume, snapshot (from any thread; they run on the I/O thread) -------------
    @property
    def paused(self) -> bool:
        return self.runner.paused

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU at an instruction boundary, with any port or MMIO access it was
        in the middle of completed, and hold the I/O thread's device work (queue notifies,
        network input, console input). Safe to call from any thread."""
        self.loop.call(lambda: self._pause(timeout))

    def resume(self) -> None:
        self.loop.call(self._resume)

    def _pause(self, timeout: float = 10.0) -> None:
        if self.runner.paused:
            return
        self.runner.pause(timeout)
        self.loop.hold()
        if self.platform.coalesced is not None:
            self.platform.coalesced.drain()  # the UART (and a snapshot of it) sees every write
        self.console.flush()
        LOG.info("VM paused")

    def _resume(self) -> None:
        if not self.runner.paused:
            return
        self.loop.release()
        self.runner.resume()
        LOG.info("VM resumed")

    def snapshot(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write a snapshot of the VM to the new directory ``path`` and return what was
        written. A running VM is paused for the snapshot and resumes after it; disks are
        flushed first. Safe to call from any thread."""
        return self.loop.call(lambda: self._snapshot(path))  # type: ignore[no-any-return]

    def _snapshot(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        from .snapshot import check_target, saved_config, write_snapshot

        check_target(path)  # a name no file system takes (a NUL, too long): refused before the pause
        cfg, boot = self.config, self.platform.boot
        if cfg.debug_exit or cfg.pc_testdev or cfg.cpu_features or (boot is not None and boot.kind == "multiboot"):
            # kvmm/testkernels.py: a snapshot does not record these (yet); a restore would lack them.
            raise SnapshotError("a VM with a multiboot kernel, --debug-exit, --pc-testdev or --cpu-features cannot be snapshotted")
        started = time.monotonic()
        was_paused = self.paused
        if not was_paused:
            self._pause()
        try:
            try:
                self.platform.flush_devices()
            except OSError as exc:
                raise SnapshotError(f"flushing the disks before the snapshot failed: {exc.strerror}") from None
            write_snapshot(path, saved_config(self.config, self.platform.cmdline), self.platform.save_state(),
                           self.platform.mem.save_sparse)  # type: ignore[union-attr]
        finally:
            if not was_paused:
                self._resume()
        seconds = time.monotonic() - started
        used = os.stat(os.path.join(path, "memory.bin")).st_blocks * 512
        LOG.info("snapshot written to %s in %.0f ms (%d MiB of %d MiB RAM stored)", path, seconds * 1e3, used >> 20,
                 self.config.mem_size >> 20)
        return {"path": os.path.abspath(path), "seconds": round(seconds, 4), "memory_bytes_stored": used}

    # --- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the VM if it runs, then release everything it holds: vCPU threads ended,
        every fd closed, disks flushed and unlocked. Safe to call twice."""
        if self._closed:
            return
        if self._io_thread is not None and self._io_thread.is_alive():
            self.stop(VmResult(Outcome.INTERRUPTED, "the machine was closed", signal=signal.SIGTERM))
            self._io_thread.join(timeout=10)
        self.runner.halt(timeout=5)
        self._closed = True
        if self.api is not None:
            self.api.close()
            self.api = None
        self.platform.close()
        self.loop.close()

    def __del__(self) -> None:
        # A machine dropped without close(): its disks must not stay locked (and its fds
        # open) for the rest of the process. Only reached once no vCPU thread runs.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # at interpreter exit, modules may be half gone
                pass

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
