"""The vCPU exit handling (kvmm/vcpu.py) and the boot watch (kvmm/watch.py), driven with
synthetic exits and console lines: no /dev/kvm, no threads unless a test starts them."""

from __future__ import annotations

import logging
from pathlib import Path
import threading
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from kvmm.config import Outcome, VmResult
from kvmm.devices.bus import MmioBus, PioBus
from kvmm.host import HARDWARE, PVM
from kvmm.kvm import ioctls as K
from kvmm.kvm import exits as X
from kvmm.emulate import Emulator
from kvmm.kvm.structs import ffi
from kvmm.vcpu import VcpuRunner, exit_outcome
from kvmm.watch import RECENT_MARKERS, BootWatch

from devices.test_coalesced import Recorder

EMULATION = K.KVM_INTERNAL_ERROR_EMULATION


# --- exit_outcome: one exit in, how the machine ends out ---------------------------------
@pytest.mark.parametrize("ex, outcome, text", [
    (X.ShutdownExit(), Outcome.RESET, "triple fault"),
    (X.SystemEventExit(K.KVM_SYSTEM_EVENT_SHUTDOWN, ()), Outcome.POWEROFF, "powered off"),
    (X.SystemEventExit(K.KVM_SYSTEM_EVENT_CRASH, ()), Outcome.PANIC, "crash"),
    (X.SystemEventExit(K.KVM_SYSTEM_EVENT_RESET, ()), Outcome.RESET, "system event"),
    (X.HltExit(), Outcome.POWEROFF, "halted"),
    (X.FailEntryExit(0x80000021, 0), Outcome.VCPU_ERROR, "hardware reason 0x80000021"),
    (X.UnknownExit(999), Outcome.VCPU_ERROR, "unhandled exit UnknownExit(reason=999)"),
])
def test_exit_outcome_of_each_exit_kind(ex: Any, outcome: Outcome, text: str) -> None:
    result = exit_outcome(ex, 2)
    assert result is not None and result.outcome is outcome and text in result.message


def test_an_interrupted_exit_ends_nothing() -> None:
    assert exit_outcome(X.InterruptedExit(), 0) is None


def test_an_emulation_failure_names_the_vcpu_rip_and_bytes() -> None:
    result = exit_outcome(X.InternalErrorExit(EMULATION, (), bytes.fromhex("f0480fc70e")), 1, rip=0xFFFFFFFF81000000)
    assert result == VmResult(Outcome.VCPU_ERROR, "vCPU 1: KVM could not emulate an instruction at RIP "
                                                  "0xffffffff81000000 (instruction bytes: f0 48 0f c7 0e)")
    other = exit_outcome(X.InternalErrorExit(3, (), b""), 0)
    assert other is not None and "KVM internal error 3" in other.message and "unavailable" in other.message


# --- the vCPU loop with a scripted vCPU ----------------------------------------------------
class FakeVcpu:
    """Returns the scripted exits from run(), then an X.InterruptedExit for ever."""

    def __init__(self, vcpu_id: int, exits: list[Any], rip: int = 0x1000) -> None:
        self.id = vcpu_id
        self.exits = list(exits)
        self.regs = ffi.new("struct kvm_regs *")
        self.regs.rip, self.regs.rflags = rip, 2
        self.events = SimpleNamespace(exception=SimpleNamespace(injected=0, nr=0, has_error_code=0), flags=1)
        self.set_regs_calls = 0
        self.kicks = 0

    def run(self) -> Any:
        return self.exits.pop(0) if self.exits else X.InterruptedExit()

    def get_regs(self) -> Any:
        return self.regs

    def set_regs(self, regs: Any) -> None:
        self.set_regs_calls += 1

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")  # 64-bit kernel mode, paging on
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000011, 0x9000, 0x20, 0x500
        sregs.cs.l = 1
        return sregs

    def get_state(self, kind: str) -> bytes:
        return bytes(4096)  # an XSAVE area in its initial state: no x87 exception pending

    def get_vcpu_events(self) -> Any:
        return self.events

    def set_vcpu_events(self, events: Any) -> None:
        self.events = events

    def kick(self) -> None:
        self.kicks += 1


class Port(Recorder):
    def pio_read(self, offset: int, size: int) -> int:
        return 0x1234 + offset


class Window(Recorder):
    mmio_write = Recorder.pio_write

    def mmio_read(self, offset: int, size: int) -> int:
        return 0xAABBCCDD


MEM: Any = SimpleNamespace()  # the scripted instructions (int3, fwait, clac) touch no guest memory


def make_runner(vcpus: list[FakeVcpu], host: Any = HARDWARE) -> tuple[VcpuRunner, list[VmResult], Port, Window]:
    pio, mmio, port, window = PioBus(), MmioBus(), Port(), Window()
    pio.register(0x3F8, 8, port)
    mmio.register(0xE000_0000, 0x1000, window)
    results: list[VmResult] = []
    runner: VcpuRunner

    def stop(result: VmResult) -> None:
        results.append(result)
        runner.halt()

    runner = VcpuRunner(vcpus, pio, mmio, None, Emulator(MEM, host.emulate, len(vcpus)), stop)  # type: ignore[arg-type]
    return runner, results, port, window


def test_port_and_mmio_exits_reach_the_buses_then_a_reset_ends_the_run() -> None:
    read_back = bytearray(2)
    rep = bytearray(b"ab")
    exits = [
        X.IoExit(0x3F8, 1, 1, True, memoryview(bytearray(b"h"))),
        X.IoExit(0x3F9, 1, 2, True, memoryview(rep)),  # rep outsb: one write per element
        X.IoExit(0x3FA, 2, 1, False, memoryview(read_back)),
        X.MmioExit(0xE000_0010, 4, True, memoryview(bytearray((1, 2, 3, 4)))),
        X.ShutdownExit(),
    ]
    vcpu = FakeVcpu(0, exits)
    runner, results, port, window = make_runner([vcpu])
    runner._loop(vcpu)  # type: ignore[arg-type]
    assert port.writes == [(0, 1, ord("h")), (1, 1, ord("a")), (1, 1, ord("b"))]
    assert int.from_bytes(read_back, "little") == 0x1234 + 2
    assert window.writes == [(0x10, 4, 0x04030201)]
    assert results == [VmResult(Outcome.RESET, "guest triple fault (KVM_EXIT_SHUTDOWN)")]
    assert runner.exit_kinds == Counter({X.IoExit: 3, X.MmioExit: 1, X.ShutdownExit: 1})


def test_an_unclaimed_port_read_gives_all_ones_and_the_loop_goes_on() -> None:
    data = bytearray(4)
    vcpu = FakeVcpu(0, [X.IoExit(0x1234, 4, 1, False, memoryview(data)), X.HltExit()])
    runner, results, _, _ = make_runner([vcpu])
    runner._loop(vcpu)  # type: ignore[arg-type]
    assert data == b"\xff\xff\xff\xff" and results[0].outcome is Outcome.POWEROFF


def test_an_emulation_failure_the_host_cannot_recover_ends_the_run_with_rip() -> None:
    vcpu = FakeVcpu(0, [X.InternalErrorExit(EMULATION, (), bytes.fromhex("480fae2c24"))], rip=0xFFFF_FFFF_8100_0123)
    runner, results, _, _ = make_runner([vcpu], host=PVM)
    runner._loop(vcpu)  # type: ignore[arg-type]
    assert results[0].outcome is Outcome.VCPU_ERROR
    assert "vCPU 0: KVM could not emulate `xrstor64 [rsp]` at RIP 0xffffffff81000123 (instruction bytes: " \
           "48 0f ae 2c 24): kvmm does not emulate xrstor64" in results[0].message


def test_kvm_pvm_int3_is_injected_and_the_guest_goes_on() -> None:
    vcpu = FakeVcpu(0, [X.InternalErrorExit(EMULATION, (), b"\xcc"), X.HltExit()], rip=0x5000)
    runner, results, _, _ = make_runner([vcpu], host=PVM)
    runner._loop(vcpu)  # type: ignore[arg-type]
    assert vcpu.regs.rip == 0x5001 and vcpu.set_regs_calls == 1  # a trap: the handler sees RIP after it
    assert (vcpu.events.exception.injected, vcpu.events.exception.nr, vcpu.events.flags) == (1, 3, 0)
    assert results[0].outcome is Outcome.POWEROFF
    assert runner.recovery.counters() == {"emulated_int3": 1}


def test_kvm_pvm_fwait_with_no_pending_x87_exception_is_stepped_over() -> None:
    vcpu = FakeVcpu(0, [X.InternalErrorExit(EMULATION, (), b"\x9b\xdb\xe2"), X.HltExit()], rip=0x7000)
    runner, results, _, _ = make_runner([vcpu], host=PVM)
    runner._loop(vcpu)  # type: ignore[arg-type]
    assert vcpu.regs.rip == 0x7001 and runner.recovery.counters()["emulated_fwait"] == 1


def test_hardware_kvm_recovers_nothing() -> None:
    # An int3 that KVM could not emulate on hardware KVM is a real error, not papered over.
    vcpu = FakeVcpu(0, [X.InternalErrorExit(EMULATION, (), b"\xcc")])
    runner, results, _, _ = make_runner([vcpu], host=HARDWARE)
    runner._loop(vcpu)  # type: ignore[arg-type]
    assert results[0].outcome is Outcome.VCPU_ERROR and vcpu.set_regs_calls == 0


def test_a_device_bug_in_the_loop_ends_the_run_not_the_process() -> None:
    class Broken:
        def pio_read(self, offset: int, size: int) -> int:
            raise ZeroDivisionError("device bug")

        def pio_write(self, offset: int, size: int, value: int) -> None:
            pass

    vcpu = FakeVcpu(0, [X.IoExit(0x70, 1, 1, False, memoryview(bytearray(1)))])
    runner, results, _, _ = make_runner([vcpu])
    runner.pio.register(0x70, 1, Broken())
    runner._thread(vcpu)  # type: ignore[arg-type]
    assert results[0].outcome is Outcome.VMM_ERROR and "internal error" in results[0].message


def test_every_vcpu_dumps_its_registers_whatever_order_they_come_in(caplog: pytest.LogCaptureFixture) -> None:
    # Regression: the dump request was cleared by the highest-numbered vCPU, so a vCPU
    # that came out of KVM_RUN after it skipped its dump.
    vcpus = [FakeVcpu(0, []), FakeVcpu(1, [])]
    runner, _, _, _ = make_runner(vcpus)
    runner.request_dump()
    with caplog.at_level(logging.WARNING, logger="kvmm.vcpu"):
        runner._dump(vcpus[1])  # type: ignore[arg-type]
        runner._dump(vcpus[0])  # type: ignore[arg-type]
        runner._dump(vcpus[0])  # type: ignore[arg-type]  # once per request
    dumped = [r.getMessage().split(":")[0] for r in caplog.records]
    assert dumped == ["vCPU 1", "vCPU 0"]


def test_a_register_dump_names_the_kernel_function_each_vcpu_is_in(caplog: pytest.LogCaptureFixture,
                                                                    tmp_path: Path) -> None:
    # A boot that stalls is diagnosed from where its vCPUs are (SIGUSR2): an address alone
    # means nothing to a user of a distribution kernel.
    kernel = tmp_path / "vmlinuz-6.1.0-test"
    kernel.write_bytes(b"not read")
    (tmp_path / "System.map-6.1.0-test").write_text("ffffffff81000000 T _stext\nffffffff81100000 T trace_event_update_all\n"
                                                    "ffffffff81100400 t later\n")
    vcpus = [FakeVcpu(0, [], rip=0xFFFF_FFFF_8110_0042)]
    runner, _, _, _ = make_runner(vcpus)
    runner.recovery = Emulator(MEM, False, 1, str(kernel))
    runner.request_dump()
    with caplog.at_level(logging.WARNING, logger="kvmm.vcpu"):
        runner._dump(vcpus[0])  # type: ignore[arg-type]
    assert caplog.records[0].getMessage().startswith(
        "vCPU 0: RIP 0xffffffff81100042 (trace_event_update_all+0x42, from System.map-6.1.0-test) RSP ")


def test_pause_parks_a_running_vcpu_and_resume_lets_it_go() -> None:
    vcpu = FakeVcpu(0, [])
    runner, _, _, _ = make_runner([vcpu])
    runner.threads = [threading.Thread(target=runner._loop, args=(vcpu,), daemon=True)]
    runner.threads[0].start()
    runner.pause(timeout=5)
    assert runner.paused and runner._parked == 1
    runner.resume()
    runner.halt(timeout=5)
    assert not runner.alive()


# --- the boot watch ----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_watch(stop_at_init: bool = False) -> tuple[BootWatch, list[VmResult], Clock]:
    results: list[VmResult] = []
    clock = Clock()
    return BootWatch(results.append, stop_at_init, "kvm_pvm", clock), results, clock


def test_milestones_are_timed_from_the_start() -> None:
    watch, results, clock = make_watch()
    clock.now = 101.5
    watch.console_line(b"[    0.000000] Linux version 6.1.0 (gcc) #1")
    clock.now = 130.0
    watch.console_line(b"[   20.000000] VFS: Mounted root (ext4 filesystem) on device 254:0.")
    clock.now = 131.0
    watch.console_line(b"[   21.000000] Run /sbin/init as init process")
    assert watch.milestones == {"kernel_start": 1.5, "root_mounted": 30.0, "init_started": 31.0}
    assert watch.init_seconds == 31.0 and results == []  # no stop-at-init here


def test_stop_at_init_ends_the_run_once() -> None:
    watch, results, _ = make_watch(stop_at_init=True)
    watch.console_line(b"Run /init as init process")
    watch.console_line(b"Run /init as init process")
    assert [r.outcome for r in results] == [Outcome.INIT_REACHED]
    assert "started /init" in results[0].message and "kvm_pvm" in results[0].message


def test_a_reset_after_a_kernel_panic_is_the_panic() -> None:
    watch, _, _ = make_watch()
    reset = VmResult(Outcome.RESET, "guest reset through the i8042")
    assert watch.explain(reset) is reset
    watch.console_line(b"[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs")
    assert watch.explain(reset) == VmResult(Outcome.PANIC, "guest kernel panic: Kernel panic - not syncing: "
                                                           "VFS: Unable to mount root fs")
    poweroff = VmResult(Outcome.POWEROFF, "guest powered off")
    assert watch.explain(poweroff) is poweroff  # only a reset is read as the panic's


def test_wait_marker_returns_the_first_write_of_a_value() -> None:
    watch, _, clock = make_watch()
    clock.now = 100.25
    watch.marker(7)
    clock.now = 109.0
    watch.marker(7)
    assert watch.wait_marker(7, timeout=0) == 0.25
    with pytest.raises(TimeoutError, match="marker 0x8"):
        watch.wait_marker(8, timeout=0)


def test_port_0x80_flood_keeps_host_memory_bounded() -> None:
    # Regression (hostile input round two, defect 4): one record per port 0x80 write let a
    # guest grow kvmm's memory without bound (23 -> 202 MiB in a minute).
    watch, _, _ = make_watch()
    for i in range(200_000):
        watch.marker(i & 0xFF)
    assert len(watch.markers) == RECENT_MARKERS
    assert len(watch.first_marker) == 256
    assert list(watch.markers)[-1][0] == (199_999 & 0xFF)
