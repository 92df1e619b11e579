"""The virtual machine: KVM objects, guest RAM, loaded kernel, devices and vCPU threads.

One thread per vCPU sits in KVM_RUN (the ioctl releases the GIL) and dispatches port-I/O
exits to the :class:`~kvmm.devices.bus.PioBus`. The thread that calls :meth:`Machine.run`
serves console input, periodic output flushes and signals, and collects the result. A
guest-triggered stop (reset, power-off, debug exit, panic) or a vCPU failure ends the run
with a :class:`VmResult`; nothing a guest does raises out of a vCPU thread.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from . import __version__, x86
from .console import ConsoleOutput, TerminalInput
from .coalesced import CoalescedPio
from .eventloop import EventLoop, drain_eventfd, make_eventfd
from .devices.bus import MmioBus, PioBus
from .devices.cmos import Cmos
from .devices.debug import DEBUG_EXIT_PORT, POST_PORT, DebugExit, PostCode
from .devices.i8042 import I8042
from .devices.pci import PciBus
from .devices.serial import Serial8250
from .errors import ConfigError, KvmError, KvmmError, SnapshotError
from .host import HostKind, build_cmdline, detect_host
from .irq import GsiRouter
from .kvm import ioctls as K
from .kvm.exits import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
)
from .kvm.system import Kvm, Vcpu, Vm
from .loader import FLAT_SEGMENT, BootInfo, load_flat, load_linux, read_image
from .loader import bootparams as bp
from .memory import GuestMemory
from .state import check_length
from .defaults import (
    COM1_BASE,
    COM1_IRQ,
    CONSOLE_DEVICES,
    DEFAULT_CMDLINE,
    EXIT_DEBUG_BASE,
    EXIT_OK,
    EXIT_PANIC,
    EXIT_TIMEOUT,
    EXIT_VCPU_ERROR,
    EXIT_VMM_ERROR,
    MAX_CPUS,
    PCI_IRQ_BASE,
    PCI_IRQ_COUNT,
)
from .config import (
    DiskConfig,
    NetConfig,
    Outcome,
    VmConfig,
    VmResult,
    config_from_options,
)

LOG = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported where used: a VM that never snapshots, serves a socket or has a
    # given device skips its module at start (imports are most of kvmm's start-up time)
    from .api import ApiServer
    from .snapshot import MachineState, SavedConfig, Snapshot, VcpuStateIo
    from .tap import Tap
    from .virtio.blk import RawDisk
    from .virtio.device import VirtioDevice
    from .virtio.pci_legacy import VirtioPciLegacy
    from .x86 import PreparedVm

# The configuration and result types live in kvmm.config; they are kvmm.vm's API too.
__all__ = [
    "DEFAULT_CMDLINE", "EXIT_DEBUG_BASE", "EXIT_OK", "EXIT_PANIC", "EXIT_TIMEOUT", "EXIT_VCPU_ERROR",
    "EXIT_VMM_ERROR", "DiskConfig", "IrqfdLine", "Machine", "NetConfig", "Outcome", "VmConfig", "VmResult",
    "VmStats", "config_from_options",
]

KICK_SIGNAL = signal.SIGUSR1
FWAIT = b"\x9b"

def _install_kick_handler() -> None:
    """vCPU threads are kicked out of KVM_RUN with a signal; its handler must exist (or the
    signal would kill the process), and only the main thread can install it. Importing
    kvmm from the main thread does that once, so machines may run in any thread."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


_install_kick_handler()

PANIC_MARKER = b"Kernel panic - not syncing"
# Console lines that mark the phases of a Linux boot (Machine.boot_times()).
MILESTONES = (("kernel_start", b"Linux version "), ("root_mounted", b"VFS: Mounted root"),
              ("init_started", b" as init process"))
INIT_RE = re.compile(rb"Run (\S+) as init process")


@dataclass
class VmStats:
    """Counters of one run: exits by kind, the pvm workarounds applied, the time to init."""

    exit_kinds: Counter[type] = field(default_factory=Counter)  # counted by exit class (cheap)
    int3_injected: int = 0
    fwait_skipped: int = 0
    started: float = field(default_factory=time.monotonic)
    init_seconds: float | None = None

    @property
    def exits(self) -> Counter[str]:
        """Exits to kvmm by exit name (IoExit, MmioExit, ...)."""
        return Counter({kind.__name__: n for kind, n in self.exit_kinds.items()})


class IrqfdLine:
    """A level-triggered interrupt line driven through a KVM irqfd with a resample fd.

    Writing the irqfd asserts the line without an ioctl. KVM de-asserts it when the guest
    EOIs the interrupt and signals the resample fd; if the device still has the interrupt
    pending (``still_pending``), it is asserted again: level semantics, as INTx needs."""

    def __init__(self, vm: "Vm", gsi: int, loop: EventLoop, still_pending: Callable[[], bool]) -> None:
        self.gsi = gsi
        self.fd = make_eventfd()
        self.resample_fd = make_eventfd()
        self.still_pending = still_pending
        vm.irqfd(self.fd, gsi, flags=K.KVM_IRQFD_FLAG_RESAMPLE, resamplefd=self.resample_fd)
        loop.add_reader(self.resample_fd, self._resample)
        self.asserts = 0

    def __call__(self, level: int) -> None:
        if level:
            self.asserts += 1
            os.eventfd_write(self.fd, 1)
        # level 0: KVM lowers the line at the guest's EOI (then _resample runs)

    def _resample(self) -> None:
        if drain_eventfd(self.resample_fd) and self.still_pending():
            os.eventfd_write(self.fd, 1)


class Machine:
    """A configured VM, ready to :meth:`run` once; :meth:`close` frees everything."""

    def __init__(self, config: VmConfig | None = None, *, prepared: PreparedVm | None = None, **options: object) -> None:
        """``Machine(VmConfig(...))``, or the command line's options as keywords:
        ``Machine(kernel="vmlinux", disks=["root.img"], mem="256M", cmdline="root=/dev/vda")``.

        ``prepared``: the guest RAM and VM made for ``config`` by :func:`kvmm.x86.prepare_vm`,
        which the machine then owns (the kvmm command makes them first, kvmm/cli.py)."""
        if config is None:
            config = config_from_options(**options)  # type: ignore[arg-type]
        elif options:
            raise ConfigError("give either a VmConfig or keyword options, not both")
        self._setup(config, None, prepared)

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, console_path: str | None = None, stdin: bool = False,
                verify_memory: bool = False, host: HostKind | None = None, api_socket: str | None = None,
                disks: list[str] | None = None) -> Machine:
        """A machine recreated from the snapshot directory ``path``, ready to :meth:`run`
        (or :meth:`launch`): the guest continues where the snapshot paused it. ``disks``
        replaces the snapshot's disk paths in order (copies with their mtime preserved).
        Raises SnapshotError if the snapshot is damaged or does not match this host and
        its disks."""
        started = time.monotonic()
        from .snapshot import read_snapshot

        snap = read_snapshot(path, verify_memory=verify_memory, disk_paths=disks)
        saved = snap.manifest.config
        config = VmConfig(
            kernel=saved.kernel, cmdline=saved.cmdline, mem_size=saved.mem_size, cpus=saved.cpus,
            console_path=console_path, stdin=stdin, stop_at_init=False,
            disks=[DiskConfig(d.path, d.read_only, d.serial) for d in saved.disks],
            nets=[NetConfig(n.tap, n.mac) for n in saved.nets], exitless=saved.exitless, msix=saved.msix,
            console_device=saved.console_device, rng=saved.rng, host=host, api_socket=api_socket,
        )
        machine = cls.__new__(cls)
        machine._setup(config, snap)
        machine.restored_in = time.monotonic() - started  # start() updates it once the vCPUs run
        machine._restore_started = started
        return machine

    restored_in: float | None = None
    _restore_started: float | None = None

    def _setup(self, config: VmConfig, snapshot: Snapshot | None, prepared: PreparedVm | None = None) -> None:
        self.config = config
        self.host = config.host or detect_host()
        self.stats = VmStats()
        self._result: VmResult | None = None
        self._result_lock = threading.Lock()
        self._done = threading.Event()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._kvm: Kvm | None = None
        self.disks: list[RawDisk] = []
        self.taps: list[Tap] = []
        self.markers: list[tuple[int, float]] = []
        self.milestones: dict[str, float] = {}
        self._markers_cond = threading.Condition()
        self.loop = EventLoop()
        self.mem: GuestMemory | None = None
        self.console: ConsoleOutput | None = None
        self._pause_requested = False
        self._parked = 0
        self._pause_cond = threading.Condition()
        self._io_ident: int | None = None
        self.api: ApiServer | None = None
        if prepared is not None:  # ours from here on, closed with the machine
            self.mem, self._kvm, self.vm = prepared
        try:
            if not 1 <= config.cpus <= MAX_CPUS:
                raise ConfigError(f"--cpus must be between 1 and {MAX_CPUS}, not {config.cpus}")
            self._build(snapshot, prepared)
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------------------
    def _build(self, snapshot: Snapshot | None, prepared: PreparedVm | None) -> None:
        cfg = self.config
        if snapshot is None:
            kernel = read_image(cfg.kernel, "kernel")
            initrd = read_image(cfg.initrd, "initrd") if cfg.initrd else None
        if cfg.disks:
            from .virtio.blk import RawDisk

            self.disks.extend(RawDisk(d.path, d.read_only, d.serial) for d in cfg.disks)
        if cfg.nets:
            from .tap import Tap

            self.taps.extend(Tap(n.tap) for n in cfg.nets)
        if cfg.kernel_format not in ("auto", "flat"):
            raise ConfigError(f"unknown kernel format {cfg.kernel_format!r}: expected auto or flat")
        if cfg.console_device not in CONSOLE_DEVICES:
            raise ConfigError(f"unknown console device {cfg.console_device!r}: expected serial or virtio")
        defaults = cfg.default_cmdline
        if cfg.console_device == "virtio":
            defaults = tuple("console=hvc0" if w == "console=ttyS0" else w for w in defaults)
        if snapshot is None:
            self.cmdline = build_cmdline(cfg.cmdline, defaults, self.host.extra_cmdline)
        else:
            self.cmdline = cfg.cmdline  # the command line the snapshot's kernel booted with
        self.stop_at_init = (not self.host.userspace_works) if cfg.stop_at_init is None else cfg.stop_at_init

        # User input first (memory size, hugepages), then KVM.
        if prepared is not None:
            mem, kvm, vm = prepared
            if mem.size != cfg.mem_size:
                raise ConfigError(f"the prepared VM has {mem.size} bytes of RAM, the configuration {cfg.mem_size}")
        else:
            if snapshot is None:
                self.mem = mem = GuestMemory.allocate(cfg.mem_size, cfg.hugepages)
            else:
                self.mem = mem = GuestMemory.from_file(snapshot.memory_path, cfg.mem_size)
            self._kvm = kvm = Kvm()
            # A restored UART's interrupt state decides its coalescing, after the state is loaded.
            self.vm = vm = x86.create_vm(kvm, mem, coalesce_uart=cfg.exitless and snapshot is None)

        self.boot: BootInfo | None = None
        if snapshot is None and cfg.kernel_format == "flat":
            if initrd is not None:
                raise ConfigError("a flat image takes no --initrd")
            self.boot = load_flat(mem, kernel, name=cfg.kernel)
        elif snapshot is None:
            self.boot = load_linux(mem, kernel, self.cmdline, initrd, name=cfg.kernel)
            x86.write_boot_tables(mem)
        if self.host.software_nested:
            workarounds = [] if snapshot else [f"adding kernel parameters '{' '.join(self.host.extra_cmdline)}'"]
            if self.host.inject_int3:
                workarounds.append("delivering int3 (and stepping over fwait) by hand")
            LOG.info("host KVM is %s (software nested, no VT-x/AMD-V): %s", self.host.name, " and ".join(workarounds))
        if snapshot is not None:
            LOG.info("restoring %s: %s, %d MiB, %d vCPU%s, taken %s", snapshot.path, cfg.kernel, cfg.mem_size >> 20,
                     cfg.cpus, "s" if cfg.cpus > 1 else "", snapshot.manifest.created)
        else:
            assert self.boot is not None
            LOG.info("%s %s, %d MiB, %d vCPU%s, cmdline: %s", self.boot.kind, cfg.kernel, cfg.mem_size >> 20,
                     cfg.cpus, "s" if cfg.cpus > 1 else "", self.cmdline)

        self.console = ConsoleOutput(path=cfg.console_path)
        self.console.listeners.append(self._watch_console)
        self.pio = pio = PioBus()
        self.serial = Serial8250(self.console.write, lambda level: vm.irq_line(COM1_IRQ, level))
        pio.register(COM1_BASE, 8, self.serial)
        self.i8042 = I8042(lambda: self.stop(self._guest_reset("guest reset through the i8042")))
        pio.register(0x60, 5, self.i8042)
        self.cmos = Cmos()
        pio.register(0x70, 2, self.cmos)
        self.post = PostCode(self._marker)
        pio.register(POST_PORT, 1, self.post)
        pio.register(DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit))

        self.mmio = MmioBus()
        self.pci = PciBus(pio, self.mmio)
        self.router = GsiRouter(vm)
        self.virtio: list[VirtioPciLegacy] = []
        self._pci_irqs: list[tuple[int, int, int]] = []
        if self.disks:
            from .virtio.blk import VirtioBlk

            for disk in self.disks:
                self._add_virtio(VirtioBlk(disk, mem))
        self.nets: list[VirtioNet] = []
        if self.taps:
            from .virtio.net import VirtioNet

            self.nets = [VirtioNet(tap, mem, self.loop, n.mac) for tap, n in zip(self.taps, cfg.nets)]
        for net in self.nets:
            self._add_virtio(net)
        self.virtio_console: VirtioConsole | None = None
        if cfg.console_device == "virtio":
            from .virtio.console import VirtioConsole

            self.virtio_console = VirtioConsole(mem, self.console.write)
            self._add_virtio(self.virtio_console)
        self.rng: VirtioRng | None = None
        if cfg.rng:
            from .virtio.rng import VirtioRng

            self.rng = VirtioRng(mem)
            self._add_virtio(self.rng)
        # Host input goes to the primary console.
        self.input_device: Serial8250 | VirtioConsole = self.virtio_console or self.serial
        self.console.send_input = self.send
        if snapshot is None:
            mem.write(bp.EBDA_START, x86.build_mptable(cfg.cpus, pci_irqs=self._pci_irqs))

        supported = kvm.supported_cpuid()
        msrs = x86.boot_msrs()
        for i in range(cfg.cpus):
            vcpu = vm.create_vcpu(i)
            x86.setup_cpuid(kvm, vcpu, cfg.cpus, supported, self.host.hidden_kvm_features)
            if self.boot is not None:  # booting, not restoring
                self._set_msrs(vcpu, msrs)
                x86.setup_fpu(vcpu)
                x86.setup_lapic(vcpu)
                if i == 0 and self.boot.kind == "flat":
                    x86.setup_real_mode(vcpu, FLAT_SEGMENT)
                elif i == 0:
                    x86.setup_long_mode(vcpu, self.boot.entry, self.boot.boot_params)
        self.coalesced: CoalescedPio | None = None
        ring_page = kvm.check_extension(K.KVM_CAP_COALESCED_MMIO)
        if cfg.exitless and ring_page and kvm.check_extension(K.KVM_CAP_COALESCED_PIO):
            self.coalesced = CoalescedPio(vm, vm.vcpus[0].mapped_page(ring_page), pio)
        else:
            for port, size in list(vm.coalesced_pio):  # a prepared VM's: nothing here would drain them
                vm.coalesce_pio(port, size, False)
        if snapshot is not None:
            self._load_state(snapshot.state)
            self.restored_from = str(snapshot.path)
        if self.coalesced is not None:
            self.serial.on_thri_change = self._coalesce_serial
            self._coalesce_serial(self.serial.thri_enabled)
        if cfg.api_socket:
            from .api import ApiServer

            self.api = ApiServer(self, cfg.api_socket)

    def _coalesce_serial(self, thri_enabled: bool) -> None:
        """Queue THR writes in the coalesced ring while the guest polls the UART; let
        them exit while it waits for the THR-empty interrupt (kvmm/coalesced.py)."""
        assert self.coalesced is not None
        self.coalesced.set_zone(COM1_BASE, 1, not thri_enabled)

    def _add_virtio(self, device: VirtioDevice) -> VirtioPciLegacy:
        """Put ``device`` on the PCI bus behind a legacy virtio-PCI transport, with INTA on
        an IOAPIC input and, where configured, MSI-X, an ioeventfd per queue and irqfds."""
        from .virtio.pci_legacy import VirtioPciLegacy

        cfg, vm, mem = self.config, self.vm, self.mem
        assert mem is not None
        transport = VirtioPciLegacy(device, mem, set_irq=lambda level: None, msix=cfg.msix)
        if transport.msix is not None:
            self._wire_msix(transport)
        slot = self.pci.add(transport)
        gsi = PCI_IRQ_BASE + (slot - 1) % PCI_IRQ_COUNT
        transport.set_interrupt(gsi)
        if cfg.exitless:
            transport.set_irq = IrqfdLine(vm, gsi, self.loop, lambda: transport.isr != 0)
            transport.notify_host = self
        else:
            transport.set_irq = functools.partial(vm.irq_line, gsi)
        self._pci_irqs.append((slot, 0, gsi))
        self.virtio.append(transport)
        return transport

    def _wire_msix(self, transport: VirtioPciLegacy) -> None:
        """Give each of the device's MSI-X vectors a GSI with an irqfd."""
        assert transport.msix is not None
        vectors = [self.router.allocate_msi() for _ in range(transport.msix.nvec)]

        def route(vec: int, address: int, data: int) -> None:
            if address:
                vectors[vec].route(address, data)
            else:
                vectors[vec].unroute()

        transport.msi_fire = lambda vec: vectors[vec].fire()
        transport.msi_route = route
        transport.msi_vectors = vectors  # type: ignore[attr-defined]

    # --- ioeventfds (NotifyHost) ---------------------------------------------------------
    def add_ioeventfd(self, port: int, datamatch: int, callback: Callable[[], None]) -> int:
        """A 16-bit port write of ``datamatch`` to ``port`` signals an eventfd in KVM instead
        of exiting; the I/O thread then runs ``callback``."""
        fd = make_eventfd()
        self.vm.ioeventfd(fd, port, 2, datamatch=datamatch)

        def ready() -> None:
            if drain_eventfd(fd):
                callback()

        self.loop.call_soon(lambda: self.loop.add_reader(fd, ready))
        return fd

    def defer(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon(callback)

    def remove_ioeventfd(self, fd: int, port: int, datamatch: int) -> None:
        try:
            self.vm.ioeventfd(fd, port, 2, datamatch=datamatch, deassign=True)
        except KvmError as exc:
            LOG.debug("removing ioeventfd on port %#x: %s", port, exc)

        def drop() -> None:
            self.loop.remove_reader(fd)
            os.close(fd)

        self.loop.call_soon(drop)

    @staticmethod
    def _set_msrs(vcpu: Vcpu, msrs: dict[int, int]) -> None:
        try:
            vcpu.set_msrs(msrs)
        except KvmError:
            # Some KVMs refuse an MSR of the list (emulated ones differ); set what they take.
            for index, value in msrs.items():
                try:
                    vcpu.set_msrs({index: value})
                except KvmError:
                    LOG.debug("KVM refused MSR %#x; left at its reset value", index)

    # --- snapshots ---------------------------------------------------------------------------
    _vcpu_state_io: VcpuStateIo | None = None

    @property
    def _vcpu_state(self) -> VcpuStateIo:
        """vCPU state through what this host's KVM offers (made at the first use)."""
        if self._vcpu_state_io is None:
            from .snapshot import VcpuStateIo

            assert self._kvm is not None
            kvm = self._kvm
            self._vcpu_state_io = VcpuStateIo(kvm.msr_index_list(), bool(kvm.check_extension(K.KVM_CAP_XSAVE)),
                                              bool(kvm.check_extension(K.KVM_CAP_XCRS)))
        return self._vcpu_state_io

    def _save_state(self) -> MachineState:
        """Everything a restore needs besides RAM; vCPUs and device work must be paused."""
        from .snapshot import MachineState, save_vm

        return MachineState(
            save_vm(self.vm), [self._vcpu_state.save(vcpu) for vcpu in self.vm.vcpus], self.serial.save_state(),
            self.cmos.save_state(), self.pci.save_state(), [t.save_state() for t in self.virtio],
        )

    def _load_state(self, st: MachineState) -> None:
        """Apply a snapshot's state to the freshly built machine (nothing has run yet):
        VM-wide KVM state, devices (PCI config space before the transports, whose ports
        it places), then each vCPU."""
        from .snapshot import load_devices, restore_vm

        restore_vm(self.vm, st.vm)
        load_devices(st, self.serial, self.cmos, self.pci, self.virtio)
        check_length("state.vcpus", st.vcpus, len(self.vm.vcpus))
        for vcpu, saved in zip(self.vm.vcpus, st.vcpus):
            self._vcpu_state.restore(vcpu, saved, f"state.vcpus[{vcpu.id}]")

    def _saved_config(self) -> SavedConfig:
        from .snapshot import SavedConfig, SavedNet, disk_identity

        cfg = self.config
        return SavedConfig(
            kernel=os.path.abspath(cfg.kernel), cmdline=self.cmdline, mem_size=cfg.mem_size, cpus=cfg.cpus,
            disks=[disk_identity(d.path, d.read_only, d.serial) for d in cfg.disks],
            nets=[SavedNet(n.tap, net.mac) for n, net in zip(cfg.nets, self.nets)], exitless=cfg.exitless,
            msix=cfg.msix, console_device=cfg.console_device, rng=cfg.rng,
        )

    def snapshot(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write a snapshot of the VM to the new directory ``path`` and return what was
        written. A running VM is paused for the snapshot and resumes after it; disks are
        flushed first. Safe to call from any thread."""
        return self._on_io_thread(lambda: self._snapshot(path))  # type: ignore[no-any-return]

    def _snapshot(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        started = time.monotonic()
        was_paused = self.paused
        if not was_paused:
            self._pause()
        try:
            for disk in self.disks:
                try:
                    disk.flush()
                except OSError as exc:
                    raise SnapshotError(f"flushing disk {disk.path} before the snapshot failed: {exc.strerror}") from None
            assert self.mem is not None
            from .snapshot import write_snapshot

            write_snapshot(path, self._saved_config(), self._save_state(), self.mem.save_sparse)
        finally:
            if not was_paused:
                self._resume()
        seconds = time.monotonic() - started
        used = os.stat(os.path.join(path, "memory.bin")).st_blocks * 512
        LOG.info("snapshot written to %s in %.0f ms (%d MiB of %d MiB RAM stored)", path, seconds * 1e3, used >> 20,
                 self.config.mem_size >> 20)
        return {"path": os.path.abspath(path), "seconds": round(seconds, 4), "memory_bytes_stored": used}

    restored_from: str | None = None

    @property
    def stopped(self) -> bool:
        return self._done.is_set()

    def status(self) -> dict[str, Any]:
        return {
            "state": "stopped" if self.stopped else "paused" if self.paused else "running",
            "uptime": round(time.monotonic() - self.stats.started, 3),
            "cpus": self.config.cpus, "mem_size": self.config.mem_size, "restored_from": self.restored_from,
            "kvmm_version": __version__,
        }

    # --- pause and resume -------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._pause_requested

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU at an instruction boundary, with any port or MMIO access it was
        in the middle of completed, and hold the I/O thread's device work (queue notifies,
        network input, console input). Safe to call from any thread."""
        self._on_io_thread(lambda: self._pause(timeout))

    def resume(self) -> None:
        self._on_io_thread(self._resume)

    def _pause(self, timeout: float = 10.0) -> None:
        if self._pause_requested:
            return
        self._pause_requested = True
        self._kick_vcpus()
        deadline = time.monotonic() + timeout
        with self._pause_cond:
            while self._parked < sum(t.is_alive() for t in self._threads) and not self._stopping:
                if time.monotonic() > deadline:
                    self._pause_requested = False
                    self._pause_cond.notify_all()
                    raise KvmmError(f"the vCPUs did not pause within {timeout:g} s")
                self._pause_cond.wait(0.02)
        self.loop.hold()
        if self.coalesced is not None:
            self.coalesced.drain()  # the UART (and a snapshot of it) sees every write
        if self.console is not None:
            self.console.flush()
        LOG.info("VM paused")

    def _resume(self) -> None:
        if not self._pause_requested:
            return
        self.loop.release()
        with self._pause_cond:
            self._pause_requested = False
            self._pause_cond.notify_all()
        LOG.info("VM resumed")

    def _park(self) -> None:
        """A vCPU thread waits here while the VM is paused (its KVM_RUN returned EINTR, so
        KVM finished the instruction it was in: its state is consistent)."""
        with self._pause_cond:
            self._parked += 1
            self._pause_cond.notify_all()
            while self._pause_requested and not self._stopping:
                self._pause_cond.wait()
            self._parked -= 1

    def _on_io_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the I/O thread (where device work runs, so it sees no device
        mid-request) and return its result; directly if that is this thread or none runs."""
        if self._io_ident is None or self._io_ident == threading.get_ident():
            return fn()
        import concurrent.futures

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller's thread
                    fut.set_exception(exc)

        self.loop.call_soon(call)
        while True:
            try:
                return fut.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if self._io_ident is None and fut.cancel():  # the loop ended before it ran
                    return fn()

    # --- stopping ------------------------------------------------------------------------
    def stop(self, result: VmResult) -> None:
        """End the run with ``result`` (the first result wins) and kick every vCPU out."""
        with self._result_lock:
            if self._result is None:
                self._result = result
        self._stopping = True
        self._kick_vcpus()
        with self._pause_cond:  # parked vCPUs leave too
            self._pause_cond.notify_all()
        self._done.set()
        self.loop.wake()  # the I/O thread may sit in select(): end the run now, not at its timeout

    def _kick_vcpus(self) -> None:
        """Bring every vCPU out of KVM_RUN: immediate_exit for the next entry, a signal for
        one already inside (a thread that just ended is no error)."""
        me = threading.get_ident()
        for vcpu, thread in zip(self.vm.vcpus, self._threads):
            vcpu.kick()
            if thread.ident is not None and thread.ident != me and thread.is_alive():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # --- boot markers -------------------------------------------------------------------
    def _marker(self, value: int) -> None:
        """A guest write to port 0x80: recorded with the time since start (boot markers)."""
        with self._markers_cond:
            self.markers.append((value, time.monotonic() - self.stats.started))
            self._markers_cond.notify_all()

    def wait_marker(self, value: int, timeout: float) -> float:
        """Wait until the guest writes ``value`` to port 0x80; returns the seconds from the
        VM's start to that write. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._markers_cond:
            while True:
                for v, t in self.markers:
                    if v == value:
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or self._done.is_set():
                    raise TimeoutError(f"the guest did not write marker {value:#x} to port 0x80 within {timeout:g} s")
                self._markers_cond.wait(min(left, 0.1))

    def boot_times(self) -> dict[str, float]:
        """Seconds from the VM's start to the Linux boot milestones seen on the console."""
        return dict(self.milestones)

    def _debug_exit(self, value: int) -> None:
        self.stop(VmResult(Outcome.DEBUG_EXIT, f"guest wrote {value:#x} to the debug-exit port", debug_value=value))

    def _watch_console(self, line: bytes) -> None:
        for name, marker in MILESTONES:
            if name not in self.milestones and marker in line:
                self.milestones[name] = time.monotonic() - self.stats.started
        at = line.find(PANIC_MARKER)
        if at >= 0:  # keep the message, not the printk timestamp before it
            self._panicked = line[at:].decode(errors="replace").strip()
        m = INIT_RE.search(line)
        if m and self.stats.init_seconds is None:
            self.stats.init_seconds = time.monotonic() - self.stats.started
            LOG.info("guest kernel ran %s %.1f s after start", m.group(1).decode(errors="replace"), self.stats.init_seconds)
            if self.stop_at_init:
                self.stop(VmResult(
                    Outcome.INIT_REACHED,
                    f"the guest kernel started {m.group(1).decode(errors='replace')}; guest user space cannot make "
                    f"system calls on {self.host.name} (software-nested KVM), so the boot ends here",
                ))

    _panicked: str | None = None

    def _guest_reset(self, why: str) -> VmResult:
        if self._panicked:
            return VmResult(Outcome.PANIC, f"guest kernel panic: {self._panicked}")
        return VmResult(Outcome.RESET, why)

    # --- vCPU threads --------------------------------------------------------------------
    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        try:
            self._vcpu_loop(vcpu)
        except KvmmError as exc:
            self.stop(VmResult(Outcome.VMM_ERROR, f"vCPU {vcpu.id}: {exc}"))
        except Exception as exc:  # a kvmm bug: report it, never leave the VM half-running
            LOG.exception("vCPU %d: internal error", vcpu.id)
            self.stop(VmResult(Outcome.VMM_ERROR, f"vCPU {vcpu.id}: internal error: {exc!r}"))

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        pio = self.pio
        exits = self.stats.exit_kinds
        run = vcpu.run
        coalesced = self.coalesced
        while not self._stopping:
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
            elif kind is InterruptedExit:
                if self._pause_requested:
                    self._park()
                if self._dump_requested:
                    self._dump_vcpu(vcpu)
            elif kind is MmioExit:
                if ex.is_write:
                    self.mmio.write(ex.phys_addr, ex.length, int.from_bytes(ex.data, "little"))
                else:
                    ex.data[:] = self.mmio.read(ex.phys_addr, ex.length).to_bytes(ex.length, "little")
            elif kind is InternalErrorExit:
                if not self._recover_internal_error(vcpu, ex):
                    return
            elif kind is ShutdownExit:
                self.stop(self._guest_reset("guest triple fault (KVM_EXIT_SHUTDOWN)"))
            elif kind is SystemEventExit:
                if ex.type == K.KVM_SYSTEM_EVENT_SHUTDOWN:
                    self.stop(VmResult(Outcome.POWEROFF, "guest powered off"))
                elif ex.type == K.KVM_SYSTEM_EVENT_CRASH:
                    self.stop(VmResult(Outcome.PANIC, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"))
                else:
                    self.stop(self._guest_reset(f"guest reset (system event {ex.type})"))
            elif kind is HltExit:
                self.stop(VmResult(Outcome.POWEROFF, "guest halted"))
            elif kind is FailEntryExit:
                self.stop(VmResult(Outcome.VCPU_ERROR, f"vCPU {vcpu.id}: KVM could not enter the guest (hardware reason {ex.hardware_reason:#x})"))
            else:
                self.stop(VmResult(Outcome.VCPU_ERROR, f"vCPU {vcpu.id}: unhandled exit {ex}"))

    def exit_report(self) -> dict[str, int]:
        """Exits to kvmm by kind, and how queue notifies arrived (VM exit or ioeventfd)."""
        report = dict(self.stats.exits)
        report["queue_notify_exits"] = sum(t.notify_exits for t in self.virtio)
        report["queue_notify_ioeventfd"] = sum(t.notify_events for t in self.virtio)
        report["post_code_writes"] = self.post.writes
        report["int3_injected"] = self.stats.int3_injected
        report["fwait_skipped"] = self.stats.fwait_skipped
        report["console_bytes"] = self.console.bytes_written if self.console else 0
        report["coalesced_pio_writes"] = self.coalesced.replayed if self.coalesced is not None else 0
        report["msi_interrupts"] = sum(v.fired for t in self.virtio for v in getattr(t, "msi_vectors", []))
        report["intx_interrupts"] = sum(getattr(t.set_irq, "asserts", 0) for t in self.virtio)
        if self.rng is not None:
            report["rng_requests"] = self.rng.requests
            report["rng_bytes"] = self.rng.bytes_served
        if self.virtio_console is not None:
            report["virtio_console_bytes_out"] = self.virtio_console.bytes_out
        for i, net in enumerate(self.nets):
            report[f"net{i}_rx_frames"] = net.rx_frames
            report[f"net{i}_tx_frames"] = net.tx_frames
            report[f"net{i}_tx_dropped"] = net.tx_dropped
        return report

    def request_dump(self) -> None:
        """Log every vCPU's registers and the exit counts (SIGUSR2 on the command line)."""
        self._dump_requested = True
        self._kick_vcpus()

    _dump_requested = False

    def _dump_vcpu(self, vcpu: Vcpu) -> None:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        LOG.warning(
            "vCPU %d: RIP %#x RSP %#x RFLAGS %#x CR0 %#x CR3 %#x; exits %s; unclaimed ports %s",
            vcpu.id, regs.rip, regs.rsp, regs.rflags, sregs.cr0, sregs.cr3, dict(self.stats.exits),
            {hex(p): n for p, n in self.pio.unhandled.most_common(8)},
        )
        if vcpu.id == len(self.vm.vcpus) - 1:
            self._dump_requested = False

    def _recover_internal_error(self, vcpu: Vcpu, ex: InternalErrorExit) -> bool:
        """Deliver an int3 the emulator could not (software-nested hosts); else stop."""
        emulation = ex.suberror == K.KVM_INTERNAL_ERROR_EMULATION
        if emulation and ex.insn[:1] == FWAIT and self.host.skip_fwait:
            regs = vcpu.get_regs()
            regs.rip += 1
            vcpu.set_regs(regs)
            self.stats.fwait_skipped += 1
            return True
        if emulation and ex.insn[:1] == b"\xcc" and self.host.inject_int3:
            regs = vcpu.get_regs()
            regs.rip += 1  # int3 is a trap: the guest's handler sees RIP after it
            vcpu.set_regs(regs)
            events = vcpu.get_vcpu_events()
            events.exception.injected = 1
            events.exception.nr = 3
            events.exception.has_error_code = 0
            events.flags = 0
            vcpu.set_vcpu_events(events)
            self.stats.int3_injected += 1
            return True
        regs = vcpu.get_regs()
        what = "KVM could not emulate an instruction" if ex.suberror == K.KVM_INTERNAL_ERROR_EMULATION else f"KVM internal error {ex.suberror}"
        insn = ex.insn.hex(" ") if ex.insn else "unavailable"
        self.stop(VmResult(Outcome.VCPU_ERROR, f"vCPU {vcpu.id}: {what} at RIP {regs.rip:#x} (instruction bytes: {insn})"))
        return False

    # --- running -------------------------------------------------------------------------
    def start(self) -> None:
        _install_kick_handler()
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise KvmmError("import kvmm from the main thread first: vCPU kicks need a signal handler")
        self.stats.started = time.monotonic()
        for vcpu in self.vm.vcpus:
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()
        if self.restored_from is not None:
            # A notify the guest sent just before the snapshot is in no eventfd of this VM.
            for transport in self.virtio:
                self.loop.call_soon(transport.kick_ready_queues)
        if self._restore_started is not None:
            self.restored_in = time.monotonic() - self._restore_started
            LOG.info("restored in %.1f ms (snapshot read, VM rebuilt, vCPUs running)", self.restored_in * 1e3)
            self._restore_started = None

    def run(self, timeout: float | None = None) -> VmResult:
        """Run until the guest or a signal ends the VM (or ``timeout`` seconds pass).

        The calling thread becomes the I/O thread: it serves ioeventfds, irqfd resamples,
        console input and output, and signals, until the VM ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        console = self.console
        assert console is not None
        loop = self.loop
        old_handlers = {}
        old_wakeup = None
        stdin = TerminalInput(0) if self.config.stdin else None
        raw_terminal: TerminalInput | None = None
        main = threading.current_thread() is threading.main_thread()
        try:
            if main:
                old_wakeup = signal.set_wakeup_fd(loop.wakeup_fd)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    old_handlers[sig] = signal.signal(sig, self._on_signal)
                old_handlers[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda s, f: self.request_dump())
            if stdin is not None:
                term = stdin
                try:
                    loop.add_reader(0, lambda: self._read_stdin(term))
                    stdin.enter_raw()
                    raw_terminal = stdin
                except (ValueError, OSError, PermissionError):
                    stdin = None  # stdin closed or not pollable (a regular file): no input
            self._stdin = stdin
            self._io_ident = threading.get_ident()
            self.start()
            while not self._done.is_set():
                loop.run_once(timeout=0.05)
                # Back-pressure: while the UART's input backlog is full, stop reading stdin.
                if self._stdin is not None and not self.paused and loop.has_reader(0) != (self.input_device.rx_room() > 0):
                    if loop.has_reader(0):
                        loop.remove_reader(0)
                    else:
                        loop.add_reader(0, lambda: self._read_stdin(term))
                if self.coalesced is not None and self.coalesced.pending():
                    self.coalesced.drain()
                console.flush()
                if not any(t.is_alive() for t in self._threads):
                    self.stop(VmResult(Outcome.VMM_ERROR, "all vCPU threads ended"))
                if deadline is not None and time.monotonic() > deadline:
                    self.stop(VmResult(Outcome.TIMEOUT, f"the VM ran for its {timeout:g} s time limit"))
            for t in self._threads:
                t.join(timeout=5)
                if t.is_alive():
                    LOG.warning("%s did not stop within 5 s", t.name)
        finally:
            self._io_ident = None
            if self.coalesced is not None:
                self.coalesced.drain()
            if raw_terminal is not None:
                raw_terminal.restore()
            if main:
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
                signal.set_wakeup_fd(old_wakeup if old_wakeup is not None else -1)
            console.flush()
            console.mark_ended(self._result.message if self._result else "kvmm stopped")
        assert self._result is not None
        return self._result

    _stdin: TerminalInput | None = None

    def _read_stdin(self, term: TerminalInput) -> None:
        """Pass terminal input to the UART; at end of input, stop reading."""
        try:
            data = os.read(0, min(512, max(self.input_device.rx_room(), 1)))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(0)  # EOF: the guest just sees no more input
            self._stdin = None
            return
        data, quit_requested = term.filter(data)
        if data:
            self.input_device.receive(data)
        if quit_requested:
            self.stop(VmResult(Outcome.INTERRUPTED, "quit from the console (Ctrl-A x)", signal=signal.SIGINT))

    # --- background use (Python API) ------------------------------------------------------
    def launch(self, timeout: float | None = None) -> None:
        """Run the VM in a background thread (the I/O thread); returns at once."""
        if self._io_thread is not None:
            raise KvmmError("this machine was already launched")
        self._io_thread = threading.Thread(target=self._run_in_background, args=(timeout,), name="kvmm-io", daemon=True)
        self._io_thread.start()

    _io_thread: threading.Thread | None = None

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
            taken = self.input_device.receive(data)
            data = data[taken:]
            if data:
                time.sleep(0.01)  # the guest has not drained its input yet

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop(VmResult(Outcome.INTERRUPTED, f"stopped by {signal.Signals(signum).name}", signal=signum))

    def close(self) -> None:
        if self._io_thread is not None and self._io_thread.is_alive():
            self.stop(VmResult(Outcome.INTERRUPTED, "the machine was closed", signal=signal.SIGTERM))
            self._io_thread.join(timeout=10)
        for t in self._threads:
            if t.is_alive():
                self._stopping = True
                t.join(timeout=5)
        if self.api is not None:
            self.api.close()
            self.api = None
        if getattr(self, "coalesced", None) is not None:
            self.coalesced.close()  # type: ignore[union-attr]
            self.coalesced = None
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if self._kvm is not None:
            self._kvm.close()
        for disk in self.disks:
            try:
                disk.close()  # fsync: what the guest wrote is on disk when kvmm ends
            except OSError as exc:
                LOG.error("flushing disk %s failed: %s", disk.path, exc.strerror)
        self.disks.clear()
        for tap in self.taps:
            tap.close()
        self.taps.clear()
        if self.mem is not None:
            self.mem.close()
        if self.console is not None:
            self.console.close()
        self.loop.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
