"""Host-kind detection and the kernel command line built for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmm.host import HARDWARE, PVM, build_cmdline, detect_host, host_cmdline
from kvmm.vm import DEFAULT_CMDLINE


def test_pvm_detected_from_its_sysfs_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMM_HOST_KIND", raising=False)
    (tmp_path / "kvm_pvm").mkdir()
    assert detect_host(str(tmp_path / "kvm_pvm")) is PVM
    assert detect_host(str(tmp_path / "absent")) is HARDWARE


def test_hardware_host_adds_nothing() -> None:
    assert build_cmdline("", DEFAULT_CMDLINE, host_cmdline(HARDWARE, 1)) == "console=ttyS0 panic=-1 reboot=k"


def test_pvm_host_adds_its_workarounds() -> None:
    line = build_cmdline("root=/dev/vda", DEFAULT_CMDLINE, host_cmdline(PVM, 1)).split()
    for word in ("noxsave", "clearcpuid=smap,popcnt,ssse3", "nowatchdog", "root=/dev/vda", "console=ttyS0"):
        assert word in line


def test_user_parameter_replaces_default_of_same_key() -> None:
    line = build_cmdline("console=hvc0 panic=5", DEFAULT_CMDLINE, ()).split()
    assert "console=ttyS0" not in line and "panic=-1" not in line
    assert line[-2:] == ["console=hvc0", "panic=5"]


def test_user_can_override_a_workaround() -> None:
    line = build_cmdline("lpj=5000000", (), host_cmdline(PVM, 1)).split()
    assert "lpj=1000000" not in line and "lpj=5000000" in line


def test_guest_triggered_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kvmm.ratelimit import RateLimitedLog

    log = RateLimitedLog(logging.getLogger("kvmm.test"), burst=3, period=60)
    with caplog.at_level(logging.WARNING, logger="kvmm.test"):
        for i in range(100):
            log.warning("bad request %d", i)
    assert [r.getMessage() for r in caplog.records] == ["bad request 0", "bad request 1", "bad request 2"]
    assert log.dropped == 97
