"""``kvmm run -- CMD ARGS...``: a command in a VM whose root file system is the host's
own files, its output on kvmm's stdout and stderr, its exit status kvmm's.

The guest boots with the host's ``/`` (or ``--root DIR``) as a read-only virtio-9p root
(``root=kvmm-root rootfstype=9p``); ``init`` is the shim shipped in the kvmm package
(kvmm/run_init.sh), which the kernel finds through the 9p root at its host path (with a
``--root`` that does not hold it, a one-line ``/bin/sh -c`` bootstrap mounts the run
directory and runs a copy from there). A run directory on the host, shared read-write
(tag ``kvmm-run``, mounted at ``/run/kvmm``), carries the command in: ``setup.sh`` (a
tmpfs over /tmp, /var/tmp and /var/log; the ``--rw`` and ``--share`` directories at
their host paths; the current directory where a tmpfs would hide it; the consoles'
terminal modes) and ``command.sh`` (environment, ``cd``, ``exec`` of the command), both
written with shell quoting; and the exit status out (``status``, written by the shim,
which then reboots through sysrq; kvmm then exits with that status).

The command's stdout and stderr are two virtio-console devices (hvc0 and hvc1) whose
output kvmm writes to its own stdout and stderr; when kvmm's stdin is a terminal, hvc0
takes it too (and becomes the command's controlling terminal); otherwise the command's
stdin is /dev/null. The kernel's console (ttyS0) goes to a log file, shown when the run
fails. :func:`plan` is the pure part (what to share, what to write, the command line);
:func:`run_command` runs it (``Machine.run_command`` and the ``kvmm_run`` fixture too).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

from .config import Outcome, PortConfig, ShareConfig, VmConfig, VmResult
from .defaults import EXIT_PANIC, EXIT_RUN_NOT_RUN, EXIT_TIMEOUT, EXIT_VCPU_ERROR, EXIT_VMM_ERROR
from .errors import ConfigError, KernelImageError, ShareError
from .host import HostKind
from .watch import init_reached

LOG = logging.getLogger(__name__)

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_init.sh")
ROOT_TAG = "kvmm-root"
RUN_TAG = "kvmm-run"
RUN_MOUNT = "/run/kvmm"
MSIZE = 262144  # what the guest asks for (Linux's virtio transport takes up to 500 KiB)
TMPFS_DIRS = ("/tmp", "/var/tmp", "/var/log")  # written by most programs; /run is the shim's
ENVIRONMENT = ("PATH", "HOME", "TERM", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_COLLATE",
               "USER", "LOGNAME", "SHELL", "TZ")  # passed from kvmm's environment to the command
MOUNT_9P = f"trans=virtio,version=9p2000.L,msize={MSIZE}"


class Mount(NamedTuple):
    """A 9p share the shim mounts in the guest at ``where``."""

    share: ShareConfig
    where: str


class RunPlan(NamedTuple):
    """What a run shares and writes: everything but the VM itself."""

    shares: list[ShareConfig]  # root first, then the run directory, then the mounts'
    mounts: list[Mount]
    tmpfs: list[str]
    cmdline: str
    init: str  # the path the kernel runs (the shim, or /bin/sh for the bootstrap)
    bootstrap: bool  # the shim is copied into the run directory and run from there
    setup_sh: str
    command_sh: str


class RunResult(NamedTuple):
    """How a run ended: the command's exit status (None if it did not run to its end),
    how the VM ended, what the command wrote (when captured), the kernel's last console
    lines, the time from start to the kernel's exec of init, and the device counters."""

    status: int | None
    vm: VmResult
    stdout: bytes | None
    stderr: bytes | None
    console: str
    init_seconds: float | None
    counters: dict[str, int]

    @property
    def exit_status(self) -> int:
        """What ``kvmm run`` exits with: the command's status, else kvmm's (README)."""
        if self.status is not None:
            return self.status
        outcome = self.vm.outcome
        if outcome is Outcome.PANIC:
            return EXIT_PANIC
        if outcome is Outcome.TIMEOUT:
            return EXIT_TIMEOUT
        if outcome is Outcome.VCPU_ERROR:
            return EXIT_VCPU_ERROR
        if outcome is Outcome.VMM_ERROR:
            return EXIT_VMM_ERROR
        if outcome is Outcome.INTERRUPTED:
            return self.vm.exit_status
        return EXIT_RUN_NOT_RUN

    @property
    def message(self) -> str:
        if self.status is not None:
            return f"the command exited with status {self.status}"
        if self.vm.outcome is Outcome.INIT_REACHED:
            return f"the command did not run: {self.vm.message}"
        if self.vm.outcome in (Outcome.RESET, Outcome.POWEROFF):
            return f"the guest ended without reporting the command's exit status ({self.vm.message})"
        return self.vm.message


def default_kernel() -> str:
    """The kernel ``kvmm run`` boots without ``--kernel``: ``$KVMM_KERNEL``, else the
    project kernel from the cache (kernels/build.sh --print-dir, in a source checkout)."""
    env = os.environ.get("KVMM_KERNEL")
    if env:
        return env
    build = Path(__file__).resolve().parents[1] / "kernels" / "build.sh"
    if build.is_file():
        res = subprocess.run([str(build), "--print-dir"], capture_output=True, text=True)
        lines = res.stdout.strip().splitlines()
        if res.returncode == 0 and lines and (Path(lines[-1]) / "vmlinux").is_file():
            return str(Path(lines[-1]) / "vmlinux")
    raise KernelImageError("no kernel: give --kernel (a kernel with 9p and virtio, e.g. the project kernel), set "
                           "KVMM_KERNEL, or build the project kernel with kernels/build.sh")


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _real_dir(path: str, what: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ShareError(f"{what} {path!r} {'does not exist' if not os.path.exists(real) else 'is not a directory'}")
    return real


def plan(command: Sequence[str], run_dir: str, *, root: str = "/", rw: Sequence[str] = (),
         shares: Sequence[ShareConfig] = (), cwd: str | None = None, env: dict[str, str] | None = None,
         stdin_tty: bool = False, stdout_tty: bool = False, stderr_tty: bool = False) -> RunPlan:
    """The shares, mounts, files and kernel command line of a run of ``command``, with
    the run directory ``run_dir`` (shared read-write). Touches nothing."""
    if not command:
        raise ConfigError("kvmm run needs a command: kvmm run [OPTIONS] -- CMD [ARGS...]")
    root = _real_dir(root, "--root")
    mounts: list[Mount] = []
    for i, d in enumerate(rw):
        path = _real_dir(d, "--rw")
        mounts.append(Mount(ShareConfig(path, f"kvmm-rw{i}", read_only=False), path))
    for share in shares:
        if share.tag.startswith("kvmm-"):
            raise ConfigError(f"share tag {share.tag!r}: tags starting with kvmm- are kvmm run's own")
        path = _real_dir(share.path, "--share")
        mounts.append(Mount(share._replace(path=path), path))
    cwd = os.path.realpath(cwd or os.getcwd())
    if root == "/":
        guest_cwd = cwd
        hidden = any(_within(cwd, t) for t in TMPFS_DIRS)
        if hidden and not any(_within(cwd, m.where) for m in mounts):
            mounts.append(Mount(ShareConfig(cwd, "kvmm-cwd", read_only=True), cwd))
    else:
        guest_cwd = "/" + os.path.relpath(cwd, root) if _within(cwd, root) else "/"
        if guest_cwd == "/.":
            guest_cwd = "/"
    mounts.sort(key=lambda m: m.where.count("/"))  # a parent before what is mounted inside it
    tmpfs = [t for t in TMPFS_DIRS if os.path.isdir(os.path.join(root, t.lstrip("/")))]

    setup = ["# written by kvmm run (kvmm/run.py); sourced by kvmm/run_init.sh"]
    for t in tmpfs:
        setup.append(f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {shlex.quote(t)}")
    for m in mounts:
        where = shlex.quote(m.where)
        opts = MOUNT_9P + ",cache=mmap" + (",ro" if m.share.read_only else "")
        setup.append(f"mkdir -p {where} 2>/dev/null; mount -t 9p -o {opts} {m.share.tag} {where} || "
                     f"echo 'kvmm run: cannot mount {m.share.tag} on '{where} >&2")
    for tty, dev in ((stdout_tty, "/dev/hvc0"), (stderr_tty, "/dev/hvc1")):
        if not tty:  # bytes as the command wrote them (no CR added before LF)
            setup.append(f"command -v stty >/dev/null && stty -opost <{dev}")
    if stdin_tty:
        setup.append("KVMM_STDIN=/dev/hvc0")

    environment = {k: v for k, v in (os.environ if env is None else env).items() if k in ENVIRONMENT}
    body = ["# written by kvmm run (kvmm/run.py); run by kvmm/run_init.sh"]
    body += [f"export {k}={shlex.quote(v)}" for k, v in sorted(environment.items())]
    body.append(f"cd {shlex.quote(guest_cwd)} || exit 125")
    body.append("exec " + " ".join(shlex.quote(word) for word in command))

    # init: the shim at its path in the root; /bin/sh running it where it lost its execute
    # bit; or, where the root does not hold it, /bin/sh mounting the run directory and
    # running a copy from there. (A requested init that fails makes the kernel panic: it
    # never falls back to the host's own /sbin/init.)
    shim_in_root = _within(SHIM, root) and all(32 < ord(c) < 127 for c in SHIM) and '"' not in SHIM
    shim_path = "/" + os.path.relpath(SHIM, root) if root != "/" else SHIM
    words = [f"root={ROOT_TAG}", "rootfstype=9p", f"rootflags={MOUNT_9P},cache=loose", "ro"]
    if shim_in_root and os.access(SHIM, os.X_OK):
        init = shim_path
        words.append(f"init={init}")
    elif shim_in_root:
        init = "/bin/sh"
        words += [f"init={init}", "--", f'"{shim_path}"']
    else:
        init = "/bin/sh"
        words += [f"init={init}", "--", "-c", f'"mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p {RUN_MOUNT} && '
                                              f'mount -t 9p -o {MOUNT_9P} {RUN_TAG} {RUN_MOUNT} && '
                                              f'exec /bin/sh {RUN_MOUNT}/init.sh"']
    shares_all = [ShareConfig(root, ROOT_TAG, read_only=True), ShareConfig(run_dir, RUN_TAG, read_only=False)]
    return RunPlan(shares_all + [m.share for m in mounts], mounts, tmpfs, " ".join(words), init, not shim_in_root,
                   "\n".join(setup) + "\n", "\n".join(body) + "\n")


def write_run_dir(p: RunPlan, run_dir: str) -> None:
    Path(run_dir, "setup.sh").write_text(p.setup_sh)
    Path(run_dir, "command.sh").write_text(p.command_sh)
    if p.bootstrap:
        shutil.copyfile(SHIM, os.path.join(run_dir, "init.sh"))


def run_command(command: Sequence[str], *, kernel: str | None = None, root: str = "/", rw: Sequence[str] = (),
                shares: Sequence[ShareConfig | str] = (), cwd: str | None = None, env: dict[str, str] | None = None,
                mem: int | str = "512M", cpus: int = 1, timeout: float | None = None, capture: bool = True,
                stdin: bool = False, console_path: str | None = None, stop_at_init: bool | None = None,
                host: HostKind | None = None, exitless: bool = True) -> RunResult:
    """Run ``command`` in a VM whose root is the host's files (see the module docstring).

    ``capture``: the command's stdout and stderr are returned in the result (else they
    go to kvmm's own stdout and stderr, as ``kvmm run`` does). ``stdin``: the command
    reads kvmm's stdin (a terminal), else /dev/null. ``console_path``: keep the
    kernel's console log there. The calling thread runs the VM (its I/O thread)."""
    from .memory import parse_size
    from .vm import Machine

    share_configs = [s if isinstance(s, ShareConfig) else ShareConfig.parse(s) for s in shares]
    work = tempfile.mkdtemp(prefix="kvmm-run-")
    try:
        run_dir = os.path.join(work, "share")
        os.mkdir(run_dir, 0o700)
        p = plan(command, run_dir, root=root, rw=rw, shares=share_configs, cwd=cwd, env=env, stdin_tty=stdin,
                 stdout_tty=not capture and os.isatty(1), stderr_tty=not capture and os.isatty(2))
        write_run_dir(p, run_dir)
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        ports = ([PortConfig(path=out_path, input=stdin), PortConfig(path=err_path)] if capture
                 else [PortConfig(fd=1, input=stdin), PortConfig(fd=2)])
        # Not stopped at the kernel's "Run ... as init" line by default: the exec of the shim
        # and of its interpreter (over 9p) happens after it, and is part of the run.
        stop_at_init = False if stop_at_init is None else stop_at_init
        config = VmConfig(kernel=kernel or default_kernel(), cmdline=p.cmdline,
                          mem_size=parse_size(mem) if isinstance(mem, str) else int(mem), cpus=cpus,
                          console_path=console_path or os.path.join(work, "console.log"), stdin=stdin,
                          stop_at_init=stop_at_init, shares=p.shares, ports=ports, host=host, exitless=exitless)
        LOG.info("kvmm run: %s (root %s, init %s)", shlex.join(command), p.shares[0].path, p.init)
        with Machine(config) as machine:
            vm_result = machine.run(timeout=timeout)
            counters = machine.exit_report()
            console = machine.console.tail(40)
            init_seconds = machine.stats.init_seconds
            watch, host_kind = machine.watch, machine.host
        status = _read_status(os.path.join(run_dir, "status"))
        if (status is None and not host_kind.userspace_works and watch.init is not None
                and vm_result.outcome in (Outcome.PANIC, Outcome.RESET)):
            # The kernel ran the shim (and its interpreter, over 9p) until the first system
            # call of user space killed init: the end a boot has on such a host.
            vm_result = init_reached(watch.init, host_kind.name)
        stdout = Path(out_path).read_bytes() if capture else None
        stderr = Path(err_path).read_bytes() if capture else None
        return RunResult(status, vm_result, stdout, stderr, console, init_seconds, counters)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _StatusFileError(Exception):
    pass


def _read_status(path: str) -> int | None:
    """The command's exit status as the guest's shim wrote it to the run directory. The
    guest can write anything there (it is shared read-write): a symlink to /dev/zero or
    to a FIFO elsewhere on the host is not followed, and at most 32 bytes are read."""
    from .files import read_file

    try:
        text = read_file(path, "status file", 32, _StatusFileError, nofollow=True).decode("ascii", "replace").strip()
    except _StatusFileError:
        return None
    return int(text) & 0xFF if text.isdigit() else None
