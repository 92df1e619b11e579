"""Building the machine's platform, for a boot or from a snapshot (as Firecracker's
``builder.rs``): guest RAM, the KVM objects, the port and MMIO buses with the legacy
devices, the PCI bus with a legacy virtio-PCI transport per virtio device, the
interrupt and notify plumbing, the vCPUs, and the kernel loaded into RAM.

Both entry points, :func:`build_for_boot` and :func:`build_from_snapshot`, take the same
steps in the same order (user input before KVM, RAM before the irqchip: see
:func:`kvmm.x86.create_vm`); they differ in where RAM comes from, whether a kernel is
loaded and the vCPUs set up for its entry, and whether saved state is applied at the
end. The result is a :class:`Platform`; running it is :mod:`kvmm.vm`'s and
:mod:`kvmm.vcpu`'s business.

A virtio device kind is one module of :mod:`kvmm.virtio` with a ``create(ctx)`` function
and one line in :data:`VIRTIO_DEVICES`; a legacy port device is one line in
:data:`LEGACY_DEVICES`, at its place in :mod:`kvmm.layout`'s port map. ACPI (kvmm/acpi/)
is one such device and the tables written beside the MP table.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Callable, cast

from . import layout, teardown, x86
from .coalesced import CoalescedPio
from .config import Outcome, VmConfig, VmResult
from .console import ConsoleInput, ConsoleOutput
from .defaults import CONSOLE_DEVICES, KERNEL_FORMATS, MAX_CPUS
from .devices.bus import MmioBus, PioBus, PioDevice
from .devices.cmos import Cmos
from .devices.debug import DebugExit, PostCode
from .devices.i8042 import I8042
from .devices.pci import PciBus
from .devices.serial import Serial8250
from .errors import ConfigError
from .eventloop import EventLoop
from .host import HostKind, build_cmdline, host_cmdline
from .irq import IoEventNotifier, KvmInterrupts
from .kvm import ioctls as K
from .kvm.system import Kvm, Vm
from .loader import BootInfo, is_multiboot, load_flat, load_linux, read_image
from .memory import GuestMemory

if TYPE_CHECKING:  # imported where used: a VM without snapshots or virtio devices skips them
    from .devices.acpi_pm import AcpiPm
    from .snapshot import MachineState, Snapshot, VcpuStateIo
    from .virtio.device import VirtioDevice
    from .virtio.pci_legacy import VirtioPciLegacy
    from .x86 import PreparedVm

LOG = logging.getLogger(__name__)

# Virtio device kinds, in PCI slot order (00:01.0, 00:02.0, ...): the module that makes
# them (its ``create(ctx)``) and whether a configuration has any (so that the module of
# a kind the VM lacks is never imported: start-up time, tests/test_startup.py).
VIRTIO_DEVICES: tuple[tuple[str, Callable[[VmConfig], bool]], ...] = (
    ("kvmm.virtio.blk", lambda cfg: bool(cfg.disks)),
    ("kvmm.virtio.net", lambda cfg: bool(cfg.nets)),
    ("kvmm.virtio.console", lambda cfg: cfg.console_device == "virtio" or bool(cfg.ports)),
    ("kvmm.virtio.rng", lambda cfg: cfg.rng),
    ("kvmm.virtio.p9", lambda cfg: bool(cfg.shares)),
)


class PlatformEvents:
    """What the platform's devices tell the machine: ``stop(result)``, the guest ends the
    run (reset, power-off, debug exit); ``marker(value)``, a port 0x80 write. (A slotted
    class: a NamedTuple costs ~80 us more at import, at every start.)"""

    __slots__ = ("stop", "marker")

    def __init__(self, stop: Callable[[VmResult], None], marker: Callable[[int], None]) -> None:
        self.stop, self.marker = stop, marker


def _acpi_pm(events: PlatformEvents) -> PioDevice:
    from .devices.acpi_pm import AcpiPm  # only a machine with ACPI loads it

    return AcpiPm(lambda: events.stop(VmResult(Outcome.POWEROFF, "guest powered off through ACPI (S5)")),
                  lambda: events.stop(VmResult(Outcome.RESET, "guest reset through the ACPI reset register")))


def _always(cfg: VmConfig) -> bool:
    return True


# Legacy port devices: name, ports (kvmm/layout.py), how to make one, and whether a
# configuration has it.
LEGACY_DEVICES: tuple[tuple[str, layout.PortRange, Callable[[Platform, PlatformEvents], PioDevice],
                            Callable[[VmConfig], bool]], ...] = (
    ("serial", layout.COM1, lambda p, ev: Serial8250(p.console.write, lambda level: p.vm.irq_line(layout.COM1_IRQ, level),
                                                     p.coalesce_serial), _always),
    ("i8042", layout.I8042, lambda p, ev: I8042(lambda: ev.stop(VmResult(Outcome.RESET, "guest reset through the i8042"))),
     _always),
    ("cmos", layout.CMOS, lambda p, ev: Cmos(), _always),
    ("post", layout.POST, lambda p, ev: PostCode(ev.marker), _always),
    ("debug_exit", layout.DEBUG_EXIT, lambda p, ev: DebugExit(lambda value: ev.stop(VmResult(
        Outcome.DEBUG_EXIT, f"guest wrote {value:#x} to the debug-exit port", debug_value=value))), _always),
    ("acpi_pm", layout.ACPI_PM, lambda p, ev: _acpi_pm(ev), lambda cfg: cfg.has_acpi),
)


class Platform:
    """Everything a machine is made of. Built by :func:`build_for_boot` or
    :func:`build_from_snapshot`; :meth:`close` releases it all, however far building got."""

    def __init__(self, config: VmConfig, host: HostKind, loop: EventLoop) -> None:
        self.config = config
        self.host = host
        self.loop = loop
        self.cmdline = config.cmdline
        self.mem: GuestMemory | None = None
        self.kvm: Kvm | None = None
        self.vm: Vm = cast(Vm, None)  # set once the VM exists
        self.console: ConsoleOutput = cast(ConsoleOutput, None)
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.pci: PciBus | None = None
        self.interrupts: KvmInterrupts | None = None
        self.notifier: IoEventNotifier | None = None
        self.legacy: dict[str, PioDevice] = {}
        self.devices: list[VirtioDevice] = []
        self.transports: list[VirtioPciLegacy] = []
        self.coalesced: CoalescedPio | None = None
        self.boot: BootInfo | None = None
        self.restored_from: str | None = None
        self.console_input: ConsoleInput | None = None  # a device that took the primary console
        self._vcpu_state_io: VcpuStateIo | None = None

    # --- parts the machine uses by name ------------------------------------------------------
    @property
    def serial(self) -> Serial8250:
        return cast(Serial8250, self.legacy["serial"])

    @property
    def cmos(self) -> Cmos:
        return cast(Cmos, self.legacy["cmos"])

    @property
    def acpi_pm(self) -> AcpiPm | None:
        return cast("AcpiPm | None", self.legacy.get("acpi_pm"))

    @property
    def input_device(self) -> ConsoleInput:
        """Where host input goes: the primary console (the UART, or the device that
        claimed it, virtio-console's hvc0)."""
        return self.console_input or self.serial

    def coalesce_serial(self, thri_enabled: bool) -> None:
        """Queue THR writes in the coalesced ring while the guest polls the UART; let them
        exit while it waits for the THR-empty interrupt (kvmm/coalesced.py)."""
        if self.coalesced is not None:
            self.coalesced.set_zone(layout.COM1.base, 1, not thri_enabled)

    def counters(self) -> dict[str, int]:
        """Every device's counters: transports summed, devices under their names."""
        report: dict[str, int] = {"queue_notify_exits": 0, "queue_notify_ioeventfd": 0, "msi_interrupts": 0,
                                  "intx_interrupts": 0}
        for transport in self.transports:
            for key, n in transport.counters().items():
                report[key] += n
        report["post_code_writes"] = cast(PostCode, self.legacy["post"]).writes if "post" in self.legacy else 0
        report["console_bytes"] = self.console.bytes_written if self.console is not None else 0
        report["coalesced_pio_writes"] = self.coalesced.replayed if self.coalesced is not None else 0
        if self.acpi_pm is not None:
            report.update(self.acpi_pm.counters())
        for device in self.devices:
            for key, n in device.counters().items():
                report[f"{device.name}_{key}"] = n
        return report

    # --- snapshots ---------------------------------------------------------------------------
    @property
    def vcpu_state(self) -> VcpuStateIo:
        """vCPU state through what this host's KVM offers (made at the first use)."""
        if self._vcpu_state_io is None:
            from .snapshot import VcpuStateIo

            kvm = cast(Kvm, self.kvm)
            self._vcpu_state_io = VcpuStateIo(kvm.msr_index_list(), bool(kvm.check_extension(K.KVM_CAP_XSAVE)),
                                              bool(kvm.check_extension(K.KVM_CAP_XCRS)))
        return self._vcpu_state_io

    def save_state(self) -> MachineState:
        """Everything a restore needs besides RAM; vCPUs and device work must be paused."""
        from .snapshot import MachineState, save_vm

        return MachineState(
            save_vm(self.vm), [self.vcpu_state.save(vcpu) for vcpu in self.vm.vcpus], self.serial.save_state(),
            self.cmos.save_state(), cast(PciBus, self.pci).save_state(), [t.save_state() for t in self.transports],
            None if self.acpi_pm is None else self.acpi_pm.save_state(),
        )

    def load_state(self, st: MachineState) -> None:
        """Apply a snapshot's state to the freshly built platform (nothing has run yet):
        VM-wide KVM state, devices (PCI config space before the transports, whose ports it
        places), then each vCPU."""
        from .snapshot import load_devices, restore_vm
        from .state import check_length

        restore_vm(self.vm, st.vm)
        load_devices(st, self.serial, self.cmos, cast(PciBus, self.pci), self.transports, self.acpi_pm)
        check_length("state.vcpus", st.vcpus, len(self.vm.vcpus))
        for vcpu, saved in zip(self.vm.vcpus, st.vcpus):
            self.vcpu_state.restore(vcpu, saved, f"state.vcpus[{vcpu.id}]")

    def flush_devices(self) -> None:
        """What the guest wrote, made durable (before a snapshot). Raises OSError."""
        for device in self.devices:
            device.flush()

    # --- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release every fd and mapping; devices flush their backends first (a disk's
        acknowledged writes are on disk when kvmm ends). Safe on a half-built platform."""
        for closer in (self.interrupts, self.notifier, self.coalesced):
            if closer is not None:
                closer.close()
        self.interrupts = self.notifier = self.coalesced = None
        if self.vm is not None or self.kvm is not None:
            # The VM destroy is the kernel's slow part (kvmm/teardown.py); nothing of this
            # machine runs any more (its vCPU threads have ended), so it can wait there.
            vm, kvm, self.vm, self.kvm = self.vm, self.kvm, None, None  # type: ignore[assignment]
            teardown.retire(lambda: _close_kvm(vm, kvm))
        for device in self.devices:
            try:
                device.close()
            except OSError as exc:
                LOG.error("closing %s failed: %s", device.name, exc.strerror)
        self.devices.clear()
        if self.mem is not None:
            self.mem.close()
        if self.console is not None:
            self.console.close()


def _close_kvm(vm: Vm | None, kvm: Kvm | None) -> None:
    if vm is not None:
        vm.close()
    if kvm is not None:
        kvm.close()


def build_for_boot(config: VmConfig, host: HostKind, loop: EventLoop, events: PlatformEvents,
                   prepared: PreparedVm | None = None) -> Platform:
    """A platform with ``config``'s kernel loaded and vCPU 0 at its entry. ``prepared``:
    RAM and VM made ahead by :func:`kvmm.x86.prepare_vm` (the platform owns them then)."""
    return _build(config, host, loop, events, None, prepared)


def build_from_snapshot(snapshot: Snapshot, config: VmConfig, host: HostKind, loop: EventLoop,
                        events: PlatformEvents, prepared: PreparedVm | None = None) -> Platform:
    """A platform recreated from ``snapshot`` (``config`` made from its saved one, with
    the run-time choices), its state applied: the guest continues where it paused.
    ``prepared``: RAM mapped from the snapshot's memory and the VM around it, made ahead
    (kvmm/pool.py); the platform owns them then."""
    return _build(config, host, loop, events, snapshot, prepared)


def _build(cfg: VmConfig, host: HostKind, loop: EventLoop, events: PlatformEvents,
           snapshot: Snapshot | None, prepared: PreparedVm | None) -> Platform:
    p = Platform(cfg, host, loop)
    if prepared is not None:  # ours from here on, closed with the platform
        p.mem, p.kvm, p.vm = prepared
    try:
        _check(cfg)
        # User input first: images, memory, console file, disks and taps; then KVM.
        kernel = initrd = None
        multiboot = False
        if snapshot is None:
            kernel = read_image(cfg.kernel, "kernel", cfg.mem_size)
            multiboot = cfg.kernel_format == "multiboot" or (cfg.kernel_format == "auto" and is_multiboot(kernel))
            initrd = read_image(cfg.initrd, "initrd", cfg.mem_size) if cfg.initrd and not multiboot else None  # multiboot: modules
            p.cmdline = build_cmdline(cfg.cmdline, _default_cmdline(cfg), host_cmdline(host, cfg.cpus))
        if prepared is not None and prepared.mem.size != cfg.mem_size:
            raise ConfigError(f"the prepared VM has {prepared.mem.size} bytes of RAM, the configuration {cfg.mem_size}")
        if p.mem is None:
            p.mem = (GuestMemory.allocate(cfg.mem_size, cfg.hugepages) if snapshot is None
                     else GuestMemory.from_file(snapshot.memory_path, cfg.mem_size))
        p.console = ConsoleOutput(path=cfg.console_path)
        _create_virtio_devices(p)
        if p.kvm is None:
            p.kvm = Kvm()
            # A restored UART's interrupt state decides its coalescing, after its state is loaded.
            p.vm = x86.create_vm(p.kvm, p.mem, coalesce_uart=cfg.exitless and snapshot is None)
        if kernel is not None and multiboot:  # kvmm/testkernels.py
            from .testkernels import boot_multiboot

            p.boot, p.cmdline = boot_multiboot(p.mem, kernel, cfg)
        elif kernel is not None:
            p.boot = (load_flat(p.mem, kernel, name=cfg.kernel) if cfg.kernel_format == "flat"
                      else load_linux(p.mem, kernel, p.cmdline, initrd, name=cfg.kernel,
                                      bzimage_decompressor=cfg.kernel_format == "bzimage"))
            if p.boot.kind != "flat":
                x86.write_boot_tables(p.mem)
        _log_start(p, snapshot)

        for name, ports, make, wanted in LEGACY_DEVICES:
            if not wanted(cfg):
                continue
            p.legacy[name] = make(p, events)
            p.pio.register(ports.base, ports.length, p.legacy[name])
        p.pci = PciBus(p.pio, p.mmio)
        if cfg.debug_exit or cfg.pc_testdev or multiboot:  # kvmm/testkernels.py
            from .testkernels import attach_devices

            attach_devices(cfg, p.pio, p.mmio, p.mem, p.vm, multiboot, events.stop)
        p.interrupts = KvmInterrupts(p.vm, loop, cfg.exitless)
        p.notifier = IoEventNotifier(p.vm, loop) if cfg.exitless else None
        for device in p.devices:
            add_virtio(p, device)
        if p.boot is not None and p.boot.kind != "flat":
            pci_irqs = [(t.slot, 0, layout.pci_intx_gsi(t.slot)) for t in p.transports]
            p.mem.write(layout.EBDA_START, x86.build_mptable(cfg.cpus, pci_irqs=pci_irqs))
            if cfg.has_acpi:  # kvmm/acpi/: the same machine for ACPI kernels
                from .acpi import install

                install(p.mem, cfg.cpus, pci_irqs, None if p.boot.kind == "multiboot" else p.boot.boot_params)

        _create_vcpus(p)
        _set_up_coalescing(p)
        if snapshot is not None:
            p.load_state(snapshot.state)
            p.restored_from = str(snapshot.path)
        p.coalesce_serial(p.serial.thri_enabled)
    except BaseException:
        p.close()
        raise
    return p


def _check(cfg: VmConfig) -> None:
    if not 1 <= cfg.cpus <= MAX_CPUS:
        raise ConfigError(f"--cpus must be between 1 and {MAX_CPUS}, not {cfg.cpus}")
    if cfg.kernel_format not in KERNEL_FORMATS:
        raise ConfigError(f"unknown kernel format {cfg.kernel_format!r}: expected {', '.join(KERNEL_FORMATS)}")
    if cfg.console_device not in CONSOLE_DEVICES:
        raise ConfigError(f"unknown console device {cfg.console_device!r}: expected serial or virtio")
    if cfg.kernel_format == "flat" and cfg.initrd:
        raise ConfigError("a flat image takes no --initrd")
    try:
        cfg.cmdline.encode("utf-8")
    except UnicodeEncodeError as exc:  # a byte the locale could not decode (argv's surrogateescape)
        bad = cfg.cmdline[exc.start].encode("utf-8", "surrogateescape")
        raise ConfigError(f"--cmdline has a byte that is not UTF-8 ({bad.hex()} at {exc.start}): "
                          "give the kernel command line as UTF-8 text") from None
    if cfg.api_socket is not None:
        check_socket_path(cfg.api_socket)


# sockaddr_un's sun_path is 108 bytes, the last for the terminating NUL (unix(7)).
SUN_PATH_MAX = 107


def check_socket_path(path: str) -> None:
    """A control socket path that bind() can take: not empty, no NUL, at most 107 bytes."""
    if not path:
        raise ConfigError("the control socket path (--api-sock) is empty")
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ConfigError(f"the control socket path {path!r:.200} contains a NUL byte")
    if len(raw) > SUN_PATH_MAX:
        raise ConfigError(f"the control socket path {path[:60]!r}... is {len(raw)} bytes; a Unix socket's path "
                          f"may be at most {SUN_PATH_MAX} (use a shorter or relative path)")


def _default_cmdline(cfg: VmConfig) -> tuple[str, ...]:
    if cfg.console_device == "virtio":
        return tuple("console=hvc0" if w == "console=ttyS0" else w for w in cfg.default_cmdline)
    return cfg.default_cmdline


def _log_start(p: Platform, snapshot: Snapshot | None) -> None:
    cfg, host = p.config, p.host
    if host.software_nested:
        linux = snapshot is None and p.boot is not None and p.boot.kind != "multiboot"
        if host.emulate:
            from .emulate import plan_summary

            plan = plan_summary(cfg.cpus) if linux else plan_summary(cfg.cpus).split("; ", 1)[1]
        else:
            plan = "no instruction emulation"
        speed = f"; '{' '.join(host.speed_cmdline)}' for a slow CPU" if linux and host.speed_cmdline else ""
        LOG.info("host KVM is %s (software nested, no VT-x/AMD-V): %s%s", host.name, plan, speed)
    cpus = f"{cfg.cpus} vCPU{'s' if cfg.cpus > 1 else ''}"
    if snapshot is not None:
        LOG.info("restoring %s: %s, %d MiB, %s, taken %s", snapshot.path, cfg.kernel, cfg.mem_size >> 20, cpus,
                 snapshot.manifest.created)
    else:
        assert p.boot is not None
        LOG.info("%s %s, %d MiB, %s, cmdline: %s", p.boot.kind, cfg.kernel, cfg.mem_size >> 20, cpus, p.cmdline)


def _create_virtio_devices(p: Platform) -> None:
    modules = [module for module, wanted in VIRTIO_DEVICES if wanted(p.config)]
    if not modules:
        return  # nor the virtio package, whose import a VM without devices need not pay
    from .virtio.device import DeviceContext

    def claim_console(device: ConsoleInput) -> None:
        p.console_input = device

    ctx = DeviceContext(p.config, cast(GuestMemory, p.mem), p.loop, p.console, claim_console)
    for module in modules:
        p.devices.extend(importlib.import_module(module).create(ctx))


def add_virtio(p: Platform, device: VirtioDevice) -> VirtioPciLegacy:
    """Put ``device`` on the PCI bus behind a legacy virtio-PCI transport: INTA on its
    slot's IOAPIC input, MSI-X vectors where configured, exitless notifies and interrupts
    where configured (ioeventfds, irqfds)."""
    from .virtio.pci_legacy import VirtioPciLegacy, msix_vector_count

    assert p.pci is not None and p.interrupts is not None and p.mem is not None
    slot = p.pci.next_slot()
    msi = p.interrupts.msi(msix_vector_count(device)) if p.config.msix else None
    transport = VirtioPciLegacy(device, p.mem, p.interrupts.intx(layout.pci_intx_gsi(slot)), msi, p.notifier)
    p.pci.add(transport)
    transport.set_interrupt(layout.pci_intx_gsi(slot))
    p.transports.append(transport)
    return transport


def _create_vcpus(p: Platform) -> None:
    kvm, cfg = cast(Kvm, p.kvm), p.config
    supported = kvm.supported_cpuid()
    if cfg.cpu_features:  # kvmm/cpuid.py
        from .cpuid import apply_features

        apply_features(supported, cfg.cpu_features, kvm.supported_cpuid())
    msrs = x86.boot_msrs()
    for i in range(cfg.cpus):
        vcpu = p.vm.create_vcpu(i)
        x86.setup_cpuid(kvm, vcpu, cfg.cpus, supported, p.host.hidden_kvm_features)
        if p.boot is not None:  # booting, not restoring
            x86.setup_boot_vcpu(vcpu, p.boot.kind, p.boot.entry, p.boot.boot_params, msrs)


def _set_up_coalescing(p: Platform) -> None:
    """KVM's coalesced-PIO ring (on vCPU 0's mapping) where exitless and supported; else a
    prepared VM's coalesced zones are dropped (nothing would drain them)."""
    kvm, vm = cast(Kvm, p.kvm), p.vm
    ring_page = kvm.check_extension(K.KVM_CAP_COALESCED_MMIO)
    if p.config.exitless and ring_page and kvm.check_extension(K.KVM_CAP_COALESCED_PIO):
        p.coalesced = CoalescedPio(vm, vm.vcpus[0].mapped_page(ring_page), p.pio)
    else:
        for port, size in list(vm.coalesced_pio):
            vm.coalesce_pio(port, size, False)
