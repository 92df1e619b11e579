"""kvmm: a lightweight virtual machine monitor for KVM, in Python."""

__version__ = "0.1.0"

from .errors import ConsoleTimeout, KvmmError
from .vm import DiskConfig, Machine, NetConfig, Outcome, VmConfig, VmResult

__all__ = ["ConsoleTimeout", "DiskConfig", "KvmmError", "Machine", "NetConfig", "Outcome", "VmConfig", "VmResult"]
