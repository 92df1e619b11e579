"""pytest plugin: VMs as fixtures (registered through the ``pytest11`` entry point).

- ``kvmm_run``: ``kvmm_run(["sh", "-c", "..."])`` runs a command in a VM booted on the
  host's own files (``kvmm run``) and returns its :class:`kvmm.run.RunResult`.
- ``kvmm_machine``: a factory; ``kvmm_machine(kernel=..., disks=[...], ...)`` takes the
  command line's options as keywords, launches the VM in the background and returns the
  :class:`kvmm.Machine`. Every VM is stopped and closed when the test ends; its console
  log is kept in the test's tmp_path and attached to the report of a failing test.
  ``kvmm_machine(restore=DIR, disks=[copy])`` continues a snapshot instead of booting.
- ``kvmm_snapshot`` (session) and ``kvmm_restored``: a fresh, already booted VM per test.
  ``kvmm_snapshot(ready, name=..., **options)`` boots a VM once per session with the
  command line's options as keywords, calls ``ready(machine)`` (return when the guest is
  where each test should start: a console line, a port 0x80 marker), snapshots it and
  returns a :class:`SessionSnapshot`; ``kvmm_restored(snap)`` gives the test a launched
  VM restored from it (a :class:`kvmm.pool.RestorePool` keeps VMs prepared ahead), with
  its own copies of the snapshot's disks in the test's tmp_path. Restoring costs a few
  milliseconds (docs/performance.md, "A fresh VM per test").
- ``--kvmm-kernel`` / ``--kvmm-disk`` give defaults for ``kernel`` and ``disks``.
- ``@pytest.mark.kvm``: the test needs /dev/kvm and is skipped, with the reason, where it
  is missing or not accessible.
Nothing is shared between tests, so it works under pytest-xdist (each test its own VMs,
logs under its own tmp_path, no fixed ports or paths).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .vm import Machine, config_from_options


def kvm_unavailable_reason(device: str = "/dev/kvm") -> str | None:
    if not os.path.exists(device):
        return f"{device} does not exist on this host"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is not accessible to this user"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmm", "kvmm virtual machines")
    group.addoption("--kvmm-kernel", default=None, help="default guest kernel for kvmm_machine")
    group.addoption("--kvmm-disk", action="append", default=[], help="default disk(s) for kvmm_machine (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs /dev/kvm (skipped with the reason where it is absent)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"needs KVM: {reason}"))


@pytest.fixture
def kvmm_machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    machines: list[tuple[Machine, Path]] = []
    opts = request.config.option

    def make(launch: bool = True, timeout: float | None = None, restore: str | os.PathLike[str] | None = None,
             **options: Any) -> Machine:
        log = tmp_path / f"console-{len(machines)}.log"
        if restore is not None:  # continue a snapshot: Machine.restore's keywords only
            options.setdefault("console_path", str(log))
            return _started(machines, Machine.restore(restore, **options), Path(options["console_path"]), launch, timeout)
        if "kernel" not in options:
            if not opts.kvmm_kernel:
                raise pytest.UsageError("kvmm_machine needs kernel=... or --kvmm-kernel")
            options["kernel"] = opts.kvmm_kernel
        if "disks" not in options and opts.kvmm_disk:
            options["disks"] = list(opts.kvmm_disk)
        options.setdefault("console_file", str(log))
        return _started(machines, Machine(config_from_options(**options)), Path(options["console_file"]), launch, timeout)

    yield from _closing_at_the_end(request, machines, make)


def _started(machines: list[tuple[Machine, Path]], m: Machine, log: Path, launch: bool,
             timeout: float | None) -> Machine:
    machines.append((m, log))
    if launch:
        m.launch(timeout)
    return m


def _closing_at_the_end(request: pytest.FixtureRequest, machines: list[tuple[Machine, Path]],
                        make: Callable[..., Machine]) -> Iterator[Callable[..., Machine]]:
    request.node._kvmm_machines = machines  # for the report hook below
    yield make
    for m, _ in machines:
        m.close()


class SessionSnapshot:
    """A VM booted once for the session and snapshotted where ``ready`` returned."""

    def __init__(self, path: Path, disks: list[str], ready_vms: int) -> None:
        self.path = path
        self.disks = disks  # the snapshot's own disks: each test restores copies of them
        self._ready_vms = ready_vms
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        if self._pool is None:
            from .pool import RestorePool

            self._pool = RestorePool(self.path, ready=self._ready_vms)
        return self._pool

    def restore(self, workdir: Path, **options: Any) -> Machine:
        """A machine continuing the snapshot, its disks copied into ``workdir`` (copy2
        keeps the modification time a restore checks)."""
        copies = []
        for i, disk in enumerate(self.disks):
            copy = workdir / f"disk{i}-{Path(disk).name}"
            shutil.copy2(disk, copy)
            copies.append(str(copy))
        return self.pool.restore(disks=copies, **options)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


@pytest.fixture(scope="session")
def kvmm_snapshot(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SessionSnapshot]]:
    """``kvmm_snapshot(ready, name="booted", ready_vms=2, **options)``: boot once (the
    options as kvmm_machine's), ``ready(machine)`` on the launched VM, snapshot it; the
    same name returns the same snapshot for the rest of the session."""
    made: dict[str, SessionSnapshot] = {}
    opts = request.config.option

    def make(ready: Callable[[Machine], Any], name: str = "booted", ready_vms: int = 2,
             timeout: float | None = None, **options: Any) -> SessionSnapshot:
        if name in made:
            return made[name]
        workdir = tmp_path_factory.mktemp(f"kvmm-snapshot-{name}")
        if "kernel" not in options:
            if not opts.kvmm_kernel:
                raise pytest.UsageError("kvmm_snapshot needs kernel=... or --kvmm-kernel")
            options["kernel"] = opts.kvmm_kernel
        disks = []  # the snapshot gets disks of its own: the user's images stay as they are
        for i, spec in enumerate(options.get("disks", opts.kvmm_disk) or []):
            path, _, flags = str(spec).partition(",")
            copy = workdir / f"disk{i}-{Path(path).name}"
            shutil.copy2(path, copy)
            disks.append(str(copy) + ("," + flags if flags else ""))
        options["disks"] = disks
        options.setdefault("console_file", str(workdir / "console.log"))
        with Machine(config_from_options(**options)) as m:
            m.launch(timeout)
            ready(m)
            m.snapshot(workdir / "snapshot")
        snap = SessionSnapshot(workdir / "snapshot", [d.partition(",")[0] for d in disks], ready_vms)
        made[name] = snap
        return snap

    yield make
    for snap in made.values():
        snap.close()


@pytest.fixture
def kvmm_restored(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """``kvmm_restored(snap, launch=True, timeout=None, **restore_options)``: a machine
    continuing ``snap`` (from kvmm_snapshot), launched unless ``launch=False``; closed
    when the test ends, its console log kept and attached to a failing test's report."""
    machines: list[tuple[Machine, Path]] = []

    def make(snap: SessionSnapshot, launch: bool = True, timeout: float | None = None, **options: Any) -> Machine:
        log = tmp_path / f"console-{len(machines)}.log"
        options.setdefault("console_path", str(log))
        return _started(machines, snap.restore(tmp_path, **options), Path(options["console_path"]), launch, timeout)

    yield from _closing_at_the_end(request, machines, make)


@pytest.fixture
def kvmm_run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """``kvmm_run(["make", "test"], rw=["."], timeout=600)``: the command run in a VM
    booted on the host's own files (``kvmm run``); a :class:`kvmm.run.RunResult` with
    ``.status``, ``.stdout``, ``.stderr``. The kernel: ``kernel=`` or --kvmm-kernel
    (else kvmm run's default). The kernel's console log is kept in the test's tmp_path
    and attached to the report of a failing test."""
    from .run import run_command

    logs: list[Path] = []

    def run(command: list[str], **options: Any) -> Any:
        if "kernel" not in options and request.config.option.kvmm_kernel:
            options["kernel"] = request.config.option.kvmm_kernel
        log = tmp_path / f"run-console-{len(logs)}.log"
        options.setdefault("console_path", str(log))
        logs.append(Path(options["console_path"]))
        return run_command(command, **options)

    request.node._kvmm_run_logs = logs
    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:  # type: ignore[type-arg]
    """Attach every VM's console log to the report of a failing test."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for i, (m, log) in enumerate(getattr(item, "_kvmm_machines", [])):
            if m.console is not None:
                m.console.flush()
            if log.exists():
                report.sections.append((f"kvmm console {i} ({log})", log.read_text(errors="replace")[-20000:]))
        for i, log in enumerate(getattr(item, "_kvmm_run_logs", [])):
            if log.exists():
                report.sections.append((f"kvmm run console {i} ({log})", log.read_text(errors="replace")[-20000:]))
