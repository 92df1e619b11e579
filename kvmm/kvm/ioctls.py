"""KVM ioctl request numbers, computed with ioctl-opt from the cffi struct sizes.

Numbers follow ``<linux/kvm.h>``: each is declared beside the structure it carries, so a
size change in :mod:`kvmm.kvm.structs` changes the number with it.

ioctl-opt imports ctypes, ~18 M instructions (a tenth of a kvmm command's start-up), so
its answers are cached: ``scripts/gen-abi`` writes ioctl-opt's number for every
declaration below to ``_ioctl_numbers.py``; a declaration the cache lacks (a new ioctl,
a changed struct size) is computed by ioctl-opt at import, as before.
``tests/kvm/test_structs.py`` holds the cache to ioctl-opt and to the C headers.
"""

from __future__ import annotations

from .structs import ffi

try:
    from ._ioctl_numbers import NUMBERS as _CACHED
except ImportError:  # pragma: no cover (the file ships with kvmm)
    _CACHED = {}

KVMIO = 0xAE

# Every declaration of this module: (ioctl-opt function, type, nr, size) -> number.
DECLARED: dict[tuple[str, int, int, int], int] = {}


def _number(kind: str, type_: int, nr: int, size: bytearray | None = None) -> int:
    key = (kind, type_, nr, 0 if size is None else len(size))
    number = _CACHED.get(key)
    if number is None:
        import ioctl_opt

        fn = getattr(ioctl_opt, kind)
        number = int(fn(type_, nr) if size is None else fn(type_, nr, size))
    DECLARED[key] = number
    return number


def IO(type_: int, nr: int) -> int:
    return _number("IO", type_, nr)


def IOR(type_: int, nr: int, size: bytearray) -> int:
    return _number("IOR", type_, nr, size)


def IOW(type_: int, nr: int, size: bytearray) -> int:
    return _number("IOW", type_, nr, size)


def IOWR(type_: int, nr: int, size: bytearray) -> int:
    return _number("IOWR", type_, nr, size)


def _size(ctype: str) -> bytearray:
    # ioctl-opt measures a bytearray by its length; the length is the cffi size.
    return bytearray(ffi.sizeof(ctype))


# /dev/kvm
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, _size("struct kvm_msr_list"))
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, _size("struct kvm_cpuid2"))

# VM
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, _size("struct kvm_userspace_memory_region"))
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, _size("uint64_t"))
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_IRQ_LINE = IOW(KVMIO, 0x61, _size("struct kvm_irq_level"))
KVM_GET_IRQCHIP = IOWR(KVMIO, 0x62, _size("struct kvm_irqchip"))
KVM_SET_IRQCHIP = IOR(KVMIO, 0x63, _size("struct kvm_irqchip"))
KVM_SET_GSI_ROUTING = IOW(KVMIO, 0x6A, _size("struct kvm_irq_routing"))
KVM_IRQFD = IOW(KVMIO, 0x76, _size("struct kvm_irqfd"))
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, _size("struct kvm_pit_config"))
KVM_IOEVENTFD = IOW(KVMIO, 0x79, _size("struct kvm_ioeventfd"))
KVM_REGISTER_COALESCED_MMIO = IOW(KVMIO, 0x67, _size("struct kvm_coalesced_mmio_zone"))
KVM_UNREGISTER_COALESCED_MMIO = IOW(KVMIO, 0x68, _size("struct kvm_coalesced_mmio_zone"))
KVM_SET_CLOCK = IOW(KVMIO, 0x7B, _size("struct kvm_clock_data"))
KVM_GET_CLOCK = IOR(KVMIO, 0x7C, _size("struct kvm_clock_data"))
KVM_GET_PIT2 = IOR(KVMIO, 0x9F, _size("struct kvm_pit_state2"))
KVM_SET_PIT2 = IOW(KVMIO, 0xA0, _size("struct kvm_pit_state2"))

# vCPU
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, _size("struct kvm_regs"))
KVM_SET_REGS = IOW(KVMIO, 0x82, _size("struct kvm_regs"))
KVM_GET_SREGS = IOR(KVMIO, 0x83, _size("struct kvm_sregs"))
KVM_SET_SREGS = IOW(KVMIO, 0x84, _size("struct kvm_sregs"))
KVM_GET_MSRS = IOWR(KVMIO, 0x88, _size("struct kvm_msrs"))
KVM_SET_MSRS = IOW(KVMIO, 0x89, _size("struct kvm_msrs"))
KVM_GET_FPU = IOR(KVMIO, 0x8C, _size("struct kvm_fpu"))
KVM_SET_FPU = IOW(KVMIO, 0x8D, _size("struct kvm_fpu"))
KVM_GET_LAPIC = IOR(KVMIO, 0x8E, _size("struct kvm_lapic_state"))
KVM_SET_LAPIC = IOW(KVMIO, 0x8F, _size("struct kvm_lapic_state"))
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, _size("struct kvm_cpuid2"))
KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, _size("struct kvm_cpuid2"))
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, _size("struct kvm_mp_state"))
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, _size("struct kvm_mp_state"))
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, _size("struct kvm_vcpu_events"))
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, _size("struct kvm_vcpu_events"))
KVM_GET_XSAVE = IOR(KVMIO, 0xA4, _size("struct kvm_xsave"))
KVM_SET_XSAVE = IOW(KVMIO, 0xA5, _size("struct kvm_xsave"))
KVM_GET_XCRS = IOR(KVMIO, 0xA6, _size("struct kvm_xcrs"))
KVM_SET_XCRS = IOW(KVMIO, 0xA7, _size("struct kvm_xcrs"))

# KVM_CHECK_EXTENSION capabilities used by kvmm
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_COALESCED_MMIO = 15  # its value: the page of the vCPU mapping that holds the ring
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_IRQFD = 32
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IMMEDIATE_EXIT = 136
# reported by `kvmm host` (kvmm/hostcheck.py)
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IRQFD_RESAMPLE = 82

KVM_API_VERSION = 12

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_PIT_SPEAKER_DUMMY = 1

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
