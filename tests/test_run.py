"""kvmm run's plan (kvmm/run.py): what it shares, what it writes into the run directory,
the kernel command line; the generated scripts run on the host to show their quoting;
and the init shim as package data. The boots are in tests/integration/test_run_linux.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvmm import run as R
from kvmm.config import Outcome, ShareConfig, VmResult
from kvmm.errors import ConfigError, ShareError

ROOT = Path(__file__).resolve().parents[1]


def test_root_is_the_host_slash_read_only_with_the_shim_as_init(tmp_path: Path) -> None:
    p = R.plan(["true"], str(tmp_path), cwd=str(ROOT))
    assert p.shares[0] == ShareConfig("/", R.ROOT_TAG, read_only=True)
    assert p.shares[1] == ShareConfig(str(tmp_path), R.RUN_TAG, read_only=False)
    words = p.cmdline.split()
    assert {"root=kvmm-root", "rootfstype=9p", "ro", f"init={R.SHIM}"} <= set(words)
    assert any(w.startswith("rootflags=trans=virtio,version=9p2000.L,msize=") for w in words)
    assert not p.bootstrap and p.init == R.SHIM


def test_the_shim_is_executable_and_a_posix_shell_script() -> None:
    assert os.access(R.SHIM, os.X_OK)
    assert Path(R.SHIM).read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", R.SHIM]).returncode == 0
    mode = subprocess.run(["git", "ls-files", "-s", "kvmm/run_init.sh"], cwd=ROOT, capture_output=True, text=True).stdout
    assert mode.startswith("100755"), f"git must keep the execute bit: {mode!r}"


def test_the_shim_is_in_the_wheel_with_its_execute_bit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "kvmm", src / "kvmm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip()[-300:]}")
    wheel = next((tmp_path / "dist").glob("kvmm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("kvmm/run_init.sh")
        assert (info.external_attr >> 16) & 0o111, "the shim lost its execute bit in the wheel"
        assert z.read("kvmm/run_init.sh") == Path(R.SHIM).read_bytes()
        assert "kvmm/p9/_abi.py" in z.namelist()


def test_command_sh_runs_the_command_with_its_arguments_intact(tmp_path: Path) -> None:
    argv = ["printf", "[%s]\\n", "two words", "it's", 'a "quote"', "$HOME", "new\nline", "*", ""]
    p = R.plan(argv, str(tmp_path), cwd=str(tmp_path), env={"PATH": os.environ["PATH"], "SECRET_TOKEN": "x",
                                                             "LANG": "C.UTF-8"})
    assert "SECRET_TOKEN" not in p.command_sh and "export LANG=C.UTF-8" in p.command_sh
    script = tmp_path / "command.sh"
    script.write_text(p.command_sh)
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(f"[{a}]\n" for a in argv[2:])


def test_command_sh_changes_to_the_current_directory_or_exits_125(tmp_path: Path) -> None:
    p = R.plan(["pwd"], str(tmp_path), cwd=str(tmp_path))
    script = tmp_path / "command.sh"
    script.write_text(p.command_sh)
    assert subprocess.run(["sh", str(script)], capture_output=True, text=True).stdout.strip() == str(tmp_path)
    script.write_text(p.command_sh.replace(str(tmp_path), str(tmp_path / "gone")))
    assert subprocess.run(["sh", str(script)], capture_output=True).returncode == 125


def test_setup_sh_mounts_tmpfs_then_shares_parents_first(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    p = R.plan(["true"], str(tmp_path / "run"), rw=[str(tmp_path / "a" / "b"), str(tmp_path / "a")],
               shares=[ShareConfig(str(tmp_path), "data", read_only=True)], cwd="/")
    assert subprocess.run(["sh", "-n"], input=p.setup_sh, text=True).returncode == 0
    lines = p.setup_sh.splitlines()
    mounts = [line for line in lines if " -t 9p " in line]
    assert [m.where for m in p.mounts] == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    assert len(mounts) == 3 and ",ro " in mounts[0] and ",ro " not in mounts[1]
    first_9p = lines.index(mounts[0])
    assert all(lines.index(f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {t}") < first_9p for t in p.tmpfs)
    assert "/tmp" in p.tmpfs
    assert [s.tag for s in p.shares[2:]] == ["data", "kvmm-rw1", "kvmm-rw0"]


def test_a_current_directory_under_a_tmpfs_is_shared_where_it_is(tmp_path: Path) -> None:
    p = R.plan(["true"], str(tmp_path / "run"), cwd=str(tmp_path))
    assert str(tmp_path).startswith("/tmp/")
    assert [(m.share.tag, m.share.read_only, m.where) for m in p.mounts] == [("kvmm-cwd", True, str(tmp_path))]
    p = R.plan(["true"], str(tmp_path / "run"), cwd=str(tmp_path), rw=[str(tmp_path)])
    assert [m.share.tag for m in p.mounts] == ["kvmm-rw0"]  # already there, writable


def test_terminal_modes_and_stdin(tmp_path: Path) -> None:
    p = R.plan(["true"], str(tmp_path), cwd="/")
    assert "stty -opost </dev/hvc0" in p.setup_sh and "stty -opost </dev/hvc1" in p.setup_sh
    assert "KVMM_STDIN=/dev/hvc0" not in p.setup_sh
    p = R.plan(["true"], str(tmp_path), cwd="/", stdin_tty=True, stdout_tty=True, stderr_tty=True)
    assert "stty" not in p.setup_sh and "KVMM_STDIN=/dev/hvc0" in p.setup_sh


def test_a_root_without_the_shim_boots_through_a_bootstrap(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    p = R.plan(["true"], str(tmp_path / "run"), root=str(root), cwd=str(root / "bin"))
    assert p.bootstrap and p.init == "/bin/sh"
    assert 'init=/bin/sh -- -c "mount -t tmpfs' in p.cmdline and p.cmdline.endswith('exec /bin/sh /run/kvmm/init.sh"')
    assert "cd /bin " in p.command_sh
    (tmp_path / "run").mkdir()
    R.write_run_dir(p, str(tmp_path / "run"))
    assert (tmp_path / "run" / "init.sh").read_bytes() == Path(R.SHIM).read_bytes()
    assert (tmp_path / "run" / "command.sh").read_text() == p.command_sh


def test_a_root_holding_the_shim_runs_it_at_its_path_there(tmp_path: Path) -> None:
    root = str(Path(R.SHIM).parents[1])
    p = R.plan(["true"], str(tmp_path), root=root, cwd="/")
    assert not p.bootstrap and p.init == "/kvmm/run_init.sh" and "init=/kvmm/run_init.sh" in p.cmdline


def test_user_share_tags_may_not_take_kvmm_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kvmm-"):
        R.plan(["true"], str(tmp_path), shares=[ShareConfig(str(tmp_path), "kvmm-root")])


def test_missing_rw_directory_and_empty_command(tmp_path: Path) -> None:
    with pytest.raises(ShareError, match="does not exist"):
        R.plan(["true"], str(tmp_path), rw=[str(tmp_path / "nope")])
    with pytest.raises(ConfigError):
        R.plan([], str(tmp_path))


def test_result_exit_status_is_the_commands_else_kvmms() -> None:
    def result(status: int | None, outcome: Outcome) -> R.RunResult:
        return R.RunResult(status, VmResult(outcome, "m"), None, None, "", None, {})

    assert result(3, Outcome.RESET).exit_status == 3
    assert result(0, Outcome.PANIC).exit_status == 0  # init's exit after the status: the status counts
    assert result(None, Outcome.INIT_REACHED).exit_status == 17
    assert "did not run" in result(None, Outcome.INIT_REACHED).message
    assert result(None, Outcome.RESET).exit_status == 17
    assert result(None, Outcome.PANIC).exit_status == 3
    assert result(None, Outcome.TIMEOUT).exit_status == 5


def test_default_kernel_prefers_kvmm_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMM_KERNEL", "/some/vmlinux")
    assert R.default_kernel() == "/some/vmlinux"
    monkeypatch.delenv("KVMM_KERNEL")
    out = subprocess.run([str(ROOT / "kernels" / "build.sh"), "--print-dir"], capture_output=True, text=True).stdout
    built = Path(out.strip().splitlines()[-1]) / "vmlinux"
    if built.is_file():
        assert R.default_kernel() == str(built)
    else:
        with pytest.raises(Exception, match="no kernel"):
            R.default_kernel()


def test_status_file_is_read_as_a_byte(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("259\n")
    assert R._read_status(str(tmp_path / "status")) == 3
    (tmp_path / "status").write_text("garbage")
    assert R._read_status(str(tmp_path / "status")) is None
    assert R._read_status(str(tmp_path / "missing")) is None
    assert stat.S_ISREG(os.stat(R.SHIM).st_mode)


READ_STATUS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # an unbounded read fails fast
from kvmm.run import _read_status
print(_read_status(sys.argv[1]))
"""


@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "symlink-to-fifo", "huge", "digits"])
def test_the_guest_written_status_file_is_read_bounded_and_never_followed(kind: str, tmp_path: Path) -> None:
    # The run directory is shared read-write: the guest decides what "status" is (issue 19).
    status = tmp_path / "status"
    if kind == "symlink-to-dev-zero":
        status.symlink_to("/dev/zero")
    elif kind == "symlink-to-fifo":
        os.mkfifo(tmp_path / "fifo")
        status.symlink_to(tmp_path / "fifo")
    elif kind == "huge":
        status.write_bytes(b"1" * (1 << 20))
    else:
        status.write_text("3\n")
    try:
        res = subprocess.run([sys.executable, "-c", READ_STATUS, str(status)], capture_output=True, text=True,
                             timeout=20, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("reading the status file blocked")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == ("3" if kind == "digits" else "None")
