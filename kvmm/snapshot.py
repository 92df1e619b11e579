"""Snapshots: a paused VM written to a directory, and read back as untrusted input.

A snapshot directory holds three files (docs/snapshots.md):

``manifest.json``
    format name and version, the kvmm version, the machine's configuration (disks by
    path with their size and modification time), the size and SHA-256 of the other two
    files, and an HMAC-SHA256 over the manifest under this user's snapshot key
    (kvmm/snapkey.py): the manifest names host files, so only one this user's kvmm wrote
    is believed.
``state.json``
    every vCPU's KVM state, the in-kernel irqchip, PIT and kvmclock, and every device's
    state dataclass (:class:`MachineState`, through :mod:`kvmm.state`).
``memory.bin``
    guest RAM, sparse: never-touched (all-zero) 64 KiB chunks are holes. A restore maps it
    privately (copy-on-write), so it reads nothing up front.

Restore checks the manifest's format, its authentication code and kvmm version, both
files' sizes, the state's checksum and the disks' size and modification time before it
creates anything;
the memory checksum only on request (it reads all of RAM). Values inside the state are
then checked by each device as the matching guest write would be.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import DiskConfig, NetConfig, VmConfig
from .defaults import CONSOLE_DEVICES, MAX_CPUS
from .devices.acpi_pm import AcpiPm, AcpiPmState
from .devices.cmos import Cmos, CmosState
from .devices.pci import PciBus, PciBusState
from .devices.serial import Serial8250, SerialState
from .errors import KvmError, SnapshotError
from .files import open_input, read_file
from .kvm.system import Vcpu, Vm
from .memory import sparse_digest
from .snapkey import key_path, load_key, sign, verify
from .state import check_length, from_json, prepare, to_json
from .virtio.pci_legacy import VirtioPciLegacy, VirtioTransportState

LOG = logging.getLogger(__name__)

FORMAT = "kvmm-snapshot"
FORMAT_VERSION = 2  # 2: the manifest is authenticated (HMAC, kvmm/snapkey.py), not checksummed
MANIFEST = "manifest.json"
STATE = "state.json"
MEMORY = "memory.bin"
MAX_MANIFEST_BYTES = 1 << 20
MAX_STATE_BYTES = 64 << 20
MAX_SNAPSHOT_RAM = 1 << 40  # beyond any guest kvmm makes; a bigger number is damage  # 16 vCPUs of state is well under 1 MiB; anything near this is not ours

# In-kernel irqchip ids (api.rst, KVM_GET_IRQCHIP).
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2


# --- the state ---------------------------------------------------------------------------
@dataclass
class VcpuState:
    """One vCPU's KVM state as the raw ioctl structures (their size is checked on load)."""

    id: int
    mp_state: bytes
    regs: bytes
    sregs: bytes
    xsave: bytes | None  # with KVM_CAP_XSAVE; else fpu
    fpu: bytes | None
    xcrs: bytes | None
    lapic: bytes
    msrs: list[list[int]]  # [index, value] for each MSR of KVM_GET_MSR_INDEX_LIST KVM could read
    events: bytes


@dataclass
class VmState:
    """The VM-wide KVM state: both PICs, the IOAPIC, the PIT and the clock, as KVM's own blobs."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: bytes


@dataclass
class MachineState:
    """state.json: the VM, each vCPU and each device, in build order."""

    vm: VmState
    vcpus: list[VcpuState]
    serial: SerialState
    cmos: CmosState
    pci: PciBusState
    virtio: list[VirtioTransportState]
    acpi_pm: AcpiPmState | None  # None: a machine without ACPI (--no-acpi)


@dataclass
class SavedDisk:
    """A disk as the snapshot saw it; a restore refuses one whose size or mtime changed since."""

    path: str
    read_only: bool
    serial: str | None
    size: int
    mtime_ns: int


@dataclass
class SavedNet:
    """A NIC's tap and MAC (the guest's driver has the MAC; the tap must exist again)."""

    tap: str
    mac: bytes


@dataclass
class SavedConfig:
    """What the restored machine must be built as (the snapshot's devices, in order)."""

    kernel: str
    cmdline: str
    mem_size: int
    cpus: int
    disks: list[SavedDisk]
    nets: list[SavedNet]
    exitless: bool
    msix: bool
    console_device: str
    rng: bool
    acpi: bool  # the machine has ACPI (VmConfig.has_acpi): its PM device is rebuilt


def saved_config(cfg: VmConfig, cmdline: str) -> SavedConfig:
    """What a snapshot records of a machine built from ``cfg`` (its kernel booted with
    ``cmdline``): the one conversion from a :class:`VmConfig`."""
    return SavedConfig(
        kernel=os.path.abspath(cfg.kernel), cmdline=cmdline, mem_size=cfg.mem_size, cpus=cfg.cpus,
        disks=[disk_identity(d.path, d.read_only, d.serial) for d in cfg.disks],
        nets=[SavedNet(n.tap, n.effective_mac) for n in cfg.nets], exitless=cfg.exitless, msix=cfg.msix,
        console_device=cfg.console_device, rng=cfg.rng, acpi=cfg.has_acpi,
    )


def config_from_saved(saved: SavedConfig, **run_time: Any) -> VmConfig:
    """The :class:`VmConfig` a restore builds from, ``run_time`` choices (console file,
    stdin, host, control socket) added: the one conversion back."""
    return VmConfig(
        kernel=saved.kernel, cmdline=saved.cmdline, mem_size=saved.mem_size, cpus=saved.cpus, stop_at_init=False,
        disks=[DiskConfig(d.path, d.read_only, d.serial) for d in saved.disks],
        nets=[NetConfig(n.tap, n.mac) for n in saved.nets], exitless=saved.exitless, msix=saved.msix,
        console_device=saved.console_device, rng=saved.rng, acpi=saved.acpi, **run_time,
    )


@dataclass
class FileEntry:
    """The size and SHA-256 the manifest records for one of the snapshot's files."""

    size: int
    sha256: str


@dataclass
class Manifest:
    """manifest.json: format, versions, the machine's configuration and the other files' digests."""

    format: str
    version: int
    kvmm_version: str
    created: str
    host: str
    config: SavedConfig
    state: FileEntry
    memory: FileEntry
    hmac: str  # HMAC-SHA256 (this user's snapshot key) of the manifest's canonical JSON with this field empty


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def manifest_hmac(manifest_json: dict[str, Any], key: bytes) -> str:
    """The authentication code of a manifest (as JSON data) under ``key``."""
    return sign(key, _canonical({**manifest_json, "hmac": ""}))


def sign_manifest(manifest_json: dict[str, Any]) -> dict[str, Any]:
    """``manifest_json`` with its ``hmac`` made under this user's key (created if need
    be): how kvmm itself seals a manifest it writes."""
    return {**manifest_json, "hmac": manifest_hmac(manifest_json, load_key(create=True))}


# --- vCPU and VM state through KVM -------------------------------------------------------
class VcpuStateIo:
    """Reads and writes vCPU state with what this host's KVM offers (XSAVE or FPU, XCRs,
    the readable MSRs of its index list, probed once)."""

    def __init__(self, msr_indices: list[int], has_xsave: bool, has_xcrs: bool) -> None:
        self.msr_indices = msr_indices
        self.has_xsave = has_xsave
        self.has_xcrs = has_xcrs
        self._readable: list[int] | None = None

    def _readable_msrs(self, vcpu: Vcpu) -> list[int]:
        if self._readable is None:
            got = vcpu.get_msrs(self.msr_indices)
            if len(got) == len(self.msr_indices):
                self._readable = list(self.msr_indices)
            else:  # KVM stops at the first MSR it cannot read: probe one by one, once
                self._readable = [i for i in self.msr_indices if vcpu.get_msrs([i])]
                LOG.debug("snapshot: %d of %d listed MSRs are readable", len(self._readable), len(self.msr_indices))
        return self._readable

    def save(self, vcpu: Vcpu) -> VcpuState:
        msrs = vcpu.get_msrs(self._readable_msrs(vcpu))
        return VcpuState(
            id=vcpu.id,
            mp_state=vcpu.get_state("mp_state"),
            regs=vcpu.get_state("regs"),
            sregs=vcpu.get_state("sregs"),
            xsave=vcpu.get_state("xsave") if self.has_xsave else None,
            fpu=None if self.has_xsave else vcpu.get_state("fpu"),
            xcrs=vcpu.get_state("xcrs") if self.has_xcrs else None,
            lapic=vcpu.get_state("lapic"),
            msrs=[[index, value] for index, value in msrs.items()],
            events=vcpu.get_state("events"),
        )

    def restore(self, vcpu: Vcpu, st: VcpuState, where: str) -> None:
        """Set ``st`` on ``vcpu`` (CPUID already set) in the order KVM needs: MP state, then
        registers, FPU, LAPIC, MSRs and last the pending events (as Firecracker does)."""
        if st.id != vcpu.id:
            raise SnapshotError(f"{where}: state of vCPU {st.id} given to vCPU {vcpu.id}")
        if (st.xsave is None) == (st.fpu is None):
            raise SnapshotError(f"{where}: exactly one of xsave and fpu must be saved")
        if st.xsave is not None and not self.has_xsave:
            raise SnapshotError(f"{where}: the snapshot has XSAVE state and this host's KVM lacks KVM_CAP_XSAVE")
        if st.xcrs is not None and not self.has_xcrs:
            raise SnapshotError(f"{where}: the snapshot has XCRs and this host's KVM lacks KVM_CAP_XCRS")
        msrs: dict[int, int] = {}
        for pair in st.msrs:
            if len(pair) != 2 or not 0 <= pair[0] <= 0xFFFF_FFFF or not 0 <= pair[1] <= 0xFFFF_FFFF_FFFF_FFFF:
                raise SnapshotError(f"{where}.msrs: {pair!r:.60} is not an [index, value] pair of 32 and 64 bits")
            msrs[pair[0]] = pair[1]
        steps: list[tuple[str, bytes | None]] = [
            ("mp_state", st.mp_state), ("regs", st.regs), ("sregs", st.sregs), ("xsave", st.xsave),
            ("fpu", st.fpu), ("xcrs", st.xcrs), ("lapic", st.lapic),
        ]
        for kind, blob in steps:
            if blob is not None:
                _kvm_set(where, kind, lambda: vcpu.set_state(kind, blob))
        refused = vcpu.set_msrs_each(msrs)
        if refused:  # a feature this host lacks, or a corrupt value: the rest are set
            LOG.warning("%s: KVM refused %d saved MSR(s): %s", where, len(refused), ", ".join(f"{i:#x}" for i in refused[:8]))
        _kvm_set(where, "events", lambda: vcpu.set_state("events", st.events))


def _kvm_set(where: str, kind: str, action: Any) -> None:
    try:
        action()
    except KvmError as exc:
        raise SnapshotError(f"{where}: KVM refused the saved {kind}: {exc}") from None


def save_vm(vm: Vm) -> VmState:
    return VmState(vm.get_irqchip(PIC_MASTER), vm.get_irqchip(PIC_SLAVE), vm.get_irqchip(IOAPIC), vm.get_pit2(), vm.get_clock())


def restore_vm(vm: Vm, st: VmState) -> None:
    """Irqchip, PIT and clock; each blob's chip id must be the one its field names."""
    for chip_id, name in ((PIC_MASTER, "pic_master"), (PIC_SLAVE, "pic_slave"), (IOAPIC, "ioapic")):
        blob = getattr(st, name)
        if len(blob) < 4 or int.from_bytes(blob[:4], "little") != chip_id:
            raise SnapshotError(f"vm.{name}: not the state of irqchip {chip_id}")
        _kvm_set("vm", name, lambda: vm.set_irqchip(blob))
    _kvm_set("vm", "pit", lambda: vm.set_pit2(st.pit))
    _kvm_set("vm", "clock", lambda: vm.set_clock(st.clock))


def load_devices(st: MachineState, serial: Serial8250, cmos: Cmos, pci: PciBus,
                 transports: list[VirtioPciLegacy], acpi_pm: AcpiPm | None = None) -> None:
    """The devices' part of a restore, in dependency order: PCI config space first (it
    places the BARs whose ports the transports' ioeventfds use), then the transports."""
    serial.load_state(st.serial)
    cmos.load_state(st.cmos)
    if (st.acpi_pm is None) != (acpi_pm is None):
        raise SnapshotError(f"state.acpi_pm: the snapshot's machine {'lacks' if st.acpi_pm is None else 'has'} "
                            "ACPI, its configuration says otherwise")
    if acpi_pm is not None and st.acpi_pm is not None:
        acpi_pm.load_state(st.acpi_pm)
    pci.load_state(st.pci)
    check_length("state.virtio", st.virtio, len(transports))
    for i, (transport, saved) in enumerate(zip(transports, st.virtio)):
        transport.load_state(saved, f"state.virtio[{i}]")


# --- files ---------------------------------------------------------------------------------
def disk_identity(path: str, read_only: bool, serial: str | None) -> SavedDisk:
    st = os.stat(path)
    return SavedDisk(os.path.abspath(path), read_only, serial, st.st_size, st.st_mtime_ns)


def write_snapshot(target: str | os.PathLike[str], config: SavedConfig, state: MachineState,
                   save_memory: Callable[[int], tuple[int, str]]) -> Manifest:
    """Write a snapshot directory at ``target`` (which must not exist): into a temporary
    directory beside it, fsync'd, then renamed, so a crash leaves no half snapshot. The
    temporary directory is locked while it is written; one whose writer died (SIGKILL,
    power loss) is removed by the next snapshot into the same directory."""
    target = check_target(target)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}{TMP_MARK}{os.getpid()}")
    lock_fd = -1
    try:
        if target.exists():
            raise SnapshotError(f"snapshot target {target} already exists")
        if not target.parent.is_dir():
            raise SnapshotError(f"snapshot target's directory {target.parent} does not exist")
        load_key(create=True)  # the key first: no half-written snapshot for want of it
        remove_stale_temporaries(target.parent)
        tmp.mkdir(mode=0o700)
        lock_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # held until the end: a live writer's directory is never stale
        state_bytes = _canonical(to_json(state))
        _write_file(tmp / STATE, state_bytes)
        fd = os.open(tmp / MEMORY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _written, memory_digest = save_memory(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        manifest = Manifest(
            FORMAT, FORMAT_VERSION, __version__, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            os.uname().nodename, config, FileEntry(len(state_bytes), hashlib.sha256(state_bytes).hexdigest()),
            FileEntry(config.mem_size, memory_digest), "",
        )
        data = sign_manifest(to_json(manifest))
        manifest = replace(manifest, hmac=data["hmac"])
        _write_file(tmp / MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot {target}: {exc.strerror or exc}") from None
    finally:
        try:
            if tmp.exists():
                _remove_temporary(tmp)
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
    return manifest


TMP_PREFIX, TMP_MARK = ".", ".tmp-"  # a snapshot being written: .NAME.tmp-PID beside NAME
_SNAPSHOT_FILES = frozenset((MANIFEST, STATE, MEMORY))


def check_target(target: str | os.PathLike[str]) -> Path:
    """The snapshot target as a Path, or SnapshotError for a name no file system takes
    (a NUL byte; a last component over NAME_MAX bytes, with room for the temporary
    name's prefix and suffix)."""
    try:
        raw = os.fsencode(target)
    except (TypeError, UnicodeError) as exc:
        raise SnapshotError(f"snapshot target {target!r:.80}: not a path ({exc})") from None
    if b"\0" in raw:
        raise SnapshotError(f"snapshot target {os.fsdecode(raw)!r:.200}: a path may not contain a NUL byte")
    path = Path(os.fsdecode(raw))
    if not path.name:
        raise SnapshotError(f"snapshot target {os.fsdecode(raw)!r:.200} names no directory")
    longest = 255 - len(TMP_PREFIX) - len(TMP_MARK) - 10  # NAME_MAX, less ".", ".tmp-" and a PID
    if len(os.fsencode(path.name)) > longest:
        raise SnapshotError(f"snapshot target name {path.name[:40]!r}... is {len(os.fsencode(path.name))} bytes: "
                            f"at most {longest} (file names are at most 255 bytes)")
    return path


def _remove_temporary(tmp: Path) -> None:
    """Remove a snapshot's temporary directory, which holds only the snapshot's files."""
    for f in tmp.iterdir():
        if f.name in _SNAPSHOT_FILES:
            f.unlink()
    tmp.rmdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove the temporary snapshot directories in ``parent`` whose writer is gone:
    named ``.NAME.tmp-PID`` with PID not a live process, not locked (a writer holds an
    exclusive flock on its directory until it ends, whatever its PID namespace), and
    holding nothing but snapshot files. A SIGKILLed snapshot leaves up to all of guest
    RAM there; anything else is left alone. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(TMP_PREFIX) or TMP_MARK not in name:
            continue
        pid_text = name.rsplit(TMP_MARK, 1)[1]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = Path(entry.path)
            if not {f.name for f in path.iterdir()} <= _SNAPSHOT_FILES:
                LOG.warning("snapshot: %s looks like a stale temporary snapshot but holds other files: left alone", path)
                continue
            _remove_temporary(path)
            removed.append(path)
            LOG.info("snapshot: removed %s, left by process %s which ended mid-snapshot", path, pid_text)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                LOG.warning("snapshot: cannot remove the stale temporary %s: %s", entry.path, exc.strerror)
        finally:
            os.close(fd)
    return removed


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    """A snapshot file: regular, opened without blocking, at most ``limit`` bytes."""
    return read_file(path, f"snapshot {what}", limit, SnapshotError)


@dataclass
class Snapshot:
    """A snapshot directory whose manifest and state passed every file-level check."""

    path: Path
    manifest: Manifest
    state: MachineState

    @property
    def memory_path(self) -> str:
        return str(self.path / MEMORY)


def read_snapshot(path: str | os.PathLike[str], verify_memory: bool = False,
                  disk_paths: list[str] | None = None, key: bytes | None = None) -> Snapshot:
    """Read and check a snapshot directory; raises SnapshotError naming the first problem.

    ``disk_paths`` replaces the snapshot's disk paths, in order (a copy of each disk made
    with its modification time preserved, so that several VMs restore one snapshot); the
    copies must match the size and modification time the snapshot recorded. ``key``:
    the snapshot key to authenticate the manifest with (default: this user's,
    kvmm/snapkey.py)."""
    if "\0" in os.fsdecode(path):
        raise SnapshotError(f"snapshot path {os.fsdecode(path)!r:.200}: a path may not contain a NUL byte")
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:  # ENOENT, ENAMETOOLONG, ELOOP, EACCES...
        raise SnapshotError(f"{path} is not a snapshot directory: {exc.strerror}") from None
    if not is_dir:
        raise SnapshotError(f"{path} is not a snapshot directory")
    if not os.path.lexists(path / MANIFEST):  # before the key: what is wrong is the directory
        raise SnapshotError(f"{path} is not a kvmm snapshot: it has no {MANIFEST}")
    if key is None:
        key = load_key()
    # A cached read counts only for the key it was authenticated with.
    identity = _files_identity(path, key)
    cached = _read_cache.get((identity, verify_memory)) or (_read_cache.get((identity, True)) if identity else None)
    if cached is None:
        cached = _read_checked(path, verify_memory, key)
        if identity is not None:
            if len(_read_cache) >= READ_CACHE_SIZE:
                _read_cache.pop(next(iter(_read_cache)))
            _read_cache[(identity, verify_memory)] = cached
    manifest, state = cached
    if disk_paths is not None:
        if len(disk_paths) != len(manifest.config.disks):
            raise SnapshotError(f"the snapshot has {len(manifest.config.disks)} disk(s), {len(disk_paths)} path(s) were given")
        if any("\0" in p for p in disk_paths):
            raise SnapshotError("a disk path given for the restore contains a NUL byte")
        disks = [replace(d, path=os.path.abspath(p)) for d, p in zip(manifest.config.disks, disk_paths)]
        manifest = replace(manifest, config=replace(manifest.config, disks=disks))
    _check_disks(manifest.config)
    return Snapshot(path, manifest, state)


# Restoring one snapshot many times (a fresh VM per test) parses and checks its files
# once: a restore re-reads them only when one of them changed identity (inode, size,
# modification or change time), which a stat per file tells, or the key changed. What a
# restore checks each time is what differs per restore: the disks it is given. Devices
# copy what they load from the state, so one parsed state serves every restore
# (tests/test_snapshot.py).
READ_CACHE_SIZE = 16
_Identity = tuple[tuple[tuple[int, ...], ...], bytes]
_read_cache: dict[tuple[_Identity | None, bool], tuple[Manifest, MachineState]] = {}


def _files_identity(path: Path, key: bytes) -> _Identity | None:
    try:
        stats = [os.stat(path / name) for name in (MANIFEST, STATE, MEMORY)]
    except OSError:
        return None  # read_snapshot's own checks name the problem
    files = tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for st in stats)
    return files, hashlib.sha256(key).digest()


def _read_checked(path: Path, verify_memory: bool, key: bytes) -> tuple[Manifest, MachineState]:
    """The snapshot's manifest and state, every file-level check passed (disks aside)."""
    raw = _read_limited(path / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SnapshotError(f"snapshot manifest {path / MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SnapshotError(f"{path / MANIFEST} is not a kvmm snapshot manifest")
    if data.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {data.get('version')!r:.20} is not supported (this kvmm reads version {FORMAT_VERSION})")
    _authenticate(path / MANIFEST, data, key)
    manifest = from_json(Manifest, data, "manifest")
    if manifest.kvmm_version != __version__:
        raise SnapshotError(f"the snapshot was made by kvmm {manifest.kvmm_version}, this is kvmm {__version__}: "
                            "restore it with the same version")
    _check_config(manifest.config)
    memory = path / MEMORY
    memory_fd = open_input(memory, "snapshot memory", SnapshotError)  # a FIFO or device: refused, not waited on
    try:
        memory_size = os.fstat(memory_fd).st_size
        if memory_size != manifest.memory.size:
            raise SnapshotError(f"snapshot memory {memory} is {memory_size} bytes, the manifest says "
                                f"{manifest.memory.size} (truncated?)")
        state_raw = _read_limited(path / STATE, MAX_STATE_BYTES, "state")
        if len(state_raw) != manifest.state.size or hashlib.sha256(state_raw).hexdigest() != manifest.state.sha256:
            raise SnapshotError(f"snapshot state {path / STATE} does not match the manifest's size and checksum: "
                                "it was modified, truncated or damaged")
        try:
            state = from_json(MachineState, json.loads(state_raw), "state")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SnapshotError(f"snapshot state {path / STATE} is not valid JSON: {exc}") from None
        if len(state.vcpus) != manifest.config.cpus:
            raise SnapshotError(f"the snapshot state has {len(state.vcpus)} vCPUs, its configuration {manifest.config.cpus}")
        if verify_memory and sparse_digest(memory_fd, manifest.memory.size) != manifest.memory.sha256:
            raise SnapshotError(f"snapshot memory {memory} fails its checksum: it was modified or damaged")
    finally:
        os.close(memory_fd)
    return manifest, state


def _authenticate(where: Path, data: dict[str, Any], key: bytes) -> None:
    """The manifest's HMAC must verify under this user's key (kvmm/snapkey.py): the
    manifest decides which host files a restore opens (the disks, read-write), so one
    that this user's kvmm did not write is refused before any of it is believed."""
    code = data.get("hmac")
    if not isinstance(code, str):
        raise SnapshotError(f"snapshot manifest {where} has no authentication code")
    if not verify(key, _canonical({**data, "hmac": ""}), code):
        raise SnapshotError(f"snapshot manifest {where} fails its authentication with the snapshot key {key_path()}: "
                            "it was modified or damaged, or made by another user's or host's kvmm")


def _check_config(cfg: SavedConfig) -> None:
    """The configuration's own consistency."""
    if not 1 <= cfg.cpus <= MAX_CPUS:
        raise SnapshotError(f"snapshot configuration: {cfg.cpus} vCPUs is outside 1-{MAX_CPUS}")
    if not 1 << 20 <= cfg.mem_size <= MAX_SNAPSHOT_RAM or cfg.mem_size % 4096:
        raise SnapshotError(f"snapshot configuration: memory size {cfg.mem_size} is not a page multiple within the limits")
    if cfg.console_device not in CONSOLE_DEVICES:
        raise SnapshotError(f"snapshot configuration: unknown console device {cfg.console_device!r:.20}")
    for n in cfg.nets:
        if len(n.mac) != 6:
            raise SnapshotError(f"snapshot configuration: MAC of {n.tap!r:.20} is {len(n.mac)} bytes")


def _check_disks(cfg: SavedConfig) -> None:
    """Each disk unchanged since the snapshot (size and modification time)."""
    for d in cfg.disks:
        if "\0" in d.path or not os.path.isabs(d.path):
            raise SnapshotError(f"snapshot disk {d.path!r:.200}: not an absolute path")
        try:
            st = os.stat(d.path)
        except OSError as exc:
            raise SnapshotError(f"snapshot disk {d.path}: {exc.strerror}") from None
        if (st.st_size, st.st_mtime_ns) != (d.size, d.mtime_ns):
            raise SnapshotError(
                f"snapshot disk {d.path} changed since the snapshot was taken (size {st.st_size}, was {d.size}; "
                f"modified {datetime.datetime.fromtimestamp(st.st_mtime_ns / 1e9).isoformat(timespec='seconds')}): "
                "restoring would show the guest a disk that disagrees with its caches")


# Type hints resolved at import, not in the middle of a restore.
prepare(Manifest)
prepare(MachineState)
