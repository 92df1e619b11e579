"""The plain constants of the machine and of the command line. No imports: the ``kvmm``
command reads them to build its parser before it loads the rest of kvmm (kvmm/cli.py);
:mod:`kvmm.config` re-exports them."""

DEFAULT_CMDLINE = ("console=ttyS0", "panic=-1", "reboot=k")

# Exit statuses of the kvmm command (documented in the README).
EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_PANIC = 3
EXIT_VCPU_ERROR = 4
EXIT_TIMEOUT = 5
EXIT_DEBUG_BASE = 64

MAX_CPUS = 16  # the MP table lives in the 1 KiB below 640 KiB
CONSOLE_DEVICES = ("serial", "virtio")  # the 8250 (ttyS0) or virtio-console (hvc0)

COM1_BASE = 0x3F8  # the 8250 UART (ttyS0) and its ISA interrupt
COM1_IRQ = 4

PCI_IRQ_BASE = 16  # IOAPIC inputs 16-23 carry PCI INTA of slots 1, 2, ...
PCI_IRQ_COUNT = 8
