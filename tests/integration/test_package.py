"""kvmm as users get it: the sdist and the wheel (``python -m build``), the wheel installed
into a fresh venv (not editable, its dependencies from the package index), and from there
``kvmm --version``, ``kvmm host``, a freestanding test guest, and the pytest plugin's
``kvmm_machine`` fixture in a throwaway test directory.

The rest of the suite runs kvmm from the source tree, so a file the package leaves out
(a module, the generated ABI module, package data) would only show up for users: here
it fails the build checks, and the runs from the venv show the installed package works.
The wheel is built from a copy of the package's sources (pyproject.toml, README.md,
kvmm/), so nothing is written into the source tree; the venv and everything else live in
pytest's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

from kvmm import __version__
from kvmm.defaults import EXIT_DEBUG_BASE

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvmm"
NOT_PACKAGED = ("__pycache__",)  # made by the interpreter, never shipped


def source_files() -> set[str]:
    """Every file of the package in the source tree, as a path inside the wheel."""
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*")
            if p.is_file() and not any(part in NOT_PACKAGED for part in p.parts) and p.suffix != ".pyc"}


class Dist(NamedTuple):
    wheel: Path
    sdist: Path
    seconds: float


class Venv(NamedTuple):
    root: Path
    python: Path
    kvmm: Path
    seconds: float


def clean_env() -> dict[str, str]:
    """The environment minus anything that would make the venv's Python find this tree
    or this pytest's options."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "kvmm", ignore=shutil.ignore_patterns(*NOT_PACKAGED, "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                         capture_output=True, text=True, env=clean_env(), timeout=600)
    seconds = time.monotonic() - start
    assert res.returncode == 0, f"python -m build failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    (wheel,) = out.glob("kvmm-*.whl")
    (sdist,) = out.glob("kvmm-*.tar.gz")
    return Dist(wheel, sdist, seconds)


@pytest.fixture(scope="module")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with the wheel installed (not editable) and pytest, for the plugin.
    Created without its own pip: this interpreter's pip installs into it (--python),
    which saves the venv's pip bootstrap."""
    root = tmp_path_factory.mktemp("venv")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                          "--disable-pip-version-check", str(dist.wheel), "pytest"],
                         capture_output=True, text=True, env=clean_env(), timeout=600)
    assert res.returncode == 0, f"pip install of the wheel failed:\n{res.stderr[-3000:]}"
    return Venv(root, python, root / "bin" / "kvmm", time.monotonic() - start)


def run_installed(venv: Venv, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command of the venv from a directory outside the source tree."""
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=clean_env(), timeout=timeout)


# --- what the package holds -----------------------------------------------------------------
def test_wheel_holds_every_file_of_the_package(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    expected = source_files()
    assert "kvmm/kvm/_abi.py" in expected and "kvmm/py.typed" in expected  # the generated module, package data
    missing = sorted(expected - names)
    assert not missing, f"files of kvmm/ missing from the wheel {dist.wheel.name}: {missing}"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert "kvmm = kvmm.cli:run" in entry_points  # the command
    assert "kvmm = kvmm.pytest_plugin" in entry_points and "[pytest11]" in entry_points  # the plugin


def test_sdist_holds_every_file_of_the_package(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sd:
        top = f"kvmm-{__version__}/"
        names = {n[len(top):] for n in sd.getnames() if n.startswith(top)}
    missing = sorted((source_files() | {"pyproject.toml", "README.md"}) - names)
    assert not missing, f"files missing from the sdist {dist.sdist.name}: {missing}"


def test_build_and_install_stay_within_their_budget(dist: Dist, venv: Venv) -> None:
    # CI time: python -m build (the sdist, then the wheel from it, each in an isolated
    # env: ~10 s on an idle 2-core machine), then the venv and the wheel with its
    # dependencies (~5 s). The budgets leave room for a loaded machine.
    print(f"python -m build: {dist.seconds:.1f} s; venv + wheel install: {venv.seconds:.1f} s")
    assert dist.seconds < 180, f"python -m build took {dist.seconds:.0f} s"
    assert venv.seconds < 120, f"venv + wheel install took {venv.seconds:.0f} s"


# --- the installed command ------------------------------------------------------------------
def test_installed_kvmm_is_the_wheel_not_the_tree(venv: Venv, tmp_path: Path) -> None:
    res = run_installed(venv, str(venv.python), "-c", "import kvmm, kvmm.kvm._abi; print(kvmm.__file__)", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    installed = Path(res.stdout.strip())
    assert venv.root in installed.parents and ROOT not in installed.parents
    assert (installed.parent / "py.typed").exists()


def test_installed_version(venv: Venv, tmp_path: Path) -> None:
    res = run_installed(venv, str(venv.kvmm), "--version", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"kvmm {__version__} (host KVM: ")


@pytest.mark.kvm
def test_installed_host_check(venv: Venv, tmp_path: Path) -> None:
    res = run_installed(venv, str(venv.kvmm), "host", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "KVM kind" in res.stdout and "kvmm can run on this host" in res.stdout
    report = json.loads(run_installed(venv, str(venv.kvmm), "host", "--json", cwd=tmp_path).stdout)
    assert report["can_run"] is True and report["host_kvm"]["api_version"] == 12


@pytest.mark.kvm
def test_installed_kvmm_runs_a_guest(venv: Venv, guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = run_installed(venv, str(venv.kvmm), "-q", "--kernel", str(guests("serial_hello")), "--mem", "64M", cwd=tmp_path)
    assert res.stdout == "hello from the guest\n", res.stderr
    assert res.returncode == EXIT_DEBUG_BASE + 42


@pytest.mark.kvm
def test_installed_pytest_plugin_fixture(venv: Venv, guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The ``kvmm_machine`` fixture, found through the wheel's pytest11 entry point, in a
    test directory of its own run by the venv's pytest."""
    project = tmp_path / "user-tests"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_vm.py").write_text(textwrap.dedent(f"""
        import kvmm

        def test_guest_says_hello(kvmm_machine):
            assert kvmm.__file__.startswith({str(venv.root)!r}), kvmm.__file__
            m = kvmm_machine(kernel={str(guests("serial_hello"))!r}, mem="64M")
            assert m.wait(60).debug_value == 42
            assert m.console.transcript == b"hello from the guest\\n"
    """))
    res = run_installed(venv, str(venv.python), "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 passed" in res.stdout
