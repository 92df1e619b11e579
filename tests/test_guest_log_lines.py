"""Every log line a guest can trigger is rate-limited (docs/security.md; issue 19, defect 11).

Two halves: each guest-triggered line is flooded through the path a guest drives (a
register write, a ring, a BAR, a port scan, a request) and the lines kvmm logs stay a
handful, at DEBUG level too; and every logging call in the modules a guest reaches goes
through :class:`kvmm.ratelimit.RateLimitedLog` or is listed below with why a guest
cannot repeat it, so a new unlimited line fails here before it ships."""

from __future__ import annotations

import ast
import inspect
import logging
import math
import os
import struct
import time
from pathlib import Path
from typing import Callable

import pytest

from kvmm.console import ConsoleOutput
from kvmm.devices import msix as M
from kvmm.devices.bus import PioBus
from kvmm.devices.pci import PciBus
from kvmm.eventloop import EventLoop
from kvmm.irq import LineInterrupt, MsiCallbacks
from kvmm.memory import GuestMemory
from kvmm.ratelimit import RateLimitedLog
from kvmm.virtio import device as vd
from kvmm.virtio import net as N
from kvmm.virtio import pci_legacy as L
from kvmm.virtio.rng import VirtioRng
from virtio.harness import LegacyDriver
from virtio.p9_client import P9Client
from virtio.test_net import FakeTap
from virtio.test_pci_legacy import EchoDevice

import kvmm  # noqa: E402

ROOT = Path(kvmm.__file__).resolve().parents[1]  # the kvmm under test
PERIOD = 5.0  # RateLimitedLog's default window
MEM = 8 << 20


def _transport(msix: bool = True) -> L.VirtioPciLegacy:
    mem = GuestMemory.allocate(MEM, check_available=False)
    return L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None),  # type: ignore[arg-type]
                             MsiCallbacks() if msix else None)


def flood_msix_enable_toggle() -> Callable[[int], None]:
    t = _transport()
    control = M.MSIX_CAP_OFFSET + 2
    return lambda i: t.config_write(control, 2, 0x8000 if i % 2 == 0 else 0)


def flood_status_failed() -> Callable[[int], None]:
    t = _transport()
    return lambda i: t.pio_write(L.STATUS, 1, vd.STATUS_ACKNOWLEDGE | vd.STATUS_FAILED)


def flood_ignored_register_write() -> Callable[[int], None]:
    t = _transport()
    return lambda i: t.pio_write(L.QUEUE_NUM, 2, i & 0xFFFF)


def flood_notify_of_a_missing_queue() -> Callable[[int], None]:
    t = _transport()
    return lambda i: t.pio_write(L.QUEUE_NOTIFY, 2, 100 + i % 1000)


def flood_queue_pfn_outside_ram() -> Callable[[int], None]:
    t = _transport()
    t.pio_write(L.QUEUE_SEL, 2, 0)
    return lambda i: t.pio_write(L.QUEUE_PFN, 4, (MEM >> 12) + i)


def _rng_driver() -> LegacyDriver:
    mem = GuestMemory.allocate(MEM, check_available=False)
    drv = LegacyDriver(VirtioRng(mem), mem)
    drv.init()
    return drv


def flood_malformed_chain() -> Callable[[int], None]:
    drv = _rng_driver()
    q = drv.queues[0]

    def once(i: int) -> None:
        head = q.build_chain([(MEM + 0x1000 * i, 16, True)])  # a buffer outside guest RAM
        q.publish(head)
        drv.kick(0)
        q.take_used()

    return once


def flood_broken_ring() -> Callable[[int], None]:
    drv = _rng_driver()

    def once(i: int) -> None:
        q = drv.queues[0]
        q.start_indices_at(0)
        drv.mem.write_u16(q.avail + 2, q.size + 1)  # the available index jumps past the queue size
        drv.kick(0)
        drv.queues.clear()
        drv.init()  # reset, placed again

    return once


def flood_bar_onto_ports_in_use() -> Callable[[int], None]:
    pio = PioBus()
    bus = PciBus(pio)
    pio.register(0x3F8, 8, _Uart())
    t = _transport(msix=False)
    bus.add(t)
    # BAR0 (64 ports) over the UART, then over PCI configuration: both refused, each logged.
    return lambda i: t.config_write(0x10, 4, (0x3C0 if i % 2 else 0xCC0) | 1)


class _Uart:
    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass


def flood_unclaimed_port_scan() -> Callable[[int], None]:
    pio = PioBus()
    return lambda i: pio.read(i & 0xFFFF, 1)


def _net(mergeable: bool = True) -> tuple[LegacyDriver, N.VirtioNet, FakeTap, GuestMemory]:
    mem = GuestMemory.allocate(16 << 20, check_available=False)
    tap = FakeTap()
    dev = N.VirtioNet(tap, mem, EventLoop())  # type: ignore[arg-type]
    drv = LegacyDriver(dev, mem)
    drv.init(features=(1 << N.VIRTIO_NET_F_MRG_RXBUF) if mergeable else 0)
    tap.host.setblocking(False)  # a frame kvmm does not take must not block the test
    return drv, dev, tap, mem


def _send(tap: FakeTap, frame: bytes) -> None:
    try:
        tap.host.send(frame)
    except BlockingIOError:
        pass


def flood_net_rx_buffer_shorter_than_the_header() -> Callable[[int], None]:
    drv, dev, tap, mem = _net()
    rx = drv.queues[N.RX_QUEUE]
    tiny = rx.alloc(16)

    def once(i: int) -> None:
        rx.publish(rx.build_chain([(tiny, 1, True)]))
        _send(tap, b"\0" * 12 + b"x" * 60)
        dev._tap_readable()
        rx.take_used()

    return once


def flood_net_rx_malformed_chain() -> Callable[[int], None]:
    drv, dev, tap, mem = _net()
    rx = drv.queues[N.RX_QUEUE]

    def once(i: int) -> None:
        rx.publish(rx.build_chain([(mem.size + 0x1000, 64, True)]))
        _send(tap, b"\0" * 12 + b"x" * 60)
        dev._tap_readable()
        rx.take_used()

    return once


def flood_net_tx_tap_write_failure() -> Callable[[int], None]:
    drv, dev, tap, mem = _net(mergeable=False)
    tap.host.close()  # every write to the tap now fails (EPIPE)
    tx = drv.queues[N.TX_QUEUE]
    frame = tx.alloc(70, b"\0" * 70)

    def once(i: int) -> None:
        tx.publish(tx.build_chain([(frame, 70, False)]))
        drv.kick(N.TX_QUEUE)
        tx.take_used()

    return once


def flood_p9_requests_at_debug_level(tmp_path: Path) -> Callable[[int], None]:
    (tmp_path / "f").write_bytes(b"x")
    client = P9Client(tmp_path)
    from kvmm.p9 import wire as W

    def once(i: int) -> None:
        try:
            client.rpc(W.TGETATTR, "dq", 12345, W.STATS_BASIC)  # an unknown fid: a request and an Rlerror
        except Exception:
            pass

    return once


def flood_console_output_failure() -> Callable[[int], None]:
    r, w = os.pipe()
    os.close(r)  # every flush now fails (EPIPE)
    out = ConsoleOutput(fd=w)

    def once(i: int) -> None:
        out.write(b"guest line\n")

    return once


def flood_coalesced_ring_indices() -> Callable[[int], None]:
    from kvmm.coalesced import CoalescedPio

    ring = bytearray(4096)
    c = CoalescedPio(None, memoryview(ring), PioBus())  # type: ignore[arg-type]

    def once(i: int) -> None:
        struct.pack_into("<II", ring, 0, 100000 + i, 5)
        c.drain()

    return once


def flood_acpi_sleep_requests() -> Callable[[int], None]:
    from kvmm.devices import acpi_pm as pm

    dev = pm.AcpiPm(lambda: None, lambda: None)
    # a sleep type kvmm does not offer (S1-S4, 6, 7): each request is logged and woken at once
    return lambda i: dev.pio_write(pm.PM1_CNT, 2, ((i % 4 + 1) << pm.CNT_SLP_TYP_SHIFT) | pm.CNT_SLP_EN)


def flood_acpi_wrong_reset_value() -> Callable[[int], None]:
    from kvmm.devices import acpi_pm as pm

    dev = pm.AcpiPm(lambda: None, lambda: None)
    return lambda i: dev.pio_write(pm.RESET, 1, 2 + i % 250)


def flood_acpi_poweroff_and_reset() -> Callable[[int], None]:
    from kvmm.devices import acpi_pm as pm

    # The machine stops at the first, but the device logs through its limiter all the same.
    dev = pm.AcpiPm(lambda: None, lambda: None)
    return lambda i: (dev.pio_write(pm.PM1_CNT, 2, (pm.SLP_TYP_S5 << pm.CNT_SLP_TYP_SHIFT) | pm.CNT_SLP_EN)
                      if i % 2 else dev.pio_write(pm.RESET, 1, pm.RESET_VALUE))


FLOODS: dict[str, tuple[Callable[..., Callable[[int], None]], int]] = {
    "msix_enable_toggle": (flood_msix_enable_toggle, 10_000),
    "status_failed": (flood_status_failed, 10_000),
    "ignored_register_write": (flood_ignored_register_write, 10_000),
    "notify_of_a_missing_queue": (flood_notify_of_a_missing_queue, 10_000),
    "queue_pfn_outside_ram": (flood_queue_pfn_outside_ram, 10_000),
    "malformed_chain": (flood_malformed_chain, 2_000),
    "broken_ring": (flood_broken_ring, 1_000),
    "bar_onto_ports_in_use": (flood_bar_onto_ports_in_use, 10_000),
    "unclaimed_port_scan": (flood_unclaimed_port_scan, 65_536),
    "net_rx_buffer_shorter_than_the_header": (flood_net_rx_buffer_shorter_than_the_header, 2_000),
    "net_rx_malformed_chain": (flood_net_rx_malformed_chain, 2_000),
    "net_tx_tap_write_failure": (flood_net_tx_tap_write_failure, 2_000),
    "p9_requests_at_debug_level": (flood_p9_requests_at_debug_level, 1_000),
    "console_output_failure": (flood_console_output_failure, 10_000),
    "coalesced_ring_indices": (flood_coalesced_ring_indices, 10_000),
    "acpi_sleep_requests": (flood_acpi_sleep_requests, 10_000),
    "acpi_wrong_reset_value": (flood_acpi_wrong_reset_value, 10_000),
    "acpi_poweroff_and_reset": (flood_acpi_poweroff_and_reset, 10_000),
}
# Lines one window may hold: each distinct message's burst (10; 200 for 9p's per-request
# debug trace) plus its "suppressed" line.
PER_WINDOW = {"p9_requests_at_debug_level": 2 * 201 + 2 * 11}


@pytest.mark.parametrize("name", sorted(FLOODS))
def test_a_guest_flood_of_each_logged_event_logs_a_bounded_number_of_lines(
        name: str, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    make, n = FLOODS[name]
    action = make(tmp_path) if inspect.signature(make).parameters else make()
    caplog.clear()
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="kvmm"):
        for i in range(n):
            action(i)
    windows = 1 + math.ceil((time.monotonic() - started) / PERIOD)
    lines = [r for r in caplog.records if r.name.startswith("kvmm")]
    bound = PER_WINDOW.get(name, 3 * 11) * windows
    assert 0 < len(lines) <= bound, (len(lines), [r.getMessage() for r in lines[:5]])


def test_the_limiter_keeps_one_budget_per_message_so_a_flood_hides_no_other_warning(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("kvmm.test"), burst=2, period=60)
    with caplog.at_level(logging.DEBUG, logger="kvmm.test"):
        for i in range(1000):
            log.debug("flood %d", i)
        log.warning("the one that matters")
    assert [r.getMessage() for r in caplog.records] == ["flood 0", "flood 1", "the one that matters"]


def test_a_level_the_logger_does_not_emit_costs_nothing_and_counts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("kvmm.test"), burst=1, period=60)
    with caplog.at_level(logging.INFO, logger="kvmm.test"):
        for i in range(100):
            log.debug("hidden %d", i)
        log.info("shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"] and log.dropped == 0


# --- the inventory ----------------------------------------------------------------------------

# Modules whose code runs on a guest's action (port and MMIO exits, queue work, 9p requests,
# console output, interrupts).
GUEST_FACING = ["kvmm/devices", "kvmm/virtio", "kvmm/p9", "kvmm/vcpu.py", "kvmm/irq.py", "kvmm/coalesced.py",
                "kvmm/console.py", "kvmm/watch.py", "kvmm/eventloop.py", "kvmm/testkernels.py"]
# Direct logger calls there that a guest cannot repeat at will, and why.
NOT_GUEST_REPEATABLE = {
    ("kvmm/devices/bus.py", "guest %s of unclaimed MMIO address"): "logged once per bus (the counter is checked first)",
    ("kvmm/virtio/p9.py", "cannot raise the open-file limit"): "once, when the shares are created",
    ("kvmm/virtio/console.py", "console port output failed"): "once: the port is marked broken and writes nothing more",
    ("kvmm/virtio/blk.py", "disk %s: size %d is not a multiple"): "once, when the disk is opened",
    ("kvmm/p9/hostfs.py", "kvmm/p9/_abi.py is older"): "at import",
    ("kvmm/p9/hostfs.py", "openat2 is not available"): "once per process (the probe's result is cached)",
    ("kvmm/vcpu.py", "%s did not stop within"): "at teardown, once per vCPU thread",
    ("kvmm/vcpu.py", "vCPU %d: internal error"): "a kvmm bug; it ends that vCPU's run",
    ("kvmm/vcpu.py", "vCPU %d: RIP %#x"): "the host's SIGUSR2 asks for it, not the guest",
    ("kvmm/watch.py", "guest kernel ran %s"): "once per run (init_seconds is set the first time)",
}
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _direct_logger_calls() -> list[tuple[str, str, int]]:
    """(module, message, line) of every ``LOG.<level>(...)`` call in the guest-facing modules."""
    files: list[Path] = []
    for entry in GUEST_FACING:
        p = ROOT / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("LOG", "logging", "logger")):
                msg = node.args[0] if node.args else None
                text = msg.value if isinstance(msg, ast.Constant) and isinstance(msg.value, str) else ast.unparse(msg or node)
                out.append((str(path.relative_to(ROOT)), text, node.lineno))
    return out


def test_every_logging_call_a_guest_reaches_is_rate_limited_or_cannot_repeat() -> None:
    calls = _direct_logger_calls()
    unlisted = [f"{mod}:{line}: {msg!r}" for mod, msg, line in calls
                if not any(mod == m and msg.startswith(prefix) for m, prefix in NOT_GUEST_REPEATABLE)]
    assert not unlisted, ("log through a RateLimitedLog (kvmm/ratelimit.py), or list the call in "
                          "NOT_GUEST_REPEATABLE with why a guest cannot repeat it:\n" + "\n".join(unlisted))
    stale = [key for key in NOT_GUEST_REPEATABLE if not any(mod == key[0] and msg.startswith(key[1]) for mod, msg, _ in calls)]
    assert not stale, f"listed but gone: {stale}"
