"""The Python API (launch/expect/send/wait) and `kvmm smoke`, on freestanding guests."""

from __future__ import annotations

import pytest

from conftest import run_kvmm
from kvmm import ConsoleTimeout, Machine, Outcome, VmConfig

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize(
    "guest,expect,extra,status",
    [
        ("serial_hello", "hello from", [], 0),
        ("serial_hello", "never printed", [], 6),  # the guest ended first
        ("hang", "never printed", ["--timeout", "1"], 5),
        ("panic_reset", "never printed", [], 3),
    ],
)
def test_smoke_exit_statuses(guests, guest: str, expect: str, extra: list[str], status: int) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("smoke", "-q", "--kernel", str(guests(guest)), "--mem", "64M", "--expect", expect, *extra)
    assert res.returncode == status, res.stderr.decode()


def machine(guests, name: str) -> Machine:  # type: ignore[no-untyped-def]
    return Machine(VmConfig(kernel=str(guests(name)), mem_size=64 << 20, console_path="/dev/null", stdin=False))


def test_launch_expect_send_wait(guests) -> None:  # type: ignore[no-untyped-def]
    with machine(guests, "serial_echo") as m:
        m.launch(timeout=60)
        m.console.expect(r"ready", timeout=30)  # type: ignore[union-attr]
        m.console.send("shout\n")  # type: ignore[union-attr]
        assert m.console.expect(rb"SHOUT", timeout=30).group(0) == b"SHOUT"  # type: ignore[union-attr]
        result = m.wait(timeout=30)
    assert result.outcome is Outcome.DEBUG_EXIT and result.debug_value == 0


def test_expect_timeout_carries_the_last_console_lines(guests) -> None:  # type: ignore[no-untyped-def]
    with machine(guests, "hang") as m:
        m.launch()
        with pytest.raises(ConsoleTimeout) as exc:
            m.console.expect("not there", timeout=1)  # type: ignore[union-attr]
        assert "hanging" in exc.value.last_lines and "1 s passed" in str(exc.value)
    # leaving the with block stopped the hung guest


def test_expect_fails_fast_when_the_vm_ends(guests) -> None:  # type: ignore[no-untyped-def]
    with machine(guests, "serial_hello") as m:
        m.launch()
        with pytest.raises(ConsoleTimeout, match="the VM ended"):
            m.console.expect("not there", timeout=60)  # type: ignore[union-attr]


def test_two_machines_at_once(guests) -> None:  # type: ignore[no-untyped-def]
    with machine(guests, "serial_echo") as a, machine(guests, "serial_echo") as b:
        a.launch(timeout=60)
        b.launch(timeout=60)
        for m, word in ((a, "alpha"), (b, "beta")):
            m.console.expect("ready", timeout=30)  # type: ignore[union-attr]
            m.send(word + "\n")
        assert b.console.expect("BETA", timeout=30)  # type: ignore[union-attr]
        assert a.console.expect("ALPHA", timeout=30)  # type: ignore[union-attr]
        assert a.wait(30).debug_value == 0 and b.wait(30).debug_value == 0
