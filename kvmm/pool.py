"""Restores of one snapshot, many times, fast: a fresh VM per test.

A restore spends most of its time in KVM, not in kvmm (docs/performance.md, "A fresh VM
per test"): creating the VM, its memslot, irqchip and PIT is ~5 ms here, and each of
these leaves the kernel an SRCU grace period to finish. A :class:`RestorePool` makes
those ahead, on a thread of its own, for the one snapshot it serves (RAM mapped
copy-on-write from the snapshot's memory file, the VM around it), so that
:meth:`RestorePool.restore` only builds the devices, loads the state and starts the
vCPUs. The VMs handed out are closed like any machine (kvmm/teardown.py).

    with RestorePool("snap/") as pool:
        for test in tests:
            with pool.restore(console_path="/dev/null", disks=[copy_of_disk()]) as m:
                m.launch()
                ...
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import TYPE_CHECKING

from .errors import KvmmError

if TYPE_CHECKING:
    from .host import HostKind
    from .vm import Machine
    from .x86 import PreparedVm

LOG = logging.getLogger(__name__)

MAX_READY = 8


class RestorePool:
    """Prepared VMs for the snapshot directory ``path``, ``ready`` of them kept ahead.

    The snapshot's files are read and checked once here (and again by each restore,
    cheaply, from kvmm.snapshot's cache); disks are checked per restore, since each test
    gets copies of its own."""

    def __init__(self, path: str | os.PathLike[str], *, ready: int = 2, verify_memory: bool = False) -> None:
        from .snapshot import read_snapshot

        if not 1 <= ready <= MAX_READY:
            raise KvmmError(f"a restore pool keeps 1-{MAX_READY} VMs ready, not {ready}")
        self.path = os.fspath(path)
        snap = read_snapshot(self.path, verify_memory=verify_memory)  # SnapshotError now, not per test
        self.memory_path, self.mem_size = snap.memory_path, snap.manifest.config.mem_size
        # The memory file the prepared VMs map: a snapshot rewritten in place while the
        # pool lives must not pair its new state with the old memory (or the reverse).
        self._memory_identity = self._memory_now()
        self.verify_memory = verify_memory
        self.ready = ready
        self._vms: deque[PreparedVm] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self.prepared = 0  # VMs made ahead so far
        self.waited = 0  # restores that found no VM ready and waited for one
        self._thread = threading.Thread(target=self._prepare_ahead, name="kvmm-restore-pool", daemon=True)
        self._thread.start()

    def restore(self, *, console_path: str | None = None, stdin: bool = False, host: HostKind | None = None,
                api_socket: str | None = None, disks: list[str] | None = None, timeout: float = 30.0) -> Machine:
        """A :class:`kvmm.vm.Machine` continuing the snapshot on a prepared VM (the
        keywords are :meth:`Machine.restore`'s). Raises the error that stopped the pool
        from preparing VMs, or KvmmError if none was ready within ``timeout`` seconds."""
        from .errors import SnapshotError
        from .vm import Machine

        if self._memory_now() != self._memory_identity:
            raise SnapshotError(f"the snapshot memory {self.memory_path} changed since the restore pool was made: "
                                "make a new pool")
        return Machine.restore(self.path, console_path=console_path, stdin=stdin, host=host, api_socket=api_socket,
                               disks=disks, verify_memory=self.verify_memory, prepared=self._take(timeout))

    def _take(self, timeout: float) -> PreparedVm:
        with self._cond:
            if not self._vms:
                self.waited += 1
            if not self._cond.wait_for(lambda: self._vms or self._error is not None or self._closed, timeout):
                raise KvmmError(f"no prepared VM within {timeout:g} s")
            if self._closed:
                raise KvmmError("the restore pool is closed")
            if not self._vms:
                assert self._error is not None
                raise self._error
            vm = self._vms.popleft()
            self._cond.notify_all()
            return vm

    def _memory_now(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.memory_path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _prepare_ahead(self) -> None:
        from .errors import SnapshotError
        from .memory import GuestMemory
        from .x86 import vm_around

        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._vms) < self.ready)
                if self._closed:
                    return
            try:
                # As Machine.restore builds one (kvmm/builder.py): RAM first, then the VM;
                # a restored UART decides its own coalescing, so no coalesced zone here.
                vm = vm_around(GuestMemory.from_file(self.memory_path, self.mem_size))
                if self._memory_now() != self._memory_identity:
                    vm.close()
                    raise SnapshotError(f"the snapshot memory {self.memory_path} changed since the restore pool was made")
            except Exception as exc:  # surfaces in restore(): the pool cannot do its job
                LOG.error("the restore pool for %s cannot prepare VMs: %s", self.path, exc)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if self._closed:
                    vm.close()
                    return
                self._vms.append(vm)
                self.prepared += 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop preparing and release the VMs not handed out. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        with self._cond:
            vms, self._vms = list(self._vms), deque()
        for vm in vms:
            vm.close()

    def __enter__(self) -> RestorePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
