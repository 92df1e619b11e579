"""CPU feature changes on the vCPUs' CPUID (``--cpu-features +x2apic,-pcid``).

kvmm gives every vCPU the CPUID that KVM reports it can support (KVM_GET_SUPPORTED_CPUID,
like QEMU's ``-cpu host``). Test kernels written for QEMU ask for a feature to be removed
or added (kvm-unit-tests' ``-cpu qemu64,-x2apic``): ``-NAME`` clears the feature's bit,
``+NAME`` sets it where KVM can provide it. KVM then acts on the result: a guest whose
CPUID lacks x2APIC cannot switch its LAPIC to x2APIC mode (a #GP, as on hardware).
The feature names are QEMU's (and Linux's /proc/cpuinfo's), each one bit of one leaf
(Intel SDM vol. 2A, CPUID; AMD APM vol. 3, appendix E).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .errors import ConfigError


class Feature(NamedTuple):
    leaf: int
    subleaf: int
    reg: str  # "eax", "ebx", "ecx" or "edx"
    bit: int


FEATURES: dict[str, Feature] = {
    "vmx": Feature(1, 0, "ecx", 5),
    "pcid": Feature(1, 0, "ecx", 17),
    "x2apic": Feature(1, 0, "ecx", 21),
    "popcnt": Feature(1, 0, "ecx", 23),
    "tsc-deadline": Feature(1, 0, "ecx", 24),
    "xsave": Feature(1, 0, "ecx", 26),
    "smep": Feature(7, 0, "ebx", 7),
    "invpcid": Feature(7, 0, "ebx", 10),
    "smap": Feature(7, 0, "ebx", 20),
    "umip": Feature(7, 0, "ecx", 2),
    "pku": Feature(7, 0, "ecx", 3),
    "la57": Feature(7, 0, "ecx", 16),
    "arch-capabilities": Feature(7, 0, "edx", 29),
    "svm": Feature(0x8000_0001, 0, "ecx", 2),
    "skinit": Feature(0x8000_0001, 0, "ecx", 12),
    "rdtscp": Feature(0x8000_0001, 0, "edx", 27),
    "npt": Feature(0x8000_000A, 0, "edx", 0),
}
# Leaves whose entries KVM reports per subleaf (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
INDEXED_LEAVES = {7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x1D, 0x1E, 0x1F, 0x24, 0x8000_001D}


def parse_cpu_features(spec: str) -> tuple[tuple[str, bool], ...]:
    """``+x2apic,-pcid`` (QEMU's ``name=on``/``name=off`` too) -> (("x2apic", True), ("pcid", False))."""
    changes = []
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        if item[0] in "+-":
            name, on = item[1:], item[0] == "+"
        elif item.endswith(("=on", "=off")):
            name, _, value = item.partition("=")
            on = value == "on"
        else:
            raise ConfigError(f"--cpu-features {item!r}: expected +NAME or -NAME (or NAME=on/off)")
        if name not in FEATURES:
            raise ConfigError(f"--cpu-features: unknown feature {name!r}; kvmm knows {', '.join(sorted(FEATURES))}")
        changes.append((name, on))
    return tuple(changes)


def apply_features(cpuid: Any, changes: tuple[tuple[str, bool], ...], supported: Any) -> None:
    """Set or clear each feature's bit in ``cpuid`` (a ``struct kvm_cpuid2``, changed in
    place). Setting a bit that ``supported`` (KVM_GET_SUPPORTED_CPUID) lacks is refused:
    KVM would not provide the feature behind it."""
    for name, on in changes:
        f = FEATURES[name]
        entry = _entry(cpuid, f)
        if entry is None:
            if not on:
                continue  # the leaf is absent: the feature is already off
            raise ConfigError(f"--cpu-features +{name}: this host's KVM reports no CPUID leaf {f.leaf:#x}")
        if on:
            known = _entry(supported, f)
            if known is None or not getattr(known, f.reg) >> f.bit & 1:
                raise ConfigError(f"--cpu-features +{name}: this host's KVM cannot provide it")
            setattr(entry, f.reg, getattr(entry, f.reg) | 1 << f.bit)
        else:
            setattr(entry, f.reg, getattr(entry, f.reg) & ~(1 << f.bit) & 0xFFFF_FFFF)


def _entry(cpuid: Any, f: Feature) -> Any:
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == f.leaf and (e.index == f.subleaf or f.leaf not in INDEXED_LEAVES):
            return e
    return None
