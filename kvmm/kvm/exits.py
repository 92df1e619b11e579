"""Typed vCPU exits returned by :meth:`kvmm.kvm.system.Vcpu.run`.

Plain slotted classes rather than dataclasses: ``@dataclass`` compiles its methods when
the module is imported, ~0.6 ms a class on these machines, and these nine classes were
5 ms of every start (docs/performance.md, start-up profile). The base class gives them
the repr and equality a dataclass would.
"""

from __future__ import annotations


class Exit:
    """Base of every exit type: fields are the ``__slots__``."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in zip(self.__slots__, self._fields()))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Exit)
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq


class IoExit(Exit):
    """Port I/O: ``data`` views ``size * count`` bytes in kvm_run (valid until the next run).

    For an IN the handler writes the result into ``data``.
    """

    __slots__ = ("port", "size", "count", "is_write", "data")

    def __init__(self, port: int, size: int, count: int, is_write: bool, data: memoryview) -> None:
        self.port, self.size, self.count, self.is_write, self.data = port, size, count, is_write, data


class MmioExit(Exit):
    __slots__ = ("phys_addr", "length", "is_write", "data")

    def __init__(self, phys_addr: int, length: int, is_write: bool, data: memoryview) -> None:
        self.phys_addr, self.length, self.is_write, self.data = phys_addr, length, is_write, data


class HltExit(Exit):
    __slots__ = ()


class ShutdownExit(Exit):
    """The guest triple-faulted (or otherwise shut the vCPU down)."""

    __slots__ = ()


class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a signal or ``immediate_exit`` asked the vCPU to come out."""

    __slots__ = ()


class SystemEventExit(Exit):
    __slots__ = ("type", "data")

    def __init__(self, type: int, data: tuple[int, ...]) -> None:  # noqa: A002 (kvm_run's field name)
        self.type, self.data = type, data


class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR; ``insn`` holds the instruction bytes of an emulation failure."""

    __slots__ = ("suberror", "data", "insn")

    def __init__(self, suberror: int, data: tuple[int, ...], insn: bytes) -> None:
        self.suberror, self.data, self.insn = suberror, data, insn


class FailEntryExit(Exit):
    __slots__ = ("hardware_reason", "cpu")

    def __init__(self, hardware_reason: int, cpu: int) -> None:
        self.hardware_reason, self.cpu = hardware_reason, cpu


class UnknownExit(Exit):
    """An exit reason kvmm does not handle."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason
