"""The KVM ioctl and struct layer."""

from .exits import Exit, IoExit
from .structs import ffi
from .system import Kvm, Vcpu, Vm

__all__ = ["Exit", "IoExit", "Kvm", "Vcpu", "Vm", "ffi"]
