"""The plain constants of the command line and of a VM's configuration, and the exit
statuses. Nothing here imports the rest of kvmm: the ``kvmm`` command reads them to build
its parser before it loads the rest of kvmm (kvmm/cli.py). Addresses, ports and
interrupt lines are in :mod:`kvmm.layout`."""

DEFAULT_CMDLINE = ("console=ttyS0", "panic=-1", "reboot=k")

# Exit statuses of the kvmm command.
EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_USAGE = 2
EXIT_PANIC = 3
EXIT_VCPU_ERROR = 4
EXIT_TIMEOUT = 5
EXIT_SMOKE_ENDED = 6
EXIT_IMAGE = 10
EXIT_DISK = 11
EXIT_MEMORY = 12
EXIT_KVM_UNAVAILABLE = 13
EXIT_NET = 14
EXIT_SNAPSHOT = 15
EXIT_CTL_UNREACHABLE = 16
EXIT_RUN_NOT_RUN = 17
EXIT_DEBUG_BASE = 64

# The one table of them: `kvmm --help` prints it, the README's "Exit status" table is it
# (tests/test_cli.py holds both to it). Markdown, as the README shows it.
EXIT_STATUSES = (
    ("0", "the guest powered off (ACPI S5) or reset (`reboot=k` through the i8042, the ACPI reset register, "
          "triple fault, KVM shutdown/system event), or, where guest user space cannot run, the kernel started init"),
    ("1", "kvmm failed (an internal or KVM error)"),
    ("2", "invalid command-line usage (unknown option, bad size syntax, `--cpus` out of range, a console file "
          "kvmm cannot write without blocking)"),
    ("3", "the guest kernel panicked (recognised on the console; `panic=-1`, the default, makes it reset at once)"),
    ("4", "a vCPU failed: KVM could not emulate an instruction (RIP and instruction bytes are printed) or "
          "enter the guest"),
    ("5", "`--timeout` passed with the VM still running"),
    ("6", "`kvmm smoke` only: the guest powered off or reset without printing the expected line"),
    ("10", "the kernel or initrd is missing, unreadable or not a bootable image (a bzImage payload that is "
            "truncated, corrupt or too large included)"),
    ("11", "a disk or `--share` directory is missing, unreadable, not writable (use `,ro`) or in use by another process"),
    ("12", "guest memory cannot be provided (more than available, no hugepages reserved)"),
    ("13", "`/dev/kvm` is missing or not accessible"),
    ("14", "a `--net` backend cannot be set up (no `/dev/net/tun`, no permission, tap busy)"),
    ("15", "`--restore`: the snapshot is damaged, truncated, from another kvmm version, not authenticated by this "
           "user's snapshot key, or its disks changed since"),
    ("16", "`kvmm ctl`: the control socket cannot be reached"),
    ("17", "`kvmm run`: the command did not run to its end (guest user space cannot run on this host, so the boot "
           "ended at init; or the guest ended without reporting the command's exit status)"),
    (f"{EXIT_DEBUG_BASE} + v", "the guest wrote `v` (0-63) to the debug-exit port 0x501"),
    ("2v + 1", "with `--debug-exit PORT[,SIZE]`: the guest wrote `v` there (QEMU's isa-debug-exit convention, "
               "`(v << 1) + 1`, its low byte; odd statuses then overlap kvmm's own, which come with a "
               "`kvmm: error:` line)"),
    ("130, 143", "interrupted by SIGINT or SIGTERM (or `Ctrl-A x`)"),
)

KVM_DEVICE = "/dev/kvm"
KVM_DEVICE_ENV = "KVMM_KVM_DEVICE"  # names another node instead (used by tests)

MAX_CPUS = 16  # the MP table lives in the 1 KiB below 640 KiB
CONSOLE_DEVICES = ("serial", "virtio")  # the 8250 (ttyS0) or virtio-console (hvc0)
# auto: an ELF vmlinux, or a bzImage with its payload decompressed on the host; bzimage: a
# bzImage entered through its own decompressor; flat: a real-mode binary at 1000:0000.
KERNEL_FORMATS = ("auto", "bzimage", "flat", "multiboot")

