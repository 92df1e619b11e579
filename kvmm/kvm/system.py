"""KVM objects that own their file descriptors: :class:`Kvm`, :class:`Vm`, :class:`Vcpu`.

Modelled on rust-vmm's kvm-ioctls: one class per fd level, each closing what it owns
(``close()`` or ``with``); failed ioctls raise :class:`~kvmm.errors.KvmError` naming the
ioctl; :meth:`Vcpu.run` returns typed exits (:mod:`kvmm.kvm.exits`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
from typing import Any

from ..defaults import KVM_DEVICE, KVM_DEVICE_ENV
from ..errors import KvmError, KvmUnavailableError
from . import ioctls as K
from .exits import (
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
)
from .structs import ffi

LOG = logging.getLogger(__name__)

_libc = ffi.dlopen(None)  # the process's own libc (cffi already holds the KVM structs; no ctypes)


def kvm_device_path() -> str:
    """/dev/kvm, or the node named by ``KVMM_KVM_DEVICE`` (used by tests)."""
    return os.environ.get(KVM_DEVICE_ENV, KVM_DEVICE)


_EXIT_REASON = struct.Struct("<I")
_EXIT_REASON_OFFSET = ffi.offsetof("struct kvm_run", "exit_reason")
_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_IO_OFFSET = ffi.offsetof("struct kvm_run", "io")

# ioctl numbers carry KVMIO (0xAE) as their type byte; the capability and exit-reason
# constants beside them in kvmm.kvm.ioctls are small integers.
_IOCTL_NAMES = {v: k for k, v in vars(K).items() if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == K.KVMIO}


def _name(req: int) -> str:
    return _IOCTL_NAMES.get(req, f"ioctl {req:#x}")


def ioctl_int(fd: int, req: int, arg: int = 0) -> int:
    """An ioctl whose argument is an integer (unsigned long, so 0xfffbd000 fits)."""
    ret = _libc.ioctl(fd, req, arg)
    if ret < 0:
        raise KvmError(_name(req), ffi.errno)
    return int(ret)


def ioctl_buf(fd: int, req: int, obj: Any, size: int | None = None) -> int:
    """An ioctl whose argument points at a cffi struct (read and written in place)."""
    try:
        return fcntl.ioctl(fd, req, ffi.buffer(obj) if size is None else ffi.buffer(obj, size), True)
    except OSError as exc:
        raise KvmError(_name(req), exc.errno or 0) from None


class _FdOwner:
    """Owns one fd; closing twice is harmless; usable as a context manager."""

    fd: int = -1

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


class Kvm(_FdOwner):
    """The /dev/kvm system fd."""

    def __init__(self, path: str | None = None) -> None:
        path = path or kvm_device_path()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                "or run on a host with virtualization enabled"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path} is not accessible: add your user to the 'kvm' group "
                f"(sudo usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        super().__init__(fd)
        version = ioctl_int(fd, K.KVM_GET_API_VERSION)
        self.api_version = version
        if version != K.KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(f"{path} speaks KVM API {version}, kvmm needs {K.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return ioctl_int(self.fd, K.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl_int(self.fd, K.KVM_GET_VCPU_MMAP_SIZE)

    # What KVM supports is the host's, fixed while this process lives (the module and CPU
    # do not change under it): asked once, not at every VM (0.8 ms here; a fresh VM per
    # test pays every such cost per test). Callers get a copy they may change.
    _supported_cpuid: tuple[int, bytes] | None = None

    def supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID as a ``struct kvm_cpuid2 *`` sized to what KVM reports
        (a fresh copy of the process's first answer)."""
        if Kvm._supported_cpuid is None:
            nent = 128
            while True:
                cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
                try:
                    ioctl_buf(self.fd, K.KVM_GET_SUPPORTED_CPUID, *_sized(cpuid, "struct kvm_cpuid2", "struct kvm_cpuid_entry2", nent))
                    break
                except KvmError as exc:
                    if exc.errno != errno.E2BIG or nent >= 4096:
                        raise
                    nent *= 2
            Kvm._supported_cpuid = (nent, bytes(ffi.buffer(*_sized(cpuid, "struct kvm_cpuid2", "struct kvm_cpuid_entry2", nent))))
        nent, data = Kvm._supported_cpuid
        copy = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
        ffi.memmove(copy, data, len(data))
        return copy

    def msr_index_list(self) -> list[int]:
        nmsrs = 256
        while True:
            lst = ffi.new("struct kvm_msr_list *", {"nmsrs": nmsrs, "indices": nmsrs})
            try:
                ioctl_buf(self.fd, K.KVM_GET_MSR_INDEX_LIST, *_sized(lst, "struct kvm_msr_list", "uint32_t", nmsrs))
                return [lst.indices[i] for i in range(lst.nmsrs)]
            except KvmError as exc:
                if exc.errno != errno.E2BIG or nmsrs >= 8192:
                    raise
                nmsrs *= 4

    def create_vm(self) -> Vm:
        return Vm(self, ioctl_int(self.fd, K.KVM_CREATE_VM, 0))


def _get_blob(fd: int, req: int, ctype: str) -> bytes:
    """A state structure read by ioctl, as its raw bytes (the snapshot format of KVM state)."""
    obj = ffi.new(f"{ctype} *")
    ioctl_buf(fd, req, obj)
    return bytes(ffi.buffer(obj))


def _from_bytes(ctype: str, data: bytes) -> Any:
    """A fresh ``ctype`` holding ``data``, which must be exactly its size."""
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise KvmError(ctype, errno.EINVAL, f"{ctype} state is {len(data)} bytes, KVM's ABI says {size}")
    obj = ffi.new(f"{ctype} *")
    ffi.memmove(obj, data, size)
    return obj


def _sized(obj: Any, head: str, elem: str, n: int) -> tuple[Any, int]:
    """``(obj, bytes)`` for a struct with a flexible array member holding ``n`` elements."""
    return obj, ffi.sizeof(head) + n * ffi.sizeof(elem)


class Vm(_FdOwner):
    """A VM fd: memory slots, the in-kernel irqchip and PIT, vCPUs, irqfds and ioeventfds."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.vcpus: list[Vcpu] = []
        self.coalesced_pio: set[tuple[int, int]] = set()  # (port, size) zones registered

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        super().close()

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_addr},
        )
        ioctl_buf(self.fd, K.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl_int(self.fd, K.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl_buf(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        ioctl_int(self.fd, K.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = K.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl_buf(self.fd, K.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl_buf(self.fd, K.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        ioctl_buf(
            self.fd,
            K.KVM_IRQFD,
            ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags, "resamplefd": resamplefd}),
        )

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None, pio: bool = True, deassign: bool = False) -> None:
        flags = (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (K.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
        ev = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        ioctl_buf(self.fd, K.KVM_IOEVENTFD, ev)

    def coalesce_pio(self, port: int, size: int, enable: bool = True) -> None:
        """Let guest writes to ports ``[port, port+size)`` queue in the coalesced ring
        instead of exiting (KVM_CAP_COALESCED_PIO), or stop that."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": port, "size": size, "pio": 1})
        ioctl_buf(self.fd, K.KVM_REGISTER_COALESCED_MMIO if enable else K.KVM_UNREGISTER_COALESCED_MMIO, zone)
        (self.coalesced_pio.add if enable else self.coalesced_pio.discard)((port, size))

    # --- in-kernel device state (snapshots) -------------------------------------------------
    def get_irqchip(self, chip_id: int) -> bytes:
        """One in-kernel interrupt controller (0: PIC master, 1: PIC slave, 2: IOAPIC)."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl_buf(self.fd, K.KVM_GET_IRQCHIP, chip)
        return bytes(ffi.buffer(chip))

    def set_irqchip(self, data: bytes) -> None:
        ioctl_buf(self.fd, K.KVM_SET_IRQCHIP, _from_bytes("struct kvm_irqchip", data))

    def get_pit2(self) -> bytes:
        return _get_blob(self.fd, K.KVM_GET_PIT2, "struct kvm_pit_state2")

    def set_pit2(self, data: bytes) -> None:
        ioctl_buf(self.fd, K.KVM_SET_PIT2, _from_bytes("struct kvm_pit_state2", data))

    def get_clock(self) -> bytes:
        return _get_blob(self.fd, K.KVM_GET_CLOCK, "struct kvm_clock_data")

    def set_clock(self, data: bytes) -> None:
        clock = _from_bytes("struct kvm_clock_data", data)
        # Only the clock value is restored: the realtime/host_tsc flags describe the source
        # host's moment, which a restore on another boot must not claim (api.rst KVM_SET_CLOCK).
        clock.flags = 0
        ioctl_buf(self.fd, K.KVM_SET_CLOCK, clock)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl_int(self.fd, K.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu


# vCPU state saved in snapshots: name -> (get ioctl, set ioctl, struct).
VCPU_STATE = {
    "regs": (K.KVM_GET_REGS, K.KVM_SET_REGS, "struct kvm_regs"),
    "sregs": (K.KVM_GET_SREGS, K.KVM_SET_SREGS, "struct kvm_sregs"),
    "fpu": (K.KVM_GET_FPU, K.KVM_SET_FPU, "struct kvm_fpu"),
    "xsave": (K.KVM_GET_XSAVE, K.KVM_SET_XSAVE, "struct kvm_xsave"),
    "xcrs": (K.KVM_GET_XCRS, K.KVM_SET_XCRS, "struct kvm_xcrs"),
    "lapic": (K.KVM_GET_LAPIC, K.KVM_SET_LAPIC, "struct kvm_lapic_state"),
    "events": (K.KVM_GET_VCPU_EVENTS, K.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events"),
    "mp_state": (K.KVM_GET_MP_STATE, K.KVM_SET_MP_STATE, "struct kvm_mp_state"),
}


class Vcpu(_FdOwner):
    """A vCPU fd with its mapped ``struct kvm_run``."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mapview = memoryview(self._map)
        self.run_struct = ffi.cast("struct kvm_run *", ffi.from_buffer(self._map))

    def mapped_page(self, page: int) -> memoryview:
        """Page ``page`` of this vCPU's mapping (e.g. the coalesced-MMIO ring)."""
        size = mmap.PAGESIZE
        if (page + 1) * size > len(self._map):
            raise KvmError("mmap", errno.EINVAL, f"page {page} lies beyond the vCPU mapping")
        return self._mapview[page * size : (page + 1) * size]

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self.run_struct = None
            self._mapview.release()
            try:
                self._map.close()
            except BufferError:  # a cffi view is still alive; the fd close below suffices
                pass
            self._map = None  # type: ignore[assignment]
        super().close()

    # --- state -------------------------------------------------------------------------
    def _get(self, req: int, ctype: str) -> Any:
        obj = ffi.new(f"{ctype} *")
        ioctl_buf(self.fd, req, obj)
        return obj

    def get_regs(self) -> Any:
        return self._get(K.KVM_GET_REGS, "struct kvm_regs")

    def set_regs(self, regs: Any) -> None:
        ioctl_buf(self.fd, K.KVM_SET_REGS, regs)

    def get_sregs(self) -> Any:
        return self._get(K.KVM_GET_SREGS, "struct kvm_sregs")

    def set_sregs(self, sregs: Any) -> None:
        ioctl_buf(self.fd, K.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> Any:
        return self._get(K.KVM_GET_FPU, "struct kvm_fpu")

    def set_fpu(self, fpu: Any) -> None:
        ioctl_buf(self.fd, K.KVM_SET_FPU, fpu)

    def get_lapic(self) -> Any:
        return self._get(K.KVM_GET_LAPIC, "struct kvm_lapic_state")

    def set_lapic(self, lapic: Any) -> None:
        ioctl_buf(self.fd, K.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> Any:
        return self._get(K.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events")

    def set_vcpu_events(self, events: Any) -> None:
        ioctl_buf(self.fd, K.KVM_SET_VCPU_EVENTS, events)

    def get_state(self, kind: str) -> bytes:
        """One of :data:`VCPU_STATE` as raw bytes (``regs``, ``sregs``, ``lapic``, ...)."""
        getter, _setter, ctype = VCPU_STATE[kind]
        return _get_blob(self.fd, getter, ctype)

    def set_state(self, kind: str, data: bytes) -> None:
        _getter, setter, ctype = VCPU_STATE[kind]
        ioctl_buf(self.fd, setter, _from_bytes(ctype, data))

    def set_cpuid2(self, cpuid: Any) -> None:
        ioctl_buf(self.fd, K.KVM_SET_CPUID2, *_sized(cpuid, "struct kvm_cpuid2", "struct kvm_cpuid_entry2", cpuid.nent))

    def set_msrs(self, msrs: dict[int, int]) -> None:
        n = len(msrs)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": [{"index": i, "data": v} for i, v in msrs.items()]})
        done = ioctl_buf(self.fd, K.KVM_SET_MSRS, *_sized(buf, "struct kvm_msrs", "struct kvm_msr_entry", n))
        if done != n:
            bad = list(msrs)[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused ({done} of {n} set)")

    def set_msrs_each(self, msrs: dict[int, int]) -> list[int]:
        """Set ``msrs``; where KVM refuses one (KVMs differ in the MSRs they emulate, and
        check each value), set the others one by one. Returns the refused indices (left
        at their reset values). Boot and restore both set MSRs this way."""
        try:
            self.set_msrs(msrs)
            return []
        except KvmError:
            pass
        refused = []
        for index, value in msrs.items():
            try:
                self.set_msrs({index: value})
            except KvmError:
                refused.append(index)
        return refused

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        n = len(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": [{"index": i} for i in indices]})
        done = ioctl_buf(self.fd, K.KVM_GET_MSRS, *_sized(buf, "struct kvm_msrs", "struct kvm_msr_entry", n))
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    # --- running -----------------------------------------------------------------------
    def kick(self) -> None:
        """Make the next (or current, with a signal) KVM_RUN return at once."""
        if self.run_struct is not None:
            self.run_struct.immediate_exit = 1

    def run(self) -> Exit:
        """Enter the guest until it exits to user space; returns a typed exit.

        EINTR (a signal, or ``immediate_exit``) returns :class:`InterruptedExit`.
        """
        try:
            fcntl.ioctl(self.fd, K.KVM_RUN, 0)
        except InterruptedError:
            self.run_struct.immediate_exit = 0
            return InterruptedExit()
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return InterruptedExit()
            raise KvmError("KVM_RUN", exc.errno or 0) from None
        return self.decode_exit()

    def decode_exit(self) -> Exit:
        # The two hottest fields are read with struct at their ABI offsets (asserted in
        # structs.py): several times cheaper than cffi attribute access, per exit.
        reason = _EXIT_REASON.unpack_from(self._map, _EXIT_REASON_OFFSET)[0]
        if reason == K.KVM_EXIT_IO:
            direction, size, port, count, off = _IO_EXIT.unpack_from(self._map, _IO_OFFSET)
            return IoExit(port, size, count, direction == K.KVM_EXIT_IO_OUT, self._mapview[off : off + size * count])
        run = self.run_struct
        if reason == K.KVM_EXIT_MMIO:
            m = run.mmio
            n = min(m.len, 8)
            off = ffi.offsetof("struct kvm_run", "mmio") + 8
            return MmioExit(m.phys_addr, n, bool(m.is_write), self._mapview[off : off + n])
        if reason == K.KVM_EXIT_HLT:
            return HltExit()
        if reason == K.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == K.KVM_EXIT_INTR:
            return InterruptedExit()
        if reason == K.KVM_EXIT_SYSTEM_EVENT:
            ev = run.system_event
            return SystemEventExit(ev.type, tuple(ev.data[i] for i in range(min(ev.ndata, 16))))
        if reason == K.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            insn = b""
            if internal.suberror == K.KVM_INTERNAL_ERROR_EMULATION and internal.ndata >= 1:
                ef = run.emulation_failure
                if ef.flags & K.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                    insn = bytes(ffi.buffer(ef.insn_bytes))[: min(ef.insn_size, 15)]
            data = tuple(internal.data[i] for i in range(min(internal.ndata, 16)))
            return InternalErrorExit(internal.suberror, data, insn)
        if reason == K.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        return UnknownExit(reason)
