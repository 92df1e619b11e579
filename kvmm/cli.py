"""The ``kvmm`` command line."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import signal
import sys
import threading
import types
from typing import TYPE_CHECKING, Any, Callable, NoReturn


def _defer_import(name: str) -> None:
    """Put off loading the standard library module ``name`` until something uses it.

    Two modules that kvmm's imports pull in but a VM run rarely touches: ``inspect``,
    which ``dataclasses`` imports (with ``ast`` and ``dis``) but calls only for a
    dataclass without a docstring - kvmm's all have one - and ``traceback``, which
    ``logging`` imports (with ``linecache``, ``tokenize`` and ``textwrap``) for
    formatting an exception. Together 7 ms of every kvmm start on the machines of
    docs/performance.md. A placeholder module stands in and loads the real one on its
    first attribute access (importlib's LazyLoader cannot do this on Python 3.11: the
    import statement reads ``__spec__``, which loads the module). Nothing changes in a
    process that has already loaded the module (pytest has both).
    tests/test_startup.py checks both ways."""
    if name in sys.modules:
        return
    placeholder = types.ModuleType(name, f"stands in for {name} until first used (kvmm.cli)")
    lock = threading.Lock()

    def load(attr: str) -> Any:
        with lock:  # the first uses may come from two vCPU threads at once
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]
            module = importlib.import_module(name)
            vars(placeholder).update(vars(module))
        return getattr(module, attr)

    setattr(placeholder, "__getattr__", load)  # PEP 562
    sys.modules[name] = placeholder


for _name in ("inspect", "traceback"):  # before the kvmm modules below import dataclasses, logging
    _defer_import(_name)

import logging  # noqa: E402

from . import __version__  # noqa: E402
from .defaults import (  # noqa: E402
    CONSOLE_DEVICES, DEFAULT_CMDLINE, EXIT_CTL_UNREACHABLE, EXIT_SMOKE_ENDED, EXIT_STATUSES, EXIT_USAGE, EXIT_VMM_ERROR,
    KERNEL_FORMATS,
)
from .errors import KvmmError  # noqa: E402

if TYPE_CHECKING:
    from .config import VmConfig

# The rest of kvmm is imported in main(), the device code once the VM exists
# (kvmm.x86.create_vm says why).

LOG = logging.getLogger("kvmm")

def _status_table(statuses: tuple[tuple[str, str], ...], width: int = 88) -> str:
    """The exit statuses as help text: the README's table (kvmm.defaults.EXIT_STATUSES),
    wrapped without textwrap (an import at every start for text only --help shows)."""
    lines = ["exit status:"]
    for status, meaning in statuses:
        line = f"  {status:<8}"
        for word in meaning.replace("`", "").split():
            if len(line) + 1 + len(word) > width and len(line) > 11:
                lines.append(line)
                line = " " * 10
            line += " " + word
        lines.append(line)
    return "\n".join(lines) + "\n"


EPILOG = f"""\
The kernel command line is '{" ".join(DEFAULT_CMDLINE)}' plus --cmdline; a parameter
given in --cmdline replaces the default of the same name (e.g. console=hvc0).

{{statuses}}"""


def _console(value: str) -> tuple[str, str | None]:
    """``[serial|virtio][,stdio|file:PATH]`` -> (device, output path or None for stdout)."""
    device, path = "serial", None
    for part in value.split(","):
        if part in CONSOLE_DEVICES:
            device = part
        elif part == "stdio":
            path = None
        elif part.startswith("file:") and len(part) > 5:
            path = part[5:]
        else:
            raise argparse.ArgumentTypeError("expected serial or virtio, and stdio or file:PATH (e.g. virtio,file:out.log)")
    return device, path


def _stop_at_init(value: str) -> bool | None:
    choices = {"auto": None, "yes": True, "no": False}
    if value not in choices:
        raise argparse.ArgumentTypeError("expected auto, yes or no")
    return choices[value]


SMOKE_EPILOG = """\
exit status:
  0   the expected output appeared
  3   the guest kernel panicked first
  4   a vCPU failed first
  5   --timeout passed first
  6   the guest ended (power-off, reset) without the expected output
  1, 2, 10-14 as for kvmm itself

a CI job (GitHub Actions):
  - run: kvmm smoke --kernel vmlinux --disk root.img --cmdline "root=/dev/vda" \\
           --expect 'login:|Run /sbin/init' --timeout 300
"""



class _Parser(argparse.ArgumentParser):
    """argparse's parser with its epilog made when help is printed (the exit status
    table is formatted for --help only, not at every start), and its usage errors as
    every kvmm error is (README): one line, ``kvmm: error: ...``, status 2. argparse
    would print the whole usage block first, under the sub-command's own prefix."""

    def __init__(self, *args: Any, epilog_maker: Callable[[], str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.epilog_maker = epilog_maker

    def format_help(self) -> str:
        if self.epilog_maker is not None:
            self.epilog = self.epilog_maker()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever argparse put together
        self.exit(EXIT_USAGE, f"kvmm: error: {message} ('{self.prog} --help' for usage)\n")


def _seconds(text: str) -> float:
    """A number of seconds for --timeout: finite and positive (float() takes 'nan' and
    'inf', and a NaN deadline compares false with every time: it would never pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds above 0, not {text!r}")
    return value


def _regex(text: str) -> re.Pattern[bytes]:
    """--expect: a regular expression, compiled now so a bad one is a usage error."""
    try:
        return re.compile(os.fsencode(text))
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a path, not an empty string")
    return text


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized the way it sizes itself, minus its ``import shutil``
    (which pulls in bz2, lzma and fnmatch: 3 ms of every start, since argparse builds a
    formatter for each add_argument)."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
            except (AttributeError, ValueError, OSError):
                columns = 80
        super().__init__(prog, width=max(columns, 1) - 2)


def build_parser(prog: str = "kvmm", smoke: bool = False) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description=("Boot a guest and wait for a console line: the one-line CI smoke boot." if smoke else
                     "Boot a Linux kernel in a KVM virtual machine, with its console on your terminal. "
                     "'kvmm smoke --help' for the CI smoke boot, 'kvmm host' to check this host."),
        epilog=SMOKE_EPILOG if smoke else None,
        epilog_maker=None if smoke else lambda: EPILOG.format(statuses=_status_table(EXIT_STATUSES)),
        formatter_class=_HelpFormatter,
    )
    if smoke:
        p.add_argument("--expect", required=True, type=_regex, metavar="REGEX",
                       help="the console line (a regex) that means success")
    p.add_argument("--kernel", metavar="PATH", help="kernel image: ELF vmlinux or bzImage (x86-64)")
    if not smoke:
        p.add_argument("--restore", metavar="DIR", help="continue the VM saved in a snapshot directory "
                       "(made by the control socket's snapshot command) instead of booting a kernel")
        p.add_argument("--verify-memory", action="store_true",
                       help="with --restore: check the snapshot memory's digest first (reads what the guest had touched)")
    p.add_argument("--kernel-format", choices=KERNEL_FORMATS, default="auto",
                   help="auto: a multiboot kernel (found by its header), an ELF vmlinux, or a bzImage whose "
                   "compressed kernel kvmm decompresses on the host (default); bzimage: enter the bzImage's own "
                   "decompressor instead; flat: a real-mode binary loaded and entered at 1000:0000, as kvmtool does "
                   "(tiny test guests); multiboot: a Multiboot 0.6.96 kernel (e.g. kvm-unit-tests' x86/*.flat)")
    p.add_argument("--initrd", metavar="PATH", help="initial ramdisk (e.g. a gzip cpio archive); for a multiboot "
                   "kernel, its modules as QEMU's -initrd takes them: 'PATH[ ARGS][,PATH[ ARGS]]...'")
    p.add_argument("--module", action="append", default=[], metavar="'PATH[ ARGS]'",
                   help="a multiboot module after --initrd's, with its command line; repeatable")
    p.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,serial=ID]",
                   help="raw disk image as a virtio-blk disk (vda, vdb, ... in order); repeatable")
    p.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                   help="virtio-net on a TAP interface (existing, or created with CAP_NET_ADMIN); repeatable")
    p.add_argument("--share", action="append", default=[], metavar="PATH,tag=NAME[,ro|rw]",
                   help="share a host directory over virtio-9p, read-only unless rw (in the guest: "
                   "mount -t 9p -o trans=virtio NAME DIR); repeatable")
    p.add_argument("--cmdline", metavar="STR", help="extra kernel command-line parameters")
    p.add_argument("--mem", metavar="SIZE", help="guest RAM, e.g. 256M or 2G (default: 512M)")
    p.add_argument("--cpus", type=int, metavar="N", help="number of vCPUs (default: 1)")
    p.add_argument("--hugepages", action="store_true", help="back guest RAM with the host's reserved hugepages")
    p.add_argument("--console", type=_console, default=("serial", None), metavar="[serial|virtio][,stdio|file:PATH]",
                   help="the primary console: the 16550A (ttyS0, default) or virtio-console (hvc0); "
                   "its output to stdout (default) or a file")
    p.add_argument("--no-rng", dest="rng", action="store_false", help="no virtio-rng device")
    p.add_argument("--debug-exit", metavar="PORT[,SIZE]", help="a debug-exit port with QEMU's isa-debug-exit "
                   "convention: a guest write of v there ends kvmm with status (v << 1) | 1 (kvm-unit-tests: 0xf4,4); "
                   "kvmm's own port 0x501 (status 64 + v) stays")
    p.add_argument("--cpu-features", metavar="+NAME,-NAME,...",
                   help="set or clear CPU features in the vCPUs' CPUID (QEMU's names: x2apic, pcid, tsc-deadline, ...)")
    p.add_argument("--pc-testdev", action="store_true", help="QEMU's pc-testdev test device (ports 0xe0-0xeb, "
                   "0x2000-0x2017, MMIO 0xff000000), as kvm-unit-tests' harness adds it")
    p.add_argument("--stop-at-init", type=_stop_at_init, default=None, metavar="auto|yes|no",
                   help="end the VM when the kernel starts init (default auto: only where guest user space cannot run)")
    p.add_argument("--timeout", type=_seconds, default=300.0 if smoke else None, metavar="SECONDS",
                   help="end the VM (exit status 5) if it still runs after SECONDS" + (" (default 300)" if smoke else ""))
    p.add_argument("--stats", action="store_true", help="print the exits to kvmm by reason when the VM ends")
    p.add_argument("--no-exitless", dest="exitless", action="store_false",
                   help="serve queue notifies and UART writes as VM exits and INTx by KVM_IRQ_LINE (for comparison)")
    p.add_argument("--no-msix", dest="msix", action="store_false", help="offer virtio devices without MSI-X (INTx only)")
    p.add_argument("--no-acpi", dest="acpi", action="store_false",
                   help="write no ACPI tables and leave out the ACPI PM ports (the guest finds the MP table alone)")
    p.add_argument("--api-sock", type=_nonempty, metavar="PATH", help="serve the JSON control socket at PATH "
                   "(status, pause, resume, snapshot, shutdown, stats; see 'kvmm ctl --help')")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    p.add_argument("--version", action=_VersionAction, help="print kvmm's version and the host's KVM kind, then exit")
    return p


class _VersionAction(argparse.Action):
    """``--version``: the version and the host's KVM kind (kvmm.host.kind_summary: stat
    calls only), worked out when asked for rather than at every parser build."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        from .host import kind_summary

        print(f"kvmm {__version__} (host KVM: {kind_summary()})")
        parser.exit()


CTL_EPILOG = f"""\
commands:
  status            running, paused or stopped; uptime, vCPUs, memory
  pause             stop the vCPUs and device work at a consistent point
  resume            continue after pause
  snapshot DIR      write a snapshot directory (kvmm --restore DIR continues it)
  shutdown          end the VM (kvmm exits with status 0)
  stats             exits to kvmm and device counters

The answer is printed as JSON. exit status: 0 done, 1 refused (the answer says why) or
no answer within --timeout, {EXIT_CTL_UNREACHABLE} the socket cannot be reached.
"""


def ctl_main(argv: list[str]) -> int:
    """``kvmm ctl SOCKET COMMAND [DIR]``: one request to a running kvmm's control socket."""
    import json

    from .api import COMMANDS
    from .api import request as api_request

    p = _Parser(prog="kvmm ctl", description="Send a command to a running kvmm's control socket.", epilog=CTL_EPILOG)
    p.add_argument("socket", help="the path given to kvmm --api-sock")
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("path", nargs="?", metavar="DIR", help="snapshot: the directory to create")
    p.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="how long to wait for the answer (default 600: a snapshot writes all of RAM)")
    args = p.parse_args(argv)
    extra = {}
    if args.command == "snapshot":
        if not args.path:
            p.error("snapshot needs a directory: kvmm ctl SOCKET snapshot DIR")
        extra["path"] = os.path.abspath(args.path)  # the VM's working directory may differ
    elif args.path:
        p.error(f"{args.command} takes no argument")
    try:
        response = api_request(args.socket, args.command, timeout=args.timeout, **extra)
    except TimeoutError:
        print(f"kvmm: error: {args.socket} gave no answer to {args.command} within {args.timeout:g} s", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"kvmm: error: cannot reach the control socket {args.socket}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return EXIT_CTL_UNREACHABLE
    print(json.dumps(response, indent=1))
    return 0 if response.get("ok") else 1


RUN_EPILOG = """\
The guest's root is the host's / (or --root DIR), read-only over virtio-9p, with a tmpfs
over /tmp, /var/tmp and /var/log; the current directory is where it is (read-only
unless under a --rw DIR). The command's stdout and stderr are kvmm's; its stdin is
kvmm's when that is a terminal, else /dev/null. kvmm exits with the command's status.

kvmm's own exit statuses (a 'kvmm: error:' line says which): 3 the guest kernel
panicked, 5 --timeout passed, 17 the command did not run to its end (guest user space
cannot run on this host: the boot ends at init), others as for kvmm (kvmm --help).

examples:
  kvmm run -- uname -a
  kvmm run --rw . -- make test
  kvmm run --kernel bzImage --mem 1G -- sh -c 'echo hi; exit 3'
"""


def run_main(argv: list[str]) -> int:
    """``kvmm run [OPTIONS] -- CMD [ARGS...]``: a command in a guest booted on the host's files."""
    p = _Parser(prog="kvmm run", epilog=RUN_EPILOG,
                                description="Run a command in a VM whose root file system is the host's own files "
                                "(read-only, over virtio-9p); exit with its status.")
    p.add_argument("--kernel", metavar="PATH", help="kernel image (default: $KVMM_KERNEL, else the project kernel "
                   "from kernels/build.sh's cache); it needs virtio-pci, 9p and a virtio console")
    p.add_argument("--root", default="/", metavar="DIR", help="the guest's root file system (default: /)")
    p.add_argument("--rw", action="append", default=[], metavar="DIR",
                   help="make DIR writable in the guest (shared read-write at its path); repeatable")
    p.add_argument("--share", action="append", default=[], metavar="PATH,tag=NAME[,ro|rw]",
                   help="share another directory, mounted at its host path (read-only unless rw); repeatable")
    p.add_argument("--mem", default="512M", metavar="SIZE", help="guest RAM (default: 512M)")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default: 1)")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="end the VM (exit status 5) after SECONDS")
    p.add_argument("--console-log", metavar="PATH", help="keep the kernel's console output in PATH")
    p.add_argument("--stats", action="store_true", help="print the exits to kvmm and device counters at the end")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what kvmm does (-v -v: debugging detail)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the command and its arguments")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("the command is missing: kvmm run [OPTIONS] -- CMD [ARGS...]")
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="kvmm: %(message)s", stream=sys.stderr)
    try:
        from .config import ShareConfig
        from .run import run_command

        result = run_command(command, kernel=args.kernel, root=args.root, rw=args.rw,
                             shares=[ShareConfig.parse(spec) for spec in args.share], mem=args.mem, cpus=args.cpus,
                             timeout=args.timeout, capture=False, stdin=os.isatty(0),
                             console_path=args.console_log)
    except KvmmError as exc:
        print(f"kvmm: error: {exc}", file=sys.stderr)
        return exc.exit_status
    if args.stats:
        print("kvmm: exits: " + ", ".join(f"{k}={v}" for k, v in sorted(result.counters.items())), file=sys.stderr)
    if result.status is None:
        tail = "" if result.vm.outcome.value == "init-reached" else f"; the kernel's last lines:\n{result.console}"
        print(f"kvmm: error: {result.message}{tail}", file=sys.stderr)
    else:
        LOG.info("%s", result.message)
    return result.exit_status


def _open_closed_std_fds() -> set[int]:
    """Put /dev/null on any of descriptors 0-2 kvmm was started without (``kvmm >&-``), so
    that no file kvmm opens later (/dev/kvm, a disk) becomes its "stdout" and receives
    console output or error lines. Returns the descriptors that were closed."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    for fd in sorted(closed):
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:  # the lowest free descriptor: fd itself, unless a lower one was also closed
            os.dup2(null, fd)
            os.close(null)
    if 1 in closed and sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if 2 in closed and sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)
    return closed


def _early_dump_request(signum: int, frame: Any) -> None:
    """SIGUSR2 before the VM runs: nothing to dump yet (its default action would end kvmm)."""
    os.write(2, b"kvmm: SIGUSR2: no VM is running yet, nothing to dump\n")


def main(argv: list[str] | None = None) -> int:
    """The ``kvmm`` command and its sub-commands; returns the exit status. A SIGINT
    before the VM's own handlers are in place (while kvmm reads a file, decompresses a
    kernel, maps memory) ends it with one line and status 130, not a traceback."""
    closed = _open_closed_std_fds()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR2, _early_dump_request)
    try:
        return _main(sys.argv[1:] if argv is None else argv, stdout_closed=1 in closed)
    except KeyboardInterrupt:
        print("kvmm: error: interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # stdout or stderr is a pipe nobody reads any more
        return EXIT_VMM_ERROR


def _main(argv: list[str], stdout_closed: bool) -> int:
    if argv and argv[0] == "ctl":
        return ctl_main(argv[1:])
    if argv and argv[0] == "host":
        from .hostcheck import main as host_main

        return host_main(argv[1:])
    if argv and argv[0] == "run":
        return run_main(argv[1:])
    smoke = bool(argv) and argv[0] == "smoke"
    parser = build_parser("kvmm smoke" if smoke else "kvmm", smoke)
    args = parser.parse_args(argv[1:] if smoke else argv)
    restore = getattr(args, "restore", None)
    if restore:
        # "is not None": an empty value (--mem=) is given too.
        given = [opt for opt, value in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--net", args.net or None),
                 ("--cmdline", args.cmdline), ("--mem", args.mem), ("--cpus", args.cpus), ("--share", args.share or None),
                 ("--module", args.module or None), ("--debug-exit", args.debug_exit),
                 ("--pc-testdev", args.pc_testdev or None), ("--cpu-features", args.cpu_features),
                 ("--no-acpi", (not args.acpi) or None)) if value is not None]
        if given:
            parser.error(f"--restore takes the VM's configuration from the snapshot: drop {', '.join(given)}")
        if any("," in spec for spec in args.disk):
            parser.error("with --restore, --disk takes a path only (a copy of the snapshot's disk, in order)")
    elif not args.kernel:
        parser.error("the following arguments are required: --kernel (or --restore DIR)")
    if stdout_closed and args.console[1] is None:
        parser.error("stdout is closed and the console writes there: give --console file:PATH "
                     "(file:/dev/null to discard it)")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="kvmm: %(message)s", stream=sys.stderr)
    try:
        if restore:
            import kvmm.snapshot  # noqa: F401 (loaded before the clock of "restored in" starts)

            from .vm import Machine

            machine = Machine.restore(restore, console_path=args.console[1], stdin=True, verify_memory=args.verify_memory,
                                      api_socket=args.api_sock, disks=args.disk or None)
        else:
            from .memory import parse_size
            from .x86 import prepare_vm

            mem_size = parse_size("512M" if args.mem is None else args.mem)  # --mem= is an error, not the default
            prepared = prepare_vm(mem_size, args.hugepages, args.exitless)  # the VM first, then the rest of kvmm
            try:
                from .vm import Machine

                config = _config(args, smoke, mem_size)
            except BaseException:
                prepared.close()
                raise
            machine = Machine(config, prepared=prepared)
        from .config import Outcome, VmResult
        with machine:
            if smoke:
                expected: re.Pattern[bytes] = args.expect
                shown = os.fsdecode(expected.pattern)

                def watch(line: bytes) -> None:
                    if expected.search(line):
                        machine.stop(VmResult(Outcome.EXPECTED, f"the console showed /{shown}/"))

                machine.console.listeners.insert(0, watch)  # type: ignore[union-attr]
            result = machine.run(timeout=args.timeout)
            exits = machine.exit_report()
    except KvmmError as exc:
        print(f"kvmm: error: {exc}", file=sys.stderr)
        return exc.exit_status
    status = result.exit_status
    if smoke and result.outcome in (Outcome.POWEROFF, Outcome.RESET, Outcome.INIT_REACHED, Outcome.DEBUG_EXIT):
        print(f"kvmm: error: the guest ended without showing /{os.fsdecode(args.expect.pattern)}/: {result.message}",
              file=sys.stderr)
        return EXIT_SMOKE_ENDED
    if result.outcome in (Outcome.VCPU_ERROR, Outcome.VMM_ERROR, Outcome.PANIC, Outcome.TIMEOUT):
        print(f"\nkvmm: error: {result.message}", file=sys.stderr)
    else:
        LOG.info("%s (exit status %d)", result.message, status)
    if args.stats:
        print("kvmm: exits: " + ", ".join(f"{k}={v}" for k, v in sorted(exits.items())), file=sys.stderr)
    return status


def _config(args: argparse.Namespace, smoke: bool, mem_size: int) -> VmConfig:
    from .config import DebugExitConfig, DiskConfig, NetConfig, ShareConfig, VmConfig, _cpu_features

    return VmConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline or "",
        mem_size=mem_size,
        cpus=1 if args.cpus is None else args.cpus,
        hugepages=args.hugepages,
        console_device=args.console[0],
        console_path=args.console[1],
        rng=args.rng,
        stop_at_init=args.stop_at_init if not smoke or args.stop_at_init is not None else False,
        disks=[DiskConfig.parse(spec) for spec in args.disk],
        nets=[NetConfig.parse(spec) for spec in args.net],
        shares=[ShareConfig.parse(spec) for spec in args.share],
        exitless=args.exitless,
        msix=args.msix,
        api_socket=args.api_sock,
        kernel_format=args.kernel_format,
        modules=args.module,
        debug_exit=DebugExitConfig.parse(args.debug_exit) if args.debug_exit else None,
        pc_testdev=args.pc_testdev,
        cpu_features=_cpu_features(args.cpu_features or ""),
        acpi=args.acpi,
    )


def run() -> NoReturn:
    """The ``kvmm`` command: :func:`main`, then a fast exit. By the time ``main`` returns,
    the machine is closed (disks fsync'd and closed, console flushed, threads ended), so
    the interpreter's own teardown (freeing every module, 5-10 ms of the start-up
    benchmark, docs/performance.md) has nothing left to save: flush the standard streams
    and the log handlers, then ``os._exit``. An exception still takes the normal path."""
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
