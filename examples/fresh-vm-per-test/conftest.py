"""A suite whose every test gets a fresh, already booted VM (docs/writing-vm-tests.md).

Run it with a guest kernel that prints "ready" on COM1 and then echoes each line it reads
upper-cased, and ends with a debug-exit after the newline (kvmm's tests/guests/serial_echo.c):

    pytest examples/fresh-vm-per-test --kvmm-kernel serial_echo.elf
"""

import pytest

from kvmm import Machine


def guest_waits_for_input(m: Machine) -> None:
    """Where every test starts: the guest has printed its prompt and polls the UART."""
    m.console.expect(b"ready", timeout=60)


@pytest.fixture(scope="session")
def echo_guest(kvmm_snapshot):
    # Booted once per session (and per pytest-xdist worker); snapshotted when ready.
    return kvmm_snapshot(guest_waits_for_input, name="echo", mem="32M", rng=False)
