"""The device side of virtio, common to every device: one small protocol (as kvmtool's
``struct virtio_ops``) that a transport drives.

A device declares its id, feature bits, queue sizes and config space; the transport
negotiates features, places queues and calls :meth:`VirtioDevice.process_queue` when the
driver notifies a queue. Devices signal the driver through an :class:`Interrupt`.

Each device kind is one module of this package with a ``create(ctx)`` function that
makes the kind's devices for a machine's configuration (none if it has none), and one
line in kvmm/builder.py's ``VIRTIO_DEVICES`` table. A device reports its own counters
(``counters()``) and owns its backend (a disk image, a tap), which ``close()`` releases.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from ..errors import SnapshotError

from ..ratelimit import RateLimitedLog
from .queue import Chain, ChainError, Queue, QueueError

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..console import ConsoleInput, ConsoleOutput
    from ..eventloop import EventLoop
    from ..memory import GuestMemory

LOG = logging.getLogger(__name__)
_CHAIN_LOG = RateLimitedLog(LOG)  # malformed chains are the guest's to produce at will

# virtio 0.9.5 2.2.2.1 device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# device ids (0.9.5 Appendix: device types)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_9P = 9


class Interrupt(Protocol):
    """The transport, as the device sees it. Its ``lock`` serialises device work done on
    the I/O thread (tap input, say) with the driver's register accesses."""

    lock: threading.RLock

    def signal_used(self, index: int) -> None:
        """Used buffers were added to queue ``index``."""

    def signal_config(self) -> None:
        """The device's configuration space changed."""

    def needs_reset(self, reason: str) -> None:
        """The device hit an impossible ring state and stops until the driver resets it."""


class VirtioDevice(Protocol):
    device_id: int
    queue_sizes: tuple[int, ...]
    pci_class_code: int  # the PCI class the transport shows (base, sub, programming interface)
    name: str  # prefix of its counters in the machine's report ("blk0", "rng")

    def features(self) -> int:
        """Device-specific feature bits offered (the transport adds the ring features)."""

    def config(self) -> bytes:
        """The current device configuration space."""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space (already range-checked)."""

    def activate(self, queues: list[Queue], features: int, interrupt: Interrupt) -> None:
        """The driver set DRIVER_OK with ``features`` acknowledged."""

    def process_queue(self, index: int) -> bool | None:
        """The driver notified queue ``index``. True: work is left for a later turn."""

    def reset(self) -> None:
        """The driver wrote 0 to the status register."""

    def save_state(self) -> Any:
        """Device-specific state beyond the queues, as JSON-ready data (None: none)."""

    def load_state(self, data: Any) -> None:
        """Restore :meth:`save_state`'s data after activation; raise SnapshotError if bad."""

    def counters(self) -> dict[str, int]:
        """What the device did (requests, bytes, errors), for the machine's report."""

    def flush(self) -> None:
        """Make what the guest wrote durable (before a snapshot); raise OSError if not."""

    def close(self) -> None:
        """Release the backend (the machine is closing); flushes first where it writes."""


class DeviceContext(NamedTuple):
    """What a device module's ``create(ctx)`` may use to make its devices."""

    config: VmConfig
    mem: GuestMemory
    loop: EventLoop  # the I/O thread's loop (readers for host-side fds)
    console: ConsoleOutput  # the guest console's host end
    claim_console: Callable[[ConsoleInput], None]  # make a device the primary console's input


def create_each(items: list[Any], make: Callable[[int, Any], VirtioDevice]) -> list[VirtioDevice]:
    """``make(i, item)`` for each item (a disk's or NIC's configuration): the devices, or,
    if one cannot be made (a missing disk), none, with those already made closed."""
    devices: list[VirtioDevice] = []
    try:
        for i, item in enumerate(items):
            devices.append(make(i, item))
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices


class DeviceBase:
    """Defaults for the :class:`VirtioDevice` protocol: no feature bits, an empty config
    space, no counters, no backend, and activate/reset that keep or drop the queues and
    the interrupt."""

    pci_class_code = 0xFF0000  # "other"
    name = "virtio"  # a device module's create() numbers its devices where there can be several

    def __init__(self) -> None:
        self.queues: list[Queue] = []
        self.interrupt: Interrupt | None = None

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        pass  # nothing writable unless a device says so

    def activate(self, queues: list[Queue], features: int, interrupt: Interrupt) -> None:
        self.queues, self.interrupt = queues, interrupt

    def reset(self) -> None:
        self.queues, self.interrupt = [], None

    def save_state(self) -> Any:
        return None

    def load_state(self, data: Any) -> None:
        if data is not None:
            raise SnapshotError(f"{type(self).__name__}: the snapshot holds device state this device does not have")

    def counters(self) -> dict[str, int]:
        return {}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def serve_queue(q: Queue, index: int, interrupt: Interrupt, name: str, handle: Callable[[Chain], int],
                log: Callable[..., None] | None = None, budget: int | None = None) -> bool:
    """Complete available chains of ``q`` with ``handle(chain)`` bytes written, at most
    ``budget`` of them (default: the queue size) so one busy queue cannot starve the rest.

    The two tiers of guest error (queue.py): a malformed chain completes with length 0 and
    the device goes on; an impossible ring marks the device as needing reset. The driver
    gets one interrupt for the batch, if it wants one. Returns True if chains are left
    for a later turn (the transport schedules one)."""
    warn = log or _CHAIN_LOG.warning
    done = 0
    limit = q.size if budget is None else budget
    while done < limit:
        try:
            chain = q.pop()
        except ChainError as exc:
            warn("%s: %s; completed with no data", name, exc)
            q.push_used(exc.head, 0)
            done += 1
            continue
        except QueueError as exc:
            interrupt.needs_reset(f"{name}: {exc}")
            break
        if chain is None:
            break
        q.push_used(chain.head, handle(chain))
        done += 1
    if done and q.needs_interrupt():
        interrupt.signal_used(index)
    return done >= limit and q.has_available()
