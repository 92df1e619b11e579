"""kvmm: a lightweight virtual machine monitor for KVM, in Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ConsoleTimeout", "DiskConfig", "KvmmError", "Machine", "NetConfig", "Outcome", "VmConfig", "VmResult"]

# The API names load their modules on first use (PEP 562), so that ``kvmm.cli`` decides
# what is imported at the command's start (kvmm/cli.py, docs/performance.md).
_HOMES = {"ConsoleTimeout": "errors", "KvmmError": "errors", "DiskConfig": "config", "Machine": "vm",
          "NetConfig": "config", "Outcome": "config", "VmConfig": "config", "VmResult": "config"}

if TYPE_CHECKING:
    from .config import DiskConfig, NetConfig, Outcome, VmConfig, VmResult
    from .errors import ConsoleTimeout, KvmmError
    from .vm import Machine


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvmm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
