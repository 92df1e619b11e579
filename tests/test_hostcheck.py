"""``kvmm host`` (kvmm/hostcheck.py) and ``kvmm --version``: on this host, and on made-up
hosts where /dev/kvm, a capability, /dev/net/tun, hugepages or memory are missing."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, run_kvmm
from kvmm import __version__, hostcheck
from kvmm.errors import KvmError, KvmUnavailableError
from kvmm.host import HARDWARE, PVM, detect_host, kind_summary
from kvmm.hostcheck import CAPABILITIES, FAIL, NOTE, OK, WARN, Check, HostFacts, evaluate, gather
from kvmm.kvm import ioctls as K
from kvmm.x86 import REQUIRED_CAPS

ALL_CAPS = {cap.number: 1 for cap in CAPABILITIES}


def line(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, f"{name!r} not reported once in {[c.name for c in checks]}"
    return found[0]


def host(**changes: Any) -> HostFacts:
    """A host where everything is fine, but for ``changes``."""
    base = HostFacts(kvm_device="/dev/kvm", kvm_node="ok", kvm_node_detail="character device 10:232", api_version=12,
                     capabilities=dict(ALL_CAPS), max_vcpus=1024, vm_created=True, tun="ok", net_admin=True,
                     hugepages_total=0, mem_available=8 << 30)
    return dataclasses.replace(base, **changes)


class FakeKvm:
    """Stands in for kvmm.kvm.Kvm: the capabilities it is given, a VM it cannot create."""

    def __init__(self, caps: dict[int, int], path: str) -> None:
        self.caps, self.path, self.api_version, self.closed = caps, path, 12, False

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def create_vm(self) -> Any:
        raise KvmError("KVM_CREATE_VM", errno.ENOMEM)

    def close(self) -> None:
        self.closed = True


def char_device() -> str:
    """A character device every user may open (gather's node check passes it)."""
    return "/dev/null"


# --- this host --------------------------------------------------------------------------------
@pytest.mark.kvm
def test_this_host_report_names_its_kvm_kind_and_what_it_means() -> None:
    res = run_kvmm("host")
    out = res.stdout.decode()
    assert res.returncode == 0, out + res.stderr.decode()
    kind_line = next(ln for ln in out.splitlines() if "KVM kind" in ln)
    if detect_host().software_nested:
        assert kind_line.startswith("warn") and "kvm_pvm: software nested KVM" in kind_line
        flat = " ".join(out.split())
        assert "1000 times slower" in flat and "cannot make system calls" in flat
        assert "noxsave clearcpuid=smap,popcnt" in flat  # the workarounds kvmm applies
    else:
        assert kind_line.startswith("ok") and "hardware" in kind_line
    assert "VM creation" in out and "kvmm can run on this host" in out
    for cap in CAPABILITIES:
        assert cap.macro in out


@pytest.mark.kvm
def test_this_host_json_report() -> None:
    res = run_kvmm("host", "--json")
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["can_run"] is True and report["kvmm"] == __version__
    assert report["host_kvm"]["kind"] == detect_host().name
    assert report["host_kvm"]["api_version"] == K.KVM_API_VERSION
    # measured on these machines (host notes): ioeventfd and irqfd work
    assert report["capabilities"]["KVM_CAP_IOEVENTFD"] and report["capabilities"]["KVM_CAP_IRQFD"]
    verdicts = {c["name"]: c["verdict"] for c in report["checks"]}
    assert verdicts["VM creation"] == OK and verdicts["KVM API version"] == OK


def test_version_names_the_host_kvm_kind() -> None:
    res = run_kvmm("--version")
    assert res.returncode == 0
    assert res.stdout.decode() == f"kvmm {__version__} (host KVM: {kind_summary()})\n"
    if os.path.exists("/dev/kvm") and detect_host().software_nested:
        assert res.stdout.decode() == f"kvmm {__version__} (host KVM: kvm_pvm, software nested)\n"


def test_version_without_kvm(tmp_path: Path) -> None:
    res = run_kvmm("--version", env={**os.environ, "KVMM_KVM_DEVICE": str(tmp_path / "kvm")})
    assert res.stdout.decode() == f"kvmm {__version__} (host KVM: none: {tmp_path / 'kvm'} does not exist)\n"


def test_kind_summary_names_the_hardware_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMM_HOST_KIND", raising=False)
    (tmp_path / "kvm_intel").mkdir()
    assert kind_summary(char_device(), str(tmp_path)) == "hardware, VT-x"
    (tmp_path / "kvm_intel").rmdir()
    (tmp_path / "kvm_amd").mkdir()
    assert kind_summary(char_device(), str(tmp_path)) == "hardware, AMD-V"
    (tmp_path / "kvm_pvm").mkdir()
    assert kind_summary(char_device(), str(tmp_path)) == "kvm_pvm, software nested"


def test_version_loads_neither_kvm_nor_the_host_check() -> None:
    """``kvmm --version`` answers from stat calls: no KVM ioctl layer, no kvmm.hostcheck."""
    code = ("import sys, kvmm.cli\ntry:\n    kvmm.cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('kvmm.kvm', 'kvmm.hostcheck', 'cffi') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]"


# --- made-up hosts through the command --------------------------------------------------------
def test_missing_kvm_device_fails_with_a_fix(tmp_path: Path) -> None:
    env = {**os.environ, "KVMM_KVM_DEVICE": str(tmp_path / "kvm")}
    res = run_kvmm("host", env=env)
    out = res.stdout.decode()
    assert res.returncode == hostcheck.EXIT_CANNOT_RUN
    first = next(ln for ln in out.splitlines() if str(tmp_path / "kvm") in ln)
    assert first.split()[0] == FAIL and "does not exist" in first
    assert "fix:" in out and ("modprobe" in out or "enable virtualization" in out)
    assert "kvmm cannot run on this host" in out
    report = json.loads(run_kvmm("host", "--json", env=env).stdout)
    assert report["can_run"] is False and report["host_kvm"]["kind"] is None


def test_kvm_node_that_is_not_a_character_device(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    res = run_kvmm("host", "--json", env={**os.environ, "KVMM_KVM_DEVICE": str(fake)})
    assert res.returncode == 1
    first = json.loads(res.stdout)["checks"][0]
    assert first["verdict"] == FAIL and "not a character device" in first["detail"] and "udev" in first["fix"]


# --- made-up hosts through gather() -----------------------------------------------------------
def test_inaccessible_kvm_device_tells_to_join_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcheck.os, "access", lambda path, mode: False)
    facts = gather(kvm_device=char_device(), kvm_factory=lambda path: pytest.fail("must not open it"))
    assert facts.kvm_node == "no access"
    checks = evaluate(facts)
    assert checks[0].verdict == FAIL and "not readable and writable" in checks[0].detail
    assert "usermod -aG" in checks[0].fix
    assert line(checks, "KVM checks").verdict == FAIL
    assert not hostcheck.can_run(checks)


def test_kvm_api_version_mismatch_fails() -> None:
    def refuse(path: str) -> Any:
        raise KvmUnavailableError(f"{path} speaks KVM API 11, kvmm needs 12")

    checks = evaluate(gather(kvm_device=char_device(), kvm_factory=refuse))
    api = line(checks, "KVM API version")
    assert api.verdict == FAIL and "speaks KVM API 11" in api.detail and api.fix


def test_missing_required_capability_fails_and_skips_the_vm() -> None:
    fakes: list[FakeKvm] = []

    def factory(path: str) -> FakeKvm:
        fakes.append(FakeKvm({n: v for n, v in ALL_CAPS.items() if n != K.KVM_CAP_IRQCHIP}, path))
        return fakes[-1]

    facts = gather(kvm_device=char_device(), kvm_factory=factory)
    checks = evaluate(facts)
    irqchip = line(checks, "in-kernel irqchip")
    assert irqchip.verdict == FAIL and "KVM_CAP_IRQCHIP missing" in irqchip.detail
    assert not any(c.name == "VM creation" for c in checks)  # not tried without a required capability
    assert fakes[0].closed and not hostcheck.can_run(checks)


def test_vm_creation_failure_fails() -> None:
    checks = evaluate(gather(kvm_device=char_device(), kvm_factory=lambda path: FakeKvm(ALL_CAPS, path)))
    vm = line(checks, "VM creation")
    assert vm.verdict == FAIL and "KVM_CREATE_VM failed: ENOMEM" in vm.detail and "dmesg" in vm.fix


def test_tun_hugepages_and_memory_read_from_the_given_paths(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 262144 kB\nHugePages_Total: 512\n"
                                  "HugePages_Free: 256\nHugepagesize: 2048 kB\n")
    (proc / "self" / "status").write_text("Name: kvmm\nCapEff:\t0000000000000000\n")
    (proc / "cpuinfo").write_text("processor : 0\nflags : fpu svm lm\n")
    facts = gather(kvm_device=str(tmp_path / "kvm"), tun_device=str(tmp_path / "tun"), proc=str(proc),
                   sys_module=str(tmp_path))
    assert facts.cpu_extension == "AMD-V" and facts.hugepages_free == 256 and facts.mem_available == 256 << 20
    checks = evaluate(facts)
    assert "sudo modprobe kvm_amd" in checks[0].fix
    tun = line(checks, str(tmp_path / "tun"))
    assert tun.verdict == NOTE and "modprobe tun" in tun.fix
    huge = line(checks, "hugepages")
    assert huge.verdict == OK and "up to 512 MiB" in huge.detail
    mem = line(checks, "available memory")
    assert mem.verdict == WARN and "--mem 128M" in mem.fix


# --- evaluate() on made-up facts --------------------------------------------------------------
def test_required_caps_of_the_vm_are_failures_here() -> None:
    required = {cap.number for cap in CAPABILITIES if cap.verdict_if_missing == FAIL}
    assert {cap for cap, _ in REQUIRED_CAPS} <= required


@pytest.mark.parametrize("cap, option", [(K.KVM_CAP_IOEVENTFD, "--no-exitless"), (K.KVM_CAP_IRQFD, "--no-msix"),
                                         (K.KVM_CAP_IRQFD_RESAMPLE, "--no-exitless"), (K.KVM_CAP_IRQ_ROUTING, "--no-msix")])
def test_missing_exitless_capability_warns_with_the_option_to_use(cap: int, option: str) -> None:
    checks = evaluate(host(capabilities={n: v for n, v in ALL_CAPS.items() if n != cap}))
    entry = next(c for c in CAPABILITIES if c.number == cap)
    check = line(checks, entry.label)
    assert check.verdict == WARN and option in check.fix and check.means
    assert hostcheck.can_run(checks)


def test_missing_coalesced_pio_is_a_note_with_its_cost() -> None:
    checks = evaluate(host(capabilities={n: v for n, v in ALL_CAPS.items() if n != K.KVM_CAP_COALESCED_PIO}))
    check = line(checks, "coalesced PIO")
    assert check.verdict == NOTE and "VM exit" in check.means and "falls back by itself" in check.fix


def test_pvm_kind_warns_and_lists_every_workaround() -> None:
    check = line(evaluate(host(kind=PVM)), "KVM kind")
    assert check.verdict == WARN and check.detail.startswith("kvm_pvm")
    from kvmm.host import host_cmdline

    assert " ".join(host_cmdline(PVM, 1)) in check.means and "clearcpuid=cx16" in check.means
    assert "int3" in check.means and "fwait" in check.means and "cmpxchg16b" in check.means
    assert "hypercall" in check.means
    assert "cannot make system calls" in check.means


def test_hardware_kind_is_ok() -> None:
    check = line(evaluate(host(kind=HARDWARE, hardware_extension="VT-x")), "KVM kind")
    assert check.verdict == OK and check.detail == "hardware (kvm_intel, VT-x)"


def test_tun_without_net_admin_needs_an_existing_tap() -> None:
    check = line(evaluate(host(net_admin=False)), hostcheck.TUN_DEVICE)
    assert check.verdict == NOTE and "ip tuntap add" in check.fix


def test_no_hugepages_is_a_note_and_how_to_reserve_them() -> None:
    check = line(evaluate(host(hugepages_total=0)), "hugepages")
    assert check.verdict == NOTE and "echo 256 > /proc/sys/vm/nr_hugepages" in check.fix


def test_almost_no_memory_fails() -> None:
    checks = evaluate(host(mem_available=8 << 20))
    assert line(checks, "available memory").verdict == FAIL and not hostcheck.can_run(checks)


def test_few_vcpus_is_a_note() -> None:
    check = line(evaluate(host(max_vcpus=4)), "vCPUs per VM")
    assert check.verdict == NOTE and "--cpus 4" in check.fix


def test_table_wraps_under_its_column_and_ends_with_the_summary() -> None:
    text = hostcheck.format_table(evaluate(host(kind=PVM)), width=80)
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    assert lines[-1] == "kvmm can run on this host (1 warning, 1 note)"
