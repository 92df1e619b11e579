"""Shared fixtures: KVM availability, freestanding test guests, the Linux guest kernel."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guests"))

from build import build_guest  # noqa: E402

from kvmm.pytest_plugin import kvm_unavailable_reason  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The kvmm plugin skips @pytest.mark.kvm tests without /dev/kvm; Linux boots need it too.
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if "linux" in item.keywords and "kvm" not in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"needs KVM: {reason}"))


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory):
    """``guests("serial_hello")`` -> path of the compiled ELF test guest."""
    out = tmp_path_factory.mktemp("guests")
    return lambda name: build_guest(name, out)


@pytest.fixture(scope="session")
def kernel_dir() -> Path:
    """The guest kernel from kernels/build.sh (built here if the cache lacks it)."""
    res = subprocess.run([str(ROOT / "kernels" / "build.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"kernels/build.sh failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def default_signal_dispositions() -> None:
    """For ``preexec_fn``: SIGINT and SIGHUP as a user's terminal delivers them. A test run
    started in the background (``nohup``, ``&`` in a script) inherits them ignored, and an
    ignored signal stays ignored in the child (bash cannot even trap it), so tests of how a
    process reacts to them would fail for the way pytest was started."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def run_kvmm(*args: str, stdin: bytes = b"", timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the kvmm command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "kvmm", *args], input=stdin, capture_output=True, timeout=timeout, cwd=ROOT, env=env
    )
