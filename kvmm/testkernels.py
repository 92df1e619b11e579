"""Booting the test kernels users bring: multiboot kernels, and the devices that kernels
written for QEMU's test harnesses expect of a PC.

The builder (kvmm/builder.py) calls two functions:

- :func:`boot_multiboot` loads a multiboot kernel and its modules (kvmm/loader/multiboot.py)
  and returns the :class:`~kvmm.loader.BootInfo` (kind "multiboot": kvmm.x86.setup_boot_vcpu
  then enters it in the 32-bit state of Multiboot 0.6.96 section 3.2) and the command line
  it was given;
- :func:`attach_devices` adds what the configuration asks for: a debug-exit port with
  QEMU's convention (``--debug-exit``), QEMU's pc-testdev (``--pc-testdev``), and, for a
  multiboot kernel, the fw_cfg items such kernels read (kvmm/devices/fw_cfg.py).

Imported only when one of them is in use (kvmm's start-up, tests/test_startup.py).
"""

from __future__ import annotations

import logging
from typing import Callable

from .config import Outcome, VmConfig, VmResult
from .devices.bus import MmioBus, PioBus
from .devices.debug import DEBUG_EXIT_PORT, DebugExit
from .errors import ConfigError
from .kvm.system import Vm
from .loader import BootInfo, read_image
from .loader import multiboot as mb
from .memory import GuestMemory

LOG = logging.getLogger(__name__)


def multiboot_cmdline(kernel_path: str, args: str) -> str:
    """What a multiboot kernel sees as its command line: its file name, then the user's
    arguments (as GRUB and QEMU pass it; kvm-unit-tests take the first word as argv[0])."""
    return f"{kernel_path} {args}" if args else kernel_path


def boot_multiboot(mem: GuestMemory, kernel: bytes, cfg: VmConfig) -> tuple[BootInfo, str]:
    """Load the multiboot kernel ``kernel`` with the modules of ``cfg`` (``--initrd`` as
    QEMU's ``-initrd``, then each ``--module``); its BootInfo's ``boot_params`` is the
    ``multiboot_info`` address (EBX at entry)."""
    cmdline = multiboot_cmdline(cfg.kernel, cfg.cmdline)
    specs = mb.parse_modules(cfg.initrd, cfg.modules)
    modules = [mb.Module(read_image(spec.split(" ", 1)[0], "multiboot module", mem.size), spec) for spec in specs]
    boot = mb.load_multiboot(mem, kernel, cmdline, modules, name=cfg.kernel)
    return BootInfo("multiboot", boot.entry, boot.info, boot.kernel_end, None), cmdline


def attach_devices(cfg: VmConfig, pio: PioBus, mmio: MmioBus, mem: GuestMemory, vm: Vm, multiboot: bool,
                   stop: Callable[[VmResult], None]) -> None:
    """Register the debug-exit port, pc-testdev and fw_cfg as ``cfg`` asks (see the module
    docstring). A port that another device holds is a ConfigError."""
    try:
        if cfg.debug_exit is not None:
            port, size = cfg.debug_exit

            def debug_exit(value: int) -> None:
                stop(VmResult(Outcome.DEBUG_EXIT, f"guest wrote {value:#x} to the debug-exit port {port:#x}",
                              debug_value=value, debug_qemu=True))

            if port <= DEBUG_EXIT_PORT < port + size:
                pio.unregister(DEBUG_EXIT_PORT, 1)  # QEMU's convention replaces kvmm's there
            try:
                pio.register(port, size, DebugExit(debug_exit, full_width=True))
            except ValueError:
                raise ConfigError(f"--debug-exit {port:#x},{size}: another kvmm device uses one of these ports") from None
        if cfg.pc_testdev:
            from .devices.testdev import PcTestDev

            PcTestDev(mem, vm.irq_line).attach(pio, mmio)
        if multiboot:
            from .devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORTS, FwCfg, fw_cfg_items

            pio.register(FW_CFG_PORT, FW_CFG_PORTS, FwCfg(fw_cfg_items(cfg.mem_size, cfg.cpus)))
    except ValueError:  # PioBus/MmioBus: the debug-exit port sits where these devices go
        where = f"{cfg.debug_exit.port:#x},{cfg.debug_exit.size}" if cfg.debug_exit else ""
        raise ConfigError(f"--debug-exit {where}: overlaps the ports of pc-testdev or fw_cfg") from None
