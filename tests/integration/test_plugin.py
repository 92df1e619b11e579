"""The pytest plugin's fixture, boot markers, and console logs on failing reports."""

from __future__ import annotations

import textwrap

import pytest

from kvmm import Outcome, VmResult

pytestmark = pytest.mark.kvm


def test_fixture_launches_and_cleans_up(guests, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    m = kvmm_machine(kernel=guests("markers"), mem="64M")
    t1 = m.wait_marker(1, timeout=30)
    t3 = m.wait_marker(3, timeout=30)
    assert 0 <= t1 <= t3
    assert m.wait(30).outcome is Outcome.DEBUG_EXIT
    assert [v for v, _ in m.markers] == [1, 2, 3]
    assert m.console.transcript == b"phase one\nphase two\n"


def test_wait_marker_times_out(guests, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    m = kvmm_machine(kernel=guests("hang"), mem="64M")
    with pytest.raises(TimeoutError, match="marker 0x7"):
        m.wait_marker(7, timeout=0.5)


def test_failing_test_report_carries_the_console(pytester: pytest.Pytester, guests) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(textwrap.dedent(f"""
        def test_fails(kvmm_machine):
            m = kvmm_machine(kernel={str(guests("serial_hello"))!r}, mem="64M")
            m.wait(30)
            assert False, "on purpose"
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*kvmm console 0*", "*hello from the guest*"])


def test_default_kernel_option(pytester: pytest.Pytester, guests) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile("""
        def test_boots(kvmm_machine):
            assert kvmm_machine(mem="64M").wait(30).debug_value == 42
    """)
    result = pytester.runpytest_subprocess("--kvmm-kernel", str(guests("serial_hello")))
    result.assert_outcomes(passed=1)


def test_fixture_restores_a_snapshot(guests, kvmm_machine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    m = kvmm_machine(kernel=guests("snap_counter"), mem="64M", disks=[str(disk)])
    m.console.expect(rb"tick 5\n", timeout=60)
    m.pause()
    m.snapshot(tmp_path / "snap")
    m.stop(VmResult(Outcome.RESET, "snapshot taken"))
    copy = tmp_path / "copy.img"
    import shutil

    shutil.copy2(disk, copy)
    r = kvmm_machine(restore=tmp_path / "snap", disks=[str(copy)])
    r.console.expect(rb"tick 100\n", timeout=60)
    assert r.wait(timeout=60).exit_status == 64 + 0x21
