"""Host KVM kind detection and the workarounds a software-nested KVM needs.

On ``kvm_pvm`` (a page-table-based nested KVM without VT-x/AMD-V, see docs/hosts.md)
KVM's instruction emulator runs much guest code and cannot emulate some instructions.
What kvmm does about each one, emulate it or keep Linux away from it with a kernel
parameter (CPUID filtering does not hide features there), is one table,
:data:`kvmm.emulate.HANDLERS`; :func:`host_cmdline` adds its parameters to this module's
own (:attr:`HostKind.speed_cmdline`: timing, calibration and the lockup watchdogs on a
CPU about 1000 times slower than hardware). Guest user space cannot make system calls
there, so a Linux boot ends at the kernel's exec of init. On hardware KVM none of this
applies and nothing changes.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

LOG = logging.getLogger(__name__)

SYS_MODULE = "/sys/module"
PVM_MODULE = SYS_MODULE + "/kvm_pvm"
# The hardware KVM modules and the extension each drives.
HARDWARE_MODULES = (("kvm_intel", "VT-x"), ("kvm_amd", "AMD-V"))


# KVM paravirt features (CPUID 0x40000001 EAX, Documentation/virt/kvm/x86/cpuid.rst)
# whose use is a hypercall.
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_FEATURE_HC_MAP_GPA_RANGE = 1 << 16
HYPERCALL_FEATURES = KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD | KVM_FEATURE_HC_MAP_GPA_RANGE


class HostKind(NamedTuple):
    name: str  # "hardware" or "kvm_pvm"
    speed_cmdline: tuple[str, ...]  # kernel parameters for a slow, emulated CPU
    emulate: bool  # kvmm emulates what KVM's emulator cannot (kvmm.emulate.HANDLERS)
    userspace_works: bool
    hidden_kvm_features: int = 0  # CPUID 0x40000001 EAX bits not offered to the guest

    @property
    def software_nested(self) -> bool:
        return self.name != "hardware"


HARDWARE = HostKind("hardware", (), emulate=False, userspace_works=True)
PVM = HostKind(
    "kvm_pvm",
    # lpj/tsc=reliable skip calibration loops that take minutes in the emulator.
    # nowatchdog: the soft- and hard-lockup detectors measure the emulator, not the
    # guest: at ~1000x slower, 20 ms of hardware work trips the 20 s soft-lockup limit
    # (watchdog_thresh tops out at 60, a 120 s limit: 120 ms of hardware work), and each
    # false report prints stack traces over an emulated UART; the detectors' per-CPU
    # timers and threads cost emulated time too. kvmm's --timeout and the boot watch
    # catch a guest that really hangs (docs/hosts.md).
    # rcupdate.rcu_cpu_stall_suppress=1: the same for RCU's CPU stall detector (21 s in
    # Debian's kernel: 21 ms of hardware work, e.g. BTF parsing at boot); each report
    # NMIs every CPU for a backtrace (measured: Debian's 6.1 kernel at 566 s).
    # cryptomgr.notests=1: the crypto self-tests that run as each algorithm registers
    # (RSA's private-key vectors in generic multi-precision C) took most of the 43 min
    # between two late initcalls of Debian's 6.1 kernel here (measured: 2584 s, the vCPUs
    # in mpihelp_*; a certificate load timed out waiting for them, -110); they test the
    # kernel's crypto code, not the VM.
    ("lpj=1000000", "tsc=reliable", "nowatchdog", "rcupdate.rcu_cpu_stall_suppress=1", "cryptomgr.notests=1"),
    emulate=True,
    userspace_works=False,
    # A guest vmcall there takes about a minute (ptp_kvm) or never returns (an AP's PV
    # IPI during SMP bring-up): offer no hypercall-based PV feature.
    hidden_kvm_features=HYPERCALL_FEATURES,
)


def detect_host(sysfs_module: str = PVM_MODULE) -> HostKind:
    """The kind of KVM this host provides; ``KVMM_HOST_KIND`` overrides (for tests)."""
    forced = os.environ.get("KVMM_HOST_KIND")
    if forced:
        return PVM if forced == "kvm_pvm" else HARDWARE
    return PVM if os.path.isdir(sysfs_module) else HARDWARE


def hardware_extension(sys_module: str = SYS_MODULE) -> str | None:
    """``VT-x`` or ``AMD-V`` from the loaded KVM module (kvm_intel, kvm_amd), else None."""
    for module, extension in HARDWARE_MODULES:
        if os.path.isdir(os.path.join(sys_module, module)):
            return extension
    return None


def kind_summary(kvm_device: str | None = None, sys_module: str = SYS_MODULE) -> str:
    """The host's KVM in a few words, from two or three stat calls (no KVM ioctl, no
    kvmm.kvm import: ``kvmm --version`` stays as cheap as the interpreter's start):
    ``kvm_pvm, software nested``, ``hardware, AMD-V`` or ``none: /dev/kvm does not exist``."""
    from .defaults import KVM_DEVICE, KVM_DEVICE_ENV

    device = kvm_device or os.environ.get(KVM_DEVICE_ENV, KVM_DEVICE)
    if not os.path.exists(device):
        return f"none: {device} does not exist"
    kind = detect_host(os.path.join(sys_module, "kvm_pvm"))
    if kind.software_nested:
        return f"{kind.name}, software nested"
    extension = hardware_extension(sys_module)
    return f"hardware, {extension}" if extension else "hardware"


def host_cmdline(host: HostKind, cpus: int) -> tuple[str, ...]:
    """The kernel parameters ``host`` needs for a Linux guest with ``cpus`` vCPUs: the
    emulation table's (instructions Linux is kept from) and the host's own."""
    if not host.emulate:
        return host.speed_cmdline
    from .emulate import avoid_cmdline

    return (*avoid_cmdline(cpus), *host.speed_cmdline)


# Parameters whose values are comma-separated lists Linux reads once (the last word
# wins): the user's list and kvmm's are merged into one word instead of the user's
# replacing kvmm's (a user's clearcpuid=avx must not bring back what kvm_pvm needs hidden).
LIST_KEYS = ("clearcpuid",)


def build_cmdline(user: str, defaults: tuple[str, ...], workarounds: tuple[str, ...] = ()) -> str:
    """Defaults, then host workarounds, then the user's words; a key the user gives
    (``console=``, ``panic=``...) drops the default or workaround of the same key, except
    the list parameters of :data:`LIST_KEYS`, whose values are merged (kvmm's first)."""
    user_words = user.split()
    merged: dict[str, list[str]] = {}
    for w in (*defaults, *workarounds, *user_words):
        key, eq, value = w.partition("=")
        if key in LIST_KEYS and eq:
            merged.setdefault(key, [])
            merged[key] += [v for v in value.split(",") if v and v not in merged[key]]
    user_keys = {w.split("=", 1)[0] for w in user_words}
    kept = [w for w in (*defaults, *workarounds) if w.split("=", 1)[0] not in user_keys | set(merged)]
    user_kept = [w for w in user_words if w.split("=", 1)[0] not in merged]
    lists = [f"{key}={','.join(values)}" for key, values in merged.items()]
    return " ".join(kept + lists + user_kept)
