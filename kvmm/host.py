"""Host KVM kind detection and the workarounds a software-nested KVM needs.

On ``kvm_pvm`` (a page-table-based nested KVM without VT-x/AMD-V, see the project's
host notes) KVM's instruction emulator runs much guest code and cannot emulate some
instructions. Kernel parameters keep the guest away from them (``noxsave``,
``clearcpuid=smap,popcnt``; CPUID filtering does not hide them there), and an ``int3``
that fails emulation is delivered to the guest by hand (see :mod:`kvmm.vcpu`). Guest user
space cannot make system calls there, so a Linux boot ends at the kernel's exec of init.
On hardware KVM none of this applies and nothing changes.
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
    extra_cmdline: tuple[str, ...]
    inject_int3: bool
    userspace_works: bool
    hidden_kvm_features: int = 0  # CPUID 0x40000001 EAX bits not offered to the guest
    skip_fwait: bool = False  # step over an fwait the emulator cannot run (x87 exceptions are masked)

    @property
    def software_nested(self) -> bool:
        return self.name != "hardware"


HARDWARE = HostKind("hardware", (), inject_int3=False, userspace_works=True)
PVM = HostKind(
    "kvm_pvm",
    # noxsave: xsave/xrstor cannot be emulated; clearcpuid: nor can clac or popcnt.
    # lpj/tsc=reliable skip calibration loops that take minutes in the emulator.
    ("noxsave", "clearcpuid=smap,popcnt", "lpj=1000000", "tsc=reliable"),
    inject_int3=True,
    userspace_works=False,
    # A guest vmcall there takes about a minute (ptp_kvm) or never returns (an AP's PV
    # IPI during SMP bring-up): offer no hypercall-based PV feature.
    hidden_kvm_features=HYPERCALL_FEATURES,
    # fwait (9b) in fpu__drop() fails emulation there when a task exits; with x87
    # exceptions masked (the kernel's FNINIT state) it is a no-op, so kvmm steps over it.
    skip_fwait=True,
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


def build_cmdline(user: str, defaults: tuple[str, ...], workarounds: tuple[str, ...] = ()) -> str:
    """Defaults, then host workarounds, then the user's words; a key the user gives
    (``console=``, ``panic=``...) drops the default or workaround of the same key."""
    user_words = user.split()
    user_keys = {w.split("=", 1)[0] for w in user_words}
    kept = [w for w in (*defaults, *workarounds) if w.split("=", 1)[0] not in user_keys]
    return " ".join(kept + user_words)
