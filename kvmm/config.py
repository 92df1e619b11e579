"""What a VM is asked to be (:class:`VmConfig` and the option parsers) and how it ended
(:class:`Outcome`, :class:`VmResult` and the command line's exit statuses).

The immutable records are NamedTuples, the one mutable :class:`VmConfig` a dataclass: a
frozen dataclass costs ~0.5 ms to create at import, a NamedTuple ~0.1 (kvmm's start-up,
docs/performance.md)."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field
from typing import NamedTuple

from .defaults import DEFAULT_CMDLINE, EXIT_DEBUG_BASE, EXIT_OK, EXIT_PANIC, EXIT_TIMEOUT, EXIT_VCPU_ERROR, EXIT_VMM_ERROR
from .errors import ConfigError
from .host import HostKind


class Outcome(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    PANIC = "panic"
    DEBUG_EXIT = "debug-exit"
    INIT_REACHED = "init-reached"
    VCPU_ERROR = "vcpu-error"
    VMM_ERROR = "vmm-error"
    INTERRUPTED = "interrupted"
    TIMEOUT = "timeout"
    EXPECTED = "expected-output"  # kvmm smoke: the expected console line appeared
    SHUTDOWN = "shutdown"  # the control socket's shutdown command


class VmResult(NamedTuple):
    """How a run ended: the outcome, a message for the user and what the exit status is made from."""

    outcome: Outcome
    message: str = ""
    debug_value: int | None = None
    signal: int | None = None
    debug_qemu: bool = False  # the value came through --debug-exit (QEMU's isa-debug-exit convention)

    @property
    def exit_status(self) -> int:
        if self.outcome in (Outcome.POWEROFF, Outcome.RESET, Outcome.INIT_REACHED, Outcome.EXPECTED, Outcome.SHUTDOWN):
            return EXIT_OK
        if self.outcome is Outcome.PANIC:
            return EXIT_PANIC
        if self.outcome is Outcome.VCPU_ERROR:
            return EXIT_VCPU_ERROR
        if self.outcome is Outcome.DEBUG_EXIT and self.debug_qemu:
            # QEMU's isa-debug-exit: exit((v << 1) | 1); the status is its low byte.
            return (((self.debug_value or 0) << 1) | 1) & 0xFF
        if self.outcome is Outcome.DEBUG_EXIT:
            return EXIT_DEBUG_BASE + ((self.debug_value or 0) & 0x3F)
        if self.outcome is Outcome.INTERRUPTED:
            return 128 + (self.signal or signal.SIGINT)
        if self.outcome is Outcome.TIMEOUT:
            return EXIT_TIMEOUT
        return EXIT_VMM_ERROR


class DebugExitConfig(NamedTuple):
    """A debug-exit port with QEMU's isa-debug-exit convention (``--debug-exit PORT[,SIZE]``):
    a write of ``v`` to any of its ``size`` ports ends the VM with status ``(v << 1) | 1``."""

    port: int
    size: int = 1

    @classmethod
    def parse(cls, spec: str) -> DebugExitConfig:
        """``PORT[,SIZE]`` (numbers in C syntax: 0xf4, 244), as QEMU's iobase and iosize."""
        port_s, _, size_s = spec.partition(",")
        try:
            port = int(port_s, 0)
            size = int(size_s, 0) if size_s else 1
        except ValueError:
            raise ConfigError(f"--debug-exit {spec!r}: expected PORT[,SIZE], e.g. 0xf4,4") from None
        if size not in (1, 2, 4) or not 0 <= port <= 0xFFFF - size + 1:
            raise ConfigError(f"--debug-exit {spec!r}: SIZE must be 1, 2 or 4 and the ports within 0-0xffff")
        return cls(port, size)


class DiskConfig(NamedTuple):
    """A raw disk image behind a virtio-blk device (``--disk PATH[,ro][,serial=ID]``)."""

    path: str
    read_only: bool = False
    serial: str | None = None

    @classmethod
    def parse(cls, spec: str) -> DiskConfig:
        """``PATH[,ro][,serial=ID]`` as given to --disk."""
        path, *opts = spec.split(",")
        read_only, serial = False, None
        for opt in opts:
            if opt == "ro":
                read_only = True
            elif opt == "rw":
                read_only = False
            elif opt.startswith("serial="):
                serial = opt[len("serial="):]
            else:
                raise ConfigError(f"unknown --disk option {opt!r} in {spec!r}: expected ro, rw or serial=ID")
        if not path:
            raise ConfigError(f"--disk {spec!r} names no file")
        return cls(path, read_only, serial)


def check_seconds(value: float | None, what: str = "timeout") -> float | None:
    """A time limit as every kvmm option and API takes one: None (no limit) or a finite
    number above 0. float() accepts 'nan' and 'inf', and a NaN deadline compares false
    with every time, so it would never pass (issue 19)."""
    import math

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number of seconds above 0, not {value!r}")
    return float(value)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid MAC address {text!r}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    if not any(mac):
        # Not a station address (Linux's is_valid_ether_addr refuses it; virtio-net's
        # driver would then make up a random one, behind kvmm's back).
        raise ValueError(f"MAC address {text} is all zeros: give a unicast address like 52:54:00:12:34:56")
    return mac


SHARE_TAG_MAX = 64  # bytes of a 9p mount tag (kvmm's bound; Linux matches the tag with strcmp)
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class ShareConfig(NamedTuple):
    """A host directory shared with the guest over virtio-9p (``--share PATH,tag=NAME[,ro|rw]``),
    read-only unless ``rw``; the guest mounts it with ``mount -t 9p -o trans=virtio NAME DIR``."""

    path: str
    tag: str
    read_only: bool = True

    @classmethod
    def parse(cls, spec: str) -> ShareConfig:
        """``PATH,tag=NAME[,ro|rw]`` as given to --share."""
        path, *opts = spec.split(",")
        tag, read_only = None, True
        for opt in opts:
            if opt in ("ro", "rw"):
                read_only = opt == "ro"
            elif opt.startswith("tag="):
                tag = opt[len("tag="):]
            else:
                raise ConfigError(f"unknown --share option {opt!r} in {spec!r}: expected tag=NAME, ro or rw")
        if not path:
            raise ConfigError(f"--share {spec!r} names no directory")
        if tag is None:
            raise ConfigError(f"--share {spec!r} names no tag (tag=NAME: the guest mounts the share by it)")
        return cls(path, check_share_tag(tag), read_only)


def check_share_tag(tag: str) -> str:
    """A mount tag as kvmm accepts it: 1-64 letters, digits, '.', '_' or '-' (it is the
    device name of the guest's mount, and root= of a 9p root)."""
    if not tag or len(tag) > SHARE_TAG_MAX or not set(tag) <= _TAG_CHARS:
        raise ConfigError(f"invalid share tag {tag!r}: 1-{SHARE_TAG_MAX} letters, digits, '.', '_' or '-'")
    return tag


class PortConfig(NamedTuple):
    """A virtio-console device beside the primary console, its guest output written to a
    host file (``path``) or an open descriptor (``fd``; kvmm run's stdout and stderr).
    Linux numbers these consoles hvc0, hvc1, ... after the primary's (if it is virtio).
    ``input``: the port takes kvmm's stdin instead of the primary console."""

    path: str | None = None
    fd: int | None = None
    input: bool = False


def default_mac(seed: str) -> bytes:
    """A stable, locally administered unicast MAC in QEMU's 52:54:00 range."""
    import hashlib

    return b"\x52\x54\x00" + hashlib.sha256(seed.encode()).digest()[:3]


class NetConfig(NamedTuple):
    """A virtio-net device on a host tap interface (``--net tap=NAME[,mac=MAC]``)."""

    tap: str
    mac: bytes | None = None

    @property
    def effective_mac(self) -> bytes:
        """The MAC the guest sees: the one given, or one derived from the tap's name."""
        return self.mac or default_mac(self.tap)

    @classmethod
    def parse(cls, spec: str) -> NetConfig:
        """``tap=NAME[,mac=52:54:00:..]`` as given to --net."""
        tap, mac = None, None
        for opt in spec.split(","):
            key, _, value = opt.partition("=")
            if key == "tap" and value:
                tap = value
            elif key == "mac" and value:
                try:
                    mac = parse_mac(value)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            else:
                raise ConfigError(f"unknown --net option {opt!r} in {spec!r}: expected tap=NAME[,mac=..]")
        if tap is None:
            raise ConfigError(f"--net {spec!r} names no tap (tap=NAME)")
        return cls(tap, mac)


def config_from_options(kernel: str, *, initrd: str | None = None, cmdline: str = "", mem: int | str = "512M",
                        cpus: int = 1, disks: list[str | DiskConfig] | None = None, nets: list[str | NetConfig] | None = None,
                        console: str = "serial", console_file: str | None = None, hugepages: bool = False,
                        stop_at_init: bool | None = None, rng: bool = True, msix: bool = True, exitless: bool = True,
                        stdin: bool = False, api_socket: str | None = None, kernel_format: str = "auto",
                        shares: list[str | ShareConfig] | None = None, modules: list[str] | None = None,
                        debug_exit: str | DebugExitConfig | None = None, pc_testdev: bool = False,
                        cpu_features: str = "", acpi: bool = True) -> "VmConfig":
    """A :class:`VmConfig` from the command line's options as keyword arguments:
    ``mem="256M"``, ``disks=["root.img", "data.img,ro"]``, ``nets=["tap=tap0"]``,
    ``shares=["/srv/data,tag=data"]``..."""
    from .memory import parse_size

    return VmConfig(
        kernel=str(kernel), initrd=None if initrd is None else str(initrd), cmdline=cmdline,
        mem_size=parse_size(mem) if isinstance(mem, str) else int(mem), cpus=cpus, hugepages=hugepages,
        console_device=console, console_path=console_file, stdin=stdin, stop_at_init=stop_at_init,
        disks=[d if isinstance(d, DiskConfig) else DiskConfig.parse(str(d)) for d in disks or []],
        nets=[n if isinstance(n, NetConfig) else NetConfig.parse(n) for n in nets or []],
        rng=rng, msix=msix, exitless=exitless, api_socket=api_socket, kernel_format=kernel_format,
        shares=[sh if isinstance(sh, ShareConfig) else ShareConfig.parse(str(sh)) for sh in shares or []],
        modules=list(modules or []), pc_testdev=pc_testdev, cpu_features=_cpu_features(cpu_features),
        debug_exit=DebugExitConfig.parse(debug_exit) if isinstance(debug_exit, str) else debug_exit, acpi=acpi,
    )



def _cpu_features(spec: str) -> tuple[tuple[str, bool], ...]:
    if not spec:
        return ()
    from .cpuid import parse_cpu_features  # here: only a VM with --cpu-features loads it

    return parse_cpu_features(spec)


@dataclass
class VmConfig:
    """Everything a :class:`kvmm.vm.Machine` is built from (the CLI's options, or the Python API's)."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    mem_size: int = 512 << 20
    cpus: int = 1
    hugepages: bool = False
    console_path: str | None = None  # None: stdout
    stdin: bool = True
    stop_at_init: bool | None = None  # None: where guest user space cannot run
    disks: list[DiskConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    exitless: bool = True  # queue notifies by ioeventfd and INTx by irqfd (False: VM exits, KVM_IRQ_LINE)
    msix: bool = True  # offer MSI-X on virtio devices (the guest may still choose INTx, e.g. pci=nomsi)
    console_device: str = "serial"  # the primary console: "serial" (ttyS0) or "virtio" (hvc0)
    rng: bool = True  # a virtio-rng device fed from the host's getrandom()
    host: HostKind | None = None
    default_cmdline: tuple[str, ...] = DEFAULT_CMDLINE
    api_socket: str | None = None  # a control socket (kvmm.api) at this path
    kernel_format: str = "auto"  # one of kvmm.defaults.KERNEL_FORMATS: "auto", "bzimage", "flat" or "multiboot"
    modules: list[str] = field(default_factory=list)  # multiboot modules after --initrd's: "PATH[ ARGS]" each
    debug_exit: DebugExitConfig | None = None  # a QEMU isa-debug-exit port besides kvmm's 0x501
    pc_testdev: bool = False  # QEMU's pc-testdev (kvmm/devices/testdev.py), for kvm-unit-tests
    cpu_features: tuple[tuple[str, bool], ...] = ()  # CPUID changes, e.g. (("x2apic", False),): kvmm/cpuid.py
    shares: list[ShareConfig] = field(default_factory=list)  # virtio-9p host directories
    ports: list[PortConfig] = field(default_factory=list)  # virtio-console output ports (kvmm run)
    acpi: bool = True  # ACPI tables and the PM1/reset ports (kvmm/acpi/); False: the MP table alone (--no-acpi)

    @property
    def has_acpi(self) -> bool:
        """Whether the machine has ACPI: asked for, and not a flat real-mode image (which
        gets no MP table either; the tiny guests' start-up stays as it is)."""
        return self.acpi and self.kernel_format != "flat"
