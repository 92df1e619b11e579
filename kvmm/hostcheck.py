"""``kvmm host``: can this host run kvmm, and how well?

What ``virt-host-validate`` and ``kvm-ok`` do for QEMU, for kvmm: one line per thing kvmm
needs or uses (/dev/kvm, the KVM API, the kind of KVM, each KVM capability, /dev/net/tun,
hugepages, memory), each with a verdict and, where it is not ``ok``, what that costs and
the fix. docs/hosts.md explains the lines.

Verdicts: ``ok``; ``note`` (an optional feature is not set up, or kvmm works around a
missing capability by itself); ``warn`` (kvmm runs, but slower or with a feature off, or
only with an option given); ``FAIL`` (kvmm cannot run here). The command exits 0 when no
line fails, 1 otherwise.

The host is read once, by :func:`gather` (stat calls, /proc, /sys/module, and KVM through
:mod:`kvmm.kvm`); :func:`evaluate` judges those facts without touching the host, so the
tests give it made-up hosts. The ``kvmm`` command imports this module only for ``kvmm
host`` (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from . import __version__
from .defaults import MAX_CPUS
from .errors import KvmmError
from .host import HARDWARE, SYS_MODULE, HostKind, detect_host, hardware_extension, host_cmdline, kind_summary
from .kvm import ioctls as K
from .kvm.system import Kvm, kvm_device_path

OK, NOTE, WARN, FAIL = "ok", "note", "warn", "FAIL"
EXIT_CAN_RUN, EXIT_CANNOT_RUN = 0, 1

TUN_DEVICE = "/dev/net/tun"
CAP_NET_ADMIN = 12  # capability bit (linux/capability.h)
DEFAULT_GUEST_MIB = 512  # kvmm's default --mem
MIN_GUEST_MIB = 16  # below this, not even a freestanding test guest plus kvmm fits


class Check(NamedTuple):
    """One line of the report."""

    name: str
    verdict: str
    detail: str  # what was found
    fix: str = ""  # what to do about a verdict other than ok
    means: str = ""  # what the finding costs or implies


class Capability(NamedTuple):
    """A KVM_CHECK_EXTENSION capability kvmm uses, and what its absence costs."""

    number: int
    macro: str
    label: str
    verdict_if_missing: str
    cost: str  # what kvmm cannot do, or does slower, without it
    fix: str


_NEWER_KERNEL = "use a newer host kernel (kvmm is developed on Linux 6.1)"
_SNAPSHOTS = "snapshots (the control socket's snapshot command, kvmm --restore) fail"

# Every capability kvmm checks or relies on, in the order the report lists them.
# kvmm.x86.REQUIRED_CAPS are all FAIL here (tests/test_hostcheck.py holds that).
CAPABILITIES: tuple[Capability, ...] = (
    Capability(K.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY", "user memory", FAIL,
               "guest RAM cannot be given to KVM", _NEWER_KERNEL),
    Capability(K.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP", "in-kernel irqchip", FAIL,
               "no in-kernel PIC/IOAPIC/LAPIC: kvmm has no interrupt controller of its own", _NEWER_KERNEL),
    Capability(K.KVM_CAP_PIT2, "KVM_CAP_PIT2", "in-kernel PIT", FAIL,
               "no in-kernel timer: kvmm has no PIT of its own", _NEWER_KERNEL),
    Capability(K.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT", "immediate_exit", FAIL,
               "a vCPU cannot be stopped without a race (pause, snapshot, shutdown)", _NEWER_KERNEL),
    Capability(K.KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR", "TSS address", FAIL,
               "kvmm sets the TSS page real-mode emulation needs on every VM", _NEWER_KERNEL),
    Capability(K.KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID", "supported CPUID", FAIL,
               "kvmm builds every vCPU's CPUID from KVM_GET_SUPPORTED_CPUID", _NEWER_KERNEL),
    Capability(K.KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD", "ioeventfd", WARN,
               "virtio queue notifies cannot end in the kernel: each one is a VM exit to kvmm's vCPU thread",
               "run kvmm with --no-exitless (kvmm does not fall back by itself)"),
    Capability(K.KVM_CAP_IRQFD, "KVM_CAP_IRQFD", "irqfd", WARN,
               "device interrupts cannot be raised by an eventfd write: each is a KVM_IRQ_LINE ioctl, "
               "and MSI-X vectors cannot be delivered",
               "run kvmm with --no-exitless --no-msix"),
    Capability(K.KVM_CAP_IRQFD_RESAMPLE, "KVM_CAP_IRQFD_RESAMPLE", "irqfd resample", WARN,
               "level-triggered INTx lines cannot go through an irqfd",
               "run kvmm with --no-exitless"),
    Capability(K.KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING", "GSI routing (MSI)", WARN,
               "no MSI-X: each virtio device interrupts through a shared INTx line (the guest reads the ISR per interrupt)",
               "run kvmm with --no-msix"),
    Capability(K.KVM_CAP_COALESCED_MMIO, "KVM_CAP_COALESCED_MMIO", "coalesced MMIO ring", NOTE,
               "each byte the guest writes to the UART is a VM exit (65536 bytes: 65536 exits instead of ~390)",
               "none needed: kvmm falls back by itself"),
    Capability(K.KVM_CAP_COALESCED_PIO, "KVM_CAP_COALESCED_PIO", "coalesced PIO", NOTE,
               "each byte the guest writes to the UART is a VM exit (65536 bytes: 65536 exits instead of ~390)",
               "none needed: kvmm falls back by itself"),
    Capability(K.KVM_CAP_SET_IDENTITY_MAP_ADDR, "KVM_CAP_SET_IDENTITY_MAP_ADDR", "identity map address", NOTE,
               "the identity-map page stays where KVM puts it by default",
               "none needed: kvmm falls back by itself"),
    Capability(K.KVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS", "vCPU events", WARN,
               f"{_SNAPSHOTS}; on kvm_pvm an int3 the emulator fails on cannot be injected", _NEWER_KERNEL),
    Capability(K.KVM_CAP_MP_STATE, "KVM_CAP_MP_STATE", "MP state", WARN, _SNAPSHOTS, _NEWER_KERNEL),
    Capability(K.KVM_CAP_PIT_STATE2, "KVM_CAP_PIT_STATE2", "PIT state", WARN, _SNAPSHOTS, _NEWER_KERNEL),
    Capability(K.KVM_CAP_ADJUST_CLOCK, "KVM_CAP_ADJUST_CLOCK", "kvmclock get/set", WARN, _SNAPSHOTS, _NEWER_KERNEL),
    Capability(K.KVM_CAP_XSAVE, "KVM_CAP_XSAVE", "XSAVE state", NOTE,
               "snapshots keep the legacy FPU/SSE state only, and a snapshot taken with XSAVE state is refused",
               "none needed: kvmm falls back by itself"),
    Capability(K.KVM_CAP_XCRS, "KVM_CAP_XCRS", "XCR0 state", NOTE,
               "snapshots do not keep XCR0, and a snapshot taken with it is refused",
               "none needed: kvmm falls back by itself"),
)


@dataclass
class HostFacts:
    """What :func:`gather` read from the host; :func:`evaluate` judges it."""

    kvm_device: str = "/dev/kvm"
    kvm_node: str = "ok"  # ok, missing, not a character device, no access
    kvm_node_detail: str = ""  # device numbers, owner, mode
    kvm_group: str | None = None  # the group owning the node, when it is not root
    kvm_error: str | None = None  # opening it through kvmm.kvm.Kvm failed (incl. API version)
    api_version: int | None = None
    kind: HostKind = HARDWARE
    kind_forced: bool = False  # KVMM_HOST_KIND set
    hardware_extension: str | None = None  # VT-x or AMD-V, from the loaded kvm_intel/kvm_amd
    cpu_extension: str | None = None  # VT-x or AMD-V from /proc/cpuinfo (for the fix)
    capabilities: dict[int, int] = field(default_factory=dict)
    max_vcpus: int | None = None
    vm_error: str | None = None  # creating a VM with irqchip, PIT and a vCPU failed
    vm_created: bool = False
    tun_device: str = TUN_DEVICE
    tun: str = "ok"  # ok, missing, no access
    net_admin: bool = False
    hugepages_total: int = 0
    hugepages_free: int = 0
    hugepage_size: int = 2 << 20
    mem_available: int | None = None
    uid: int = 0


def _meminfo(path: str) -> dict[str, int]:
    """/proc/meminfo as {key: number} (kB for sizes, a count for HugePages_*)."""
    values = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                words = rest.split()
                if words and words[0].isdigit():
                    values[key] = int(words[0])
    except OSError:
        pass
    return values


def _cpu_extension(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "VT-x" if "vmx" in flags else "AMD-V" if "svm" in flags else None
    except OSError:
        pass
    return None


def _has_capability(status_path: str, bit: int) -> bool:
    """Whether the effective capability set (CapEff in /proc/self/status) has ``bit``."""
    try:
        with open(status_path, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _node(path: str) -> tuple[str, str, str | None]:
    """(state, detail, owning group) of a device node this process wants to read and write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", "does not exist", None
    except OSError as exc:
        return "no access", f"cannot be examined: {exc.strerror}", None
    try:
        import grp

        group = grp.getgrgid(st.st_gid).gr_name
    except (ImportError, KeyError):
        group = str(st.st_gid)
    detail = f"mode {stat.S_IMODE(st.st_mode):04o}, group {group}"
    if not stat.S_ISCHR(st.st_mode):
        return "not a character device", f"is not a character device ({detail})", group
    detail = f"character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, {detail}"
    if not os.access(path, os.R_OK | os.W_OK):
        return "no access", f"{detail}: not readable and writable by this user", group
    return "ok", f"{detail}, read/write for this user", group


def gather(kvm_device: str | None = None, tun_device: str = TUN_DEVICE, proc: str = "/proc",
           sys_module: str = SYS_MODULE, kvm_factory: Callable[[str], Kvm] = Kvm) -> HostFacts:
    """Read what :func:`evaluate` needs from this host (paths and the KVM opener are
    parameters for the tests)."""
    device = kvm_device or kvm_device_path()
    facts = HostFacts(kvm_device=device, uid=os.getuid())
    facts.kvm_node, facts.kvm_node_detail, facts.kvm_group = _node(device)
    facts.kind = detect_host(os.path.join(sys_module, "kvm_pvm"))
    facts.kind_forced = bool(os.environ.get("KVMM_HOST_KIND"))
    facts.hardware_extension = hardware_extension(sys_module)
    facts.cpu_extension = _cpu_extension(os.path.join(proc, "cpuinfo"))
    if facts.kvm_node == "ok":
        _gather_kvm(facts, kvm_factory)
    facts.tun_device = tun_device
    facts.tun = _node(tun_device)[0]
    facts.net_admin = _has_capability(os.path.join(proc, "self", "status"), CAP_NET_ADMIN)
    info = _meminfo(os.path.join(proc, "meminfo"))
    facts.hugepages_total = info.get("HugePages_Total", 0)
    facts.hugepages_free = info.get("HugePages_Free", 0)
    facts.hugepage_size = info.get("Hugepagesize", 2048) * 1024
    facts.mem_available = info["MemAvailable"] * 1024 if "MemAvailable" in info else None
    return facts


def _gather_kvm(facts: HostFacts, kvm_factory: Callable[[str], Kvm]) -> None:
    try:
        kvm = kvm_factory(facts.kvm_device)
    except KvmmError as exc:  # KvmUnavailableError (incl. the API version), KvmError
        facts.kvm_error = str(exc)
        return
    try:
        facts.api_version = kvm.api_version
        for cap in CAPABILITIES:
            facts.capabilities[cap.number] = _check_extension(kvm, cap.number)
        facts.max_vcpus = _check_extension(kvm, K.KVM_CAP_MAX_VCPUS) or _check_extension(kvm, K.KVM_CAP_NR_VCPUS) or None
        if all(facts.capabilities.get(c.number) for c in CAPABILITIES if c.verdict_if_missing == FAIL):
            facts.vm_error = _try_vm(kvm)
            facts.vm_created = facts.vm_error is None
    finally:
        kvm.close()


def _check_extension(kvm: Kvm, cap: int) -> int:
    try:
        return kvm.check_extension(cap)
    except KvmmError:
        return 0


def _try_vm(kvm: Kvm) -> str | None:
    """Make a VM as the kvmm command does (kvmm.x86.create_vm: 2 MiB of RAM, the in-kernel
    irqchip and PIT) with one vCPU; None if that worked, else why not."""
    from .memory import GuestMemory
    from .x86 import create_vm

    try:
        mem = GuestMemory.allocate(2 << 20, check_available=False)
    except KvmmError as exc:
        return str(exc)
    try:
        with create_vm(kvm, mem) as vm:
            vm.create_vcpu(0)
    except KvmmError as exc:
        return str(exc)
    finally:
        mem.close()
    return None


# --- judging ------------------------------------------------------------------------------
def _pvm_means(kind: HostKind) -> str:
    hidden = " (PV IPIs, PV spinlock kicks, PV sched yield)" if kind.hidden_kvm_features else ""
    done = [f"adds the kernel parameters '{' '.join(host_cmdline(kind, 1))}' (with several vCPUs "
            f"'{' '.join(host_cmdline(kind, 2))}')"]
    if kind.emulate:
        from .emulate import emulated_mnemonics

        done.append(f"emulates the instructions KVM's emulator cannot ({', '.join(emulated_mnemonics(1))})")
    if kind.hidden_kvm_features:
        done.append(f"hides the hypercall-based KVM features{hidden}")
    return ("guest code runs about 1000 times slower than on hardware (a Linux boot to init takes 30-60 s); "
            "guest user space cannot make system calls, so a Linux boot ends when the kernel starts /init "
            "(exit status 0); kvmm " + ", ".join(done[:-1]) + " and " + done[-1])


def _kvm_missing_fix(facts: HostFacts) -> str:
    if facts.cpu_extension:
        module = "kvm_intel" if facts.cpu_extension == "VT-x" else "kvm_amd"
        return (f"the CPU offers {facts.cpu_extension}: load KVM (sudo modprobe {module}); if that fails, "
                "enable virtualization in the firmware settings")
    return ("this CPU (or VM) shows no VT-x/AMD-V: enable virtualization in the firmware settings, or, on a "
            "cloud or nested VM, choose an instance type with nested virtualization")


def evaluate(facts: HostFacts) -> list[Check]:
    """The report's lines for ``facts``."""
    checks: list[Check] = []
    dev = facts.kvm_device
    if facts.kvm_node == "missing":
        checks.append(Check(dev, FAIL, "does not exist", _kvm_missing_fix(facts),
                            "kvmm cannot run a VM (exit status 13)"))
    elif facts.kvm_node == "not a character device":
        checks.append(Check(dev, FAIL, facts.kvm_node_detail,
                            f"remove it; udev creates {dev} (character device 10:232) when the kvm module loads"))
    elif facts.kvm_node == "no access":
        group = facts.kvm_group if facts.kvm_group and facts.kvm_group != "root" else "kvm"
        checks.append(Check(dev, FAIL, f"{facts.kvm_node_detail} (uid {facts.uid})",
                            f"add your user to the '{group}' group (sudo usermod -aG {group} $USER, then log in "
                            "again), or run kvmm as root", "kvmm cannot run a VM (exit status 13)"))
    else:
        checks.append(Check(dev, OK, facts.kvm_node_detail))

    if facts.kvm_node != "ok":
        checks.append(Check("KVM checks", FAIL, f"skipped: {dev} cannot be used", "see the line above"))
    elif facts.kvm_error is not None:
        checks.append(Check("KVM API version", FAIL, facts.kvm_error,
                            f"kvmm speaks KVM API {K.KVM_API_VERSION} (every Linux since 2.6.22): check what provides {dev}"))
    else:
        checks.append(Check("KVM API version", OK, str(facts.api_version)))
        checks.append(_kind_check(facts))
        checks.extend(_capability_checks(facts))
        if facts.vm_created:
            checks.append(Check("VM creation", OK, "a VM with 2 MiB of RAM, in-kernel irqchip and PIT, one vCPU"))
        elif facts.vm_error is not None:
            checks.append(Check("VM creation", FAIL, facts.vm_error,
                                "KVM refuses what kvmm asks for: the host kernel log (dmesg) says why"))
    checks.append(_tun_check(facts))
    checks.append(_hugepages_check(facts))
    checks.append(_memory_check(facts))
    return checks


def _kind_check(facts: HostFacts) -> Check:
    forced = " (forced by KVMM_HOST_KIND)" if facts.kind_forced else ""
    if facts.kind.software_nested:
        return Check("KVM kind", WARN, f"{facts.kind.name}: software nested KVM, no VT-x/AMD-V{forced}",
                     "for native speed and guest user space, run on a host with VT-x/AMD-V (on a cloud VM: one "
                     "with nested virtualization)", _pvm_means(facts.kind))
    ext = facts.hardware_extension
    module = {"VT-x": "kvm_intel", "AMD-V": "kvm_amd"}.get(ext or "")
    detail = f"hardware ({module}, {ext}){forced}" if ext else f"hardware{forced}"
    return Check("KVM kind", OK, detail, means="guests run at native speed; guest user space works")


def _capability_checks(facts: HostFacts) -> list[Check]:
    checks = []
    for cap in CAPABILITIES:
        value = facts.capabilities.get(cap.number, 0)
        name = f"{cap.label}"
        if value:
            checks.append(Check(name, OK, cap.macro))
        else:
            checks.append(Check(name, cap.verdict_if_missing, f"{cap.macro} missing", cap.fix, cap.cost))
    if facts.max_vcpus is not None and facts.max_vcpus < MAX_CPUS:
        checks.append(Check("vCPUs per VM", NOTE, f"KVM allows {facts.max_vcpus}", f"give --cpus {facts.max_vcpus} or fewer",
                            f"kvmm itself allows {MAX_CPUS}"))
    elif facts.max_vcpus is not None:
        checks.append(Check("vCPUs per VM", OK, f"KVM allows {facts.max_vcpus}; --cpus up to {MAX_CPUS}"))
    return checks


def _tun_check(facts: HostFacts) -> Check:
    tap = "sudo ip tuntap add dev tap0 mode tap user $USER"
    if facts.tun == "missing":
        return Check(facts.tun_device, NOTE, "does not exist", "for --net: sudo modprobe tun", "--net cannot be used")
    if facts.tun != "ok":
        return Check(facts.tun_device, NOTE, "not readable and writable by this user",
                     f"for --net: sudo chmod 0666 {facts.tun_device} (most distributions' default), or run as root",
                     "--net cannot be used")
    if facts.net_admin:
        return Check(facts.tun_device, OK, "accessible, with CAP_NET_ADMIN: --net tap=NAME creates the tap if needed")
    return Check(facts.tun_device, NOTE, "accessible, without CAP_NET_ADMIN", f"for --net: create the tap first ({tap})",
                 "--net tap=NAME needs an existing tap interface you own")


def _hugepages_check(facts: HostFacts) -> Check:
    page_kib = facts.hugepage_size >> 10
    pages_512m = (DEFAULT_GUEST_MIB << 20) // max(facts.hugepage_size, 1)
    fix = f"for --hugepages: reserve them, e.g. echo {pages_512m} > /proc/sys/vm/nr_hugepages for a {DEFAULT_GUEST_MIB} MiB guest"
    if facts.hugepages_total == 0:
        return Check("hugepages", NOTE, f"none reserved ({page_kib} KiB pages)", fix, "--hugepages cannot be used")
    free_mib = facts.hugepages_free * facts.hugepage_size >> 20
    detail = f"{facts.hugepages_free} of {facts.hugepages_total} free ({page_kib} KiB pages): --hugepages up to {free_mib} MiB"
    return Check("hugepages", OK if facts.hugepages_free else NOTE, detail, "" if facts.hugepages_free else fix)


def _memory_check(facts: HostFacts) -> Check:
    if facts.mem_available is None:
        return Check("available memory", NOTE, "unknown (no MemAvailable in /proc/meminfo: a kernel before 3.14)",
                     means="kvmm asks psutil instead when it starts a VM")
    mib = facts.mem_available >> 20
    if mib < MIN_GUEST_MIB:
        return Check("available memory", FAIL, f"{mib} MiB", "free memory on the host",
                     f"a guest needs at least {MIN_GUEST_MIB} MiB besides kvmm itself")
    if mib < DEFAULT_GUEST_MIB:
        return Check("available memory", WARN, f"{mib} MiB, less than the default guest's {DEFAULT_GUEST_MIB} MiB",
                     f"give --mem {mib // 2}M or less")
    return Check("available memory", OK, f"{mib} MiB: --mem up to that (default {DEFAULT_GUEST_MIB}M)")


def can_run(checks: list[Check]) -> bool:
    return not any(c.verdict == FAIL for c in checks)


# --- output -------------------------------------------------------------------------------
def summary(checks: list[Check]) -> str:
    counts = {v: sum(c.verdict == v for c in checks) for v in (FAIL, WARN, NOTE)}
    parts = [f"{n} {word}{'s' if n != 1 else ''}" for word, n in
             (("failure", counts[FAIL]), ("warning", counts[WARN]), ("note", counts[NOTE])) if n]
    verdict = "kvmm can run on this host" if can_run(checks) else "kvmm cannot run on this host"
    return verdict + (f" ({', '.join(parts)})" if parts else "")


def format_table(checks: list[Check], width: int | None = None) -> str:
    """The text report; lines longer than ``width`` wrap under their column."""
    name_w = max(len(c.name) for c in checks)
    head = f"{'verdict':<7}  {'check':<{name_w}}  found"
    indent = " " * (7 + 2 + name_w + 2)
    lines = [f"kvmm {__version__}: can this host run kvmm? (docs/hosts.md explains each line)", "", head]

    def emit(first: str, text: str, hang: int = 0) -> None:
        """``first`` then ``text`` wrapped into the last column (continuation lines
        ``hang`` further in, under the text after a ``means:``/``fix:`` label)."""
        if width is None or width <= len(indent) + hang + 20:
            lines.append(first + text)
            return
        wrapped = textwrap.wrap(text, width - len(indent), subsequent_indent=" " * hang) or [""]
        lines.append(first + wrapped[0])
        lines.extend(indent + more for more in wrapped[1:])

    for c in checks:
        emit(f"{c.verdict:<7}  {c.name:<{name_w}}  ", c.detail)
        if c.means:
            emit(indent, "means: " + c.means, 7)
        if c.fix:
            emit(indent, "fix:   " + c.fix, 7)
    lines += ["", summary(checks)]
    return "\n".join(lines)


def report_json(facts: HostFacts, checks: list[Check]) -> dict[str, Any]:
    return {
        "kvmm": __version__,
        "can_run": can_run(checks),
        "summary": summary(checks),
        "host_kvm": {
            "kind": facts.kind.name if facts.kvm_node == "ok" else None,
            "summary": kind_summary(facts.kvm_device),
            "software_nested": facts.kind.software_nested,
            "userspace_works": facts.kind.userspace_works,
            "extra_cmdline": list(host_cmdline(facts.kind, 1)),
            "api_version": facts.api_version,
        },
        "capabilities": {cap.macro: facts.capabilities.get(cap.number, 0) for cap in CAPABILITIES}
        if facts.capabilities else {},
        "checks": [c._asdict() for c in checks],
    }


def main(argv: list[str]) -> int:
    """``kvmm host [--json]``."""
    p = argparse.ArgumentParser(prog="kvmm host", description="Check whether this host can run kvmm, and how well: "
                                "one line per check with a verdict (ok, note, warn, FAIL) and a fix.",
                                epilog="exit status: 0 kvmm can run here (no FAIL line), 1 it cannot, 2 usage")
    p.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    args = p.parse_args(argv)
    facts = gather()
    checks = evaluate(facts)
    if args.json:
        text = json.dumps(report_json(facts, checks), indent=1)
    else:
        width = None
        if sys.stdout.isatty():
            try:
                width = os.get_terminal_size(sys.stdout.fileno()).columns
            except OSError:
                width = None
        text = format_table(checks, width)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `kvmm host | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_CAN_RUN if can_run(checks) else EXIT_CANNOT_RUN
