"""KVM ABI structures (x86-64) through cffi (declarations in ``cdef.py``).

The layouts follow ``<linux/kvm.h>`` and ``<asm/kvm.h>``; every size is asserted at
import against the kernel ABI so a transcription mistake fails loudly instead of
corrupting an ioctl. ``tests/kvm/test_structs.py`` additionally compiles a C program
against the system headers and compares every size and ioctl number.
"""

from __future__ import annotations

import logging
from typing import Any

from .cdef import CDEF, cdef_digest

LOG = logging.getLogger(__name__)


def _load_ffi() -> Any:
    """The pre-parsed out-of-line module if it matches :data:`CDEF`, else a parse of it."""
    try:
        from . import _abi

        if getattr(_abi, "CDEF_DIGEST", None) == cdef_digest():
            return _abi.ffi
        LOG.warning("kvmm/kvm/_abi.py is older than kvmm/kvm/cdef.py: parsing the declarations "
                    "(slower start; regenerate with scripts/gen-abi)")
    except ImportError:
        pass
    import cffi

    parsed = cffi.FFI()
    parsed.cdef(CDEF)
    return parsed


ffi = _load_ffi()

# Sizes from the kernel ABI (x86-64). A mismatch is a bug in the cdef above.
ABI_SIZES: dict[str, int] = {
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_pit_config": 64,
    "struct kvm_pic_state": 16,
    "struct kvm_ioapic_state": 216,
    "struct kvm_irqchip": 520,
    "struct kvm_lapic_state": 1024,
    "struct kvm_vcpu_events": 64,
    "struct kvm_irqfd": 32,
    "struct kvm_ioeventfd": 64,
    "struct kvm_coalesced_mmio_zone": 16,
    "struct kvm_irq_routing_entry": 48,
    "struct kvm_irq_routing": 8,
    "struct kvm_irq_level": 8,
    "struct kvm_mp_state": 4,
    "struct kvm_clock_data": 48,
    "struct kvm_pit_channel_state": 24,
    "struct kvm_pit_state2": 112,
    "struct kvm_xcrs": 392,
    "struct kvm_xsave": 4096,
    "struct kvm_run": 2352,
}

for _name, _size in ABI_SIZES.items():
    _actual = ffi.sizeof(_name)
    if _actual != _size:  # pragma: no cover - import-time ABI guard
        raise ImportError(f"kvmm: {_name} is {_actual} bytes in the cdef, the KVM ABI says {_size}")

# kvm_run's exit data union starts at byte 32 (after cr8 and apic_base).
assert ffi.offsetof("struct kvm_run", "io") == 32
assert ffi.offsetof("struct kvm_run", "kvm_valid_regs") == 288
