"""Typed vCPU exits returned by :meth:`kvmm.kvm.system.Vcpu.run`."""

from __future__ import annotations

from dataclasses import dataclass


class Exit:
    """Base of every exit type."""

    __slots__ = ()


@dataclass(slots=True)
class IoExit(Exit):
    """Port I/O: ``data`` views ``size * count`` bytes in kvm_run (valid until the next run).

    For an IN the handler writes the result into ``data``.
    """

    port: int
    size: int
    count: int
    is_write: bool
    data: memoryview


@dataclass(slots=True)
class MmioExit(Exit):
    phys_addr: int
    length: int
    is_write: bool
    data: memoryview


@dataclass(slots=True)
class HltExit(Exit):
    pass


@dataclass(slots=True)
class ShutdownExit(Exit):
    """The guest triple-faulted (or otherwise shut the vCPU down)."""


@dataclass(slots=True)
class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a signal or ``immediate_exit`` asked the vCPU to come out."""


@dataclass(slots=True)
class SystemEventExit(Exit):
    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR; ``insn`` holds the instruction bytes of an emulation failure."""

    suberror: int
    data: tuple[int, ...]
    insn: bytes


@dataclass(slots=True)
class FailEntryExit(Exit):
    hardware_reason: int
    cpu: int


@dataclass(slots=True)
class UnknownExit(Exit):
    """An exit reason kvmm does not handle."""

    reason: int
