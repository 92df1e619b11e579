"""What the ``kvmm`` command loads at start (start-up time is mostly imports: see
docs/performance.md). These tests hold the savings that are easy to lose by adding one
import at the top of a module: the deferred standard-library modules, the device and
loader modules a VM without them skips, and the docstrings that keep ``dataclasses``
from needing ``inspect``."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import kvmm

ROOT = Path(__file__).resolve().parents[1]

# Not loaded by the kvmm command for a VM without devices (kvmm.cli.main's imports).
NOT_AT_START = (
    "ast", "dis", "tokenize", "linecache",  # inspect's and traceback's, deferred by kvmm.cli
    "shutil", "bz2", "lzma", "pathlib",  # argparse's formatter and cdef.py used to pull these in
    "cffi",  # the declarations come pre-parsed (kvmm/kvm/_abi.py)
    "ioctl_opt", "ctypes",  # its numbers come cached (kvmm/kvm/_ioctl_numbers.py)
    "kvmm.snapshot", "kvmm.api", "kvmm.tap", "kvmm.hostcheck", "kvmm.loader.elf", "kvmm.loader.bzimage",
    "kvmm.loader.payload", "lz4", "zstandard", "lzo",  # a bzImage's payload decoders
    "kvmm.virtio.blk", "kvmm.virtio.net", "kvmm.virtio.console", "kvmm.virtio.rng", "kvmm.virtio.pci_legacy",
    "kvmm.virtio.p9", "kvmm.p9.server", "kvmm.p9.hostfs", "kvmm.run", "resource",
    "kvmm.loader.multiboot", "kvmm.testkernels", "kvmm.cpuid", "kvmm.devices.fw_cfg", "kvmm.devices.testdev",
    "kvmm.acpi", "kvmm.acpi.aml", "kvmm.acpi.tables", "kvmm.acpi.dsdt", "kvmm.devices.acpi_pm",  # ACPI machines only
    "iced_x86",  # the decoder, ~6 ms: at the first instruction KVM could not emulate (kvmm/emulate.py)
)


def fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in an interpreter without site (whatever .pth files this machine's
    site-packages runs would load modules of their own), kvmm and its dependencies
    on the path."""
    path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path})


def test_cli_import_leaves_unused_modules_unloaded() -> None:
    # What the command imports on its way to a running VM (kvmm.cli.main): all but the
    # devices the VM has and the loader of its kernel's format.
    res = fresh_python("import sys, kvmm.cli, kvmm.memory, kvmm.x86, kvmm.vm\n"
                       f"print(' '.join(m for m in {NOT_AT_START!r} if m in sys.modules))\n"
                       "print(type(sys.modules['inspect']).__name__, sys.modules['inspect'].__doc__)")
    assert res.returncode == 0, res.stderr
    loaded, placeholder = res.stdout.splitlines()
    assert loaded == "", f"imported at start: {loaded}"
    assert "stands in for inspect" in placeholder


def test_deferred_modules_load_on_first_use() -> None:
    res = fresh_python("import kvmm.cli, logging, inspect\n"
                       "print(inspect.signature(divmod))\n"
                       "try:\n    1 / 0\n"
                       "except ZeroDivisionError:\n    logging.getLogger('t').exception('caught')\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(x, y, /)"
    assert "Traceback (most recent call last)" in res.stderr and "ZeroDivisionError" in res.stderr


def test_every_kvmm_dataclass_has_a_docstring() -> None:
    """dataclasses calls inspect.signature for a class without one, which would load the
    deferred inspect in the middle of a start."""
    missing = []
    for info in pkgutil.walk_packages(kvmm.__path__, "kvmm."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and obj.__module__ == info.name and dataclasses.is_dataclass(obj)
                    and "__doc__" in vars(obj) and obj.__doc__ and obj.__doc__.startswith(obj.__name__ + "(")):
                missing.append(f"{info.name}.{obj.__name__}")
    assert not missing, f"dataclasses without a docstring: {missing}"


def test_kvmm_command_flushes_before_its_fast_exit(tmp_path: Path) -> None:
    """``kvmm.cli.run`` ends with os._exit: what it printed must still arrive."""
    res = subprocess.run([sys.executable, "-m", "kvmm", "--kernel", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0
    assert "does not exist" in res.stderr


@pytest.mark.kvm
def test_a_vm_without_devices_imports_no_device_code(guests) -> None:  # type: ignore[no-untyped-def]
    """What the command loads to run a guest with no virtio device: nothing of kvmm.virtio,
    no snapshot or socket code (the modules are imported as a configuration needs them)."""
    res = fresh_python("import sys, kvmm.cli\n"
                       f"status = kvmm.cli.main(['-q', '--kernel', {str(guests('serial_hello'))!r}, '--mem', '16M', "
                       "'--no-rng', '--console', 'file:/dev/null'])\n"
                       "print(status, ' '.join(sorted(m for m in sys.modules if m.startswith('kvmm.virtio') or m in "
                       f"{NOT_AT_START!r})))\n")
    assert res.returncode == 0, res.stderr
    status, *loaded = res.stdout.split()
    assert status == "106"  # 64 + the guest's 42
    # The kernel's loaders are used, and ACPI's tables and PM device (an ELF kernel gets them)
    assert [m for m in loaded if not m.startswith(("kvmm.loader.", "kvmm.acpi", "kvmm.devices.acpi_pm"))] == []
