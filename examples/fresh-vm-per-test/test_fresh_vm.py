"""200 tests, each on its own VM restored from the session's snapshot."""

import pytest

from kvmm.config import Outcome


@pytest.mark.kvm
@pytest.mark.parametrize("n", range(200))
def test_the_guest_echoes_upper_case(kvmm_restored, echo_guest, n):
    vm = kvmm_restored(echo_guest, timeout=30)
    vm.send(f"word {n}\n")
    assert vm.wait(30).outcome is Outcome.DEBUG_EXIT
    vm.console.flush()
    # Each VM starts from the snapshot: it has seen no other test's input.
    assert vm.console.expect(rb"WORD (\d+)\n", timeout=5).group(1) == str(n).encode()
