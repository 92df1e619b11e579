"""virtio-console, port 0 only (virtio 0.9.5 "Appendix E: Console Device", no MULTIPORT):
the primary console (hvc0 with ``--console virtio``), and output ports (``VmConfig.ports``:
``kvmm run`` gives the command's stdout and stderr one each).

Queue 0 (receiveq) carries host input to the guest: the driver posts device-writable
buffers and kvmm fills them as input arrives. Queue 1 (transmitq) carries the guest's
output: readable buffers, written to the console sink. Linux names the port ``hvc0``.
Input that has no guest buffer yet waits in a bounded backlog; while the backlog is full
kvmm stops reading its input.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ..config import PortConfig
from ..errors import ConfigError, SnapshotError
from ..memory import GuestMemory
from ..state import from_json, to_json
from .chain_io import Reader, Writer
from .device import VIRTIO_ID_CONSOLE, DeviceBase, DeviceContext, Interrupt, VirtioDevice, create_each, serve_queue
from .queue import Chain, Queue

LOG = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 64
INPUT_BACKLOG_LIMIT = 4096
MAX_TX_CHAIN = 1 << 20  # bytes of output taken from one chain


@dataclass
class VirtioConsoleState:
    """The device's snapshot format: host input not yet delivered."""

    backlog: bytes  # host input not yet delivered to the guest


def create(ctx: DeviceContext) -> list[VirtioDevice]:
    """The primary console (output and input), when the configuration asks for hvc0;
    then a device per output port (``VmConfig.ports``)."""
    devices: list[VirtioDevice] = []
    if ctx.config.console_device == "virtio":
        device = VirtioConsole(ctx.mem, ctx.console.write)
        ctx.claim_console(device)
        devices.append(device)

    def make_port(i: int, port: PortConfig) -> VirtioDevice:
        sink = PortSink(port)
        con = VirtioConsole(ctx.mem, sink.write, f"port{i}", sink.close)
        con.is_port = True
        if port.input:
            ctx.claim_console(con)
        return con

    try:
        devices += create_each(ctx.config.ports, make_port)
    except BaseException:
        for made in devices:
            made.close()
        raise
    return devices


class PortSink:
    """Where an output port's bytes go: a file kvmm opens, or a descriptor it was given
    (written with blocking writes on the I/O thread: a reader that does not keep up
    slows the guest's output, it does not lose it)."""

    def __init__(self, port: PortConfig) -> None:
        self.own = port.path is not None
        if port.path is not None:
            from ..files import open_output

            self.fd = open_output(port.path, "console port file", ConfigError)
        elif port.fd is not None:
            self.fd = port.fd
        else:
            raise ConfigError("a console port needs a file or a descriptor")
        self.broken = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
            except OSError as exc:  # a closed pipe: the rest of the output has nowhere to go
                LOG.warning("console port output failed: %s", exc.strerror)
                self.broken = True

    def close(self) -> None:
        if self.own and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VirtioConsole(DeviceBase):
    device_id = VIRTIO_ID_CONSOLE
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE)
    pci_class_code = 0x078000
    name = "virtio_console"

    def __init__(self, mem: GuestMemory, sink: Callable[[bytes], None], name: str = "virtio_console",
                 closer: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.mem = mem
        self.sink = sink
        self.name = name
        self.closer = closer
        self.backlog: deque[int] = deque()
        self.lock = threading.Lock()
        self.bytes_out = 0
        self.bytes_in = 0

    def activate(self, queues: list[Queue], features: int, interrupt: Interrupt) -> None:
        super().activate(queues, features, interrupt)
        self._deliver()  # input typed before the driver came up

    is_port = False  # an output port (VmConfig.ports): not in a snapshot's saved configuration

    def save_state(self) -> Any:
        if self.is_port:
            raise SnapshotError("a VM with console output ports (kvmm run) cannot be snapshotted: "
                                "a snapshot's configuration does not record them")
        with self.lock:
            return to_json(VirtioConsoleState(bytes(self.backlog)))

    def load_state(self, data: Any) -> None:
        st = from_json(VirtioConsoleState, data, "virtio-console")
        if len(st.backlog) > INPUT_BACKLOG_LIMIT:
            raise SnapshotError(f"virtio-console: {len(st.backlog)} bytes of input backlog, at most {INPUT_BACKLOG_LIMIT}")
        with self.lock:
            self.backlog = deque(st.backlog)

    # --- host side ----------------------------------------------------------------------
    def rx_room(self) -> int:
        return INPUT_BACKLOG_LIMIT - len(self.backlog)

    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; returns the bytes accepted."""
        with self.lock:
            taken = data[: max(self.rx_room(), 0)]
            self.backlog.extend(taken)
        self._deliver()
        return len(taken)

    # --- guest side ---------------------------------------------------------------------
    def process_queue(self, index: int) -> bool:
        if not self.queues or self.interrupt is None:
            return False
        if index == TX_QUEUE:
            return serve_queue(self.queues[TX_QUEUE], TX_QUEUE, self.interrupt, "virtio-console", self._transmit)
        if index == RX_QUEUE:
            self._deliver()  # the driver posted receive buffers
        return False

    def _transmit(self, chain: Chain) -> int:
        data = Reader(self.mem, chain.readable, MAX_TX_CHAIN).read(MAX_TX_CHAIN)
        if data:
            self.sink(data)
            self.bytes_out += len(data)
        return 0

    def counters(self) -> dict[str, int]:
        return {"bytes_out": self.bytes_out, "bytes_in": self.bytes_in}

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None

    def _deliver(self) -> None:
        """Move backlog into the guest's receive buffers, one chain per batch of input."""
        if not self.queues or self.interrupt is None:
            return
        q = self.queues[RX_QUEUE]
        with self.lock:

            def fill(chain: Chain) -> int:
                out = Writer(self.mem, chain.writable, len(self.backlog))
                written = out.write(bytes(self.backlog.popleft() for _ in range(out.available)))
                self.bytes_in += written
                return written

            # A chain at a time, while input lasts: the rest of the posted buffers stay
            # for later input.
            while self.backlog and q.has_available():
                serve_queue(q, RX_QUEUE, self.interrupt, "virtio-console", fill, budget=1)
