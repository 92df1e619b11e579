"""kernels/build.sh's progress, on a fake kernel source: a tarball whose Makefile prints
kbuild's lines ("  CC      x.o", "  LD      vmlinux.o", ...) and sleeps instead of
compiling. On a terminal the status line is rewritten at least every few seconds with
the phase, the objects compiled of the total and the elapsed time; elsewhere there is one
line per phase; make's output goes to the log, whose tail is shown when the build fails.
The real build (minutes) runs in tests/integration/test_linux.py through conftest's
kernel_dir."""

from __future__ import annotations

import io
import os
import pty
import re
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import default_signal_dispositions

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "kernels" / "build.sh"
OBJECTS = 40

MAKEFILE = """\
N := {n}
OBJS := $(foreach i,$(shell seq 1 $(N)),obj$(i).o)
.PHONY: tinyconfig olddefconfig
tinyconfig:
\t@echo '  HOSTCC  scripts/kconfig/conf.o'
\t@: > .config
olddefconfig:
\t@echo '  SYNC    include/config/auto.conf'
$(OBJS):
\t@if [ "$@" = "$(FAIL_AT)" ]; then echo "$@: error: made to fail"; exit 1; fi
\t@echo '  CC      $@'
\t@sleep {pause}
\t@touch $@
vmlinux.o: $(OBJS)
\t@echo '  LD      vmlinux.o'
\t@sleep 2.5
vmlinux: vmlinux.o
\t@echo '  LD      vmlinux'
\t@touch vmlinux
bzImage: vmlinux
\t@echo '  BUILD   arch/x86/boot/bzImage'
\t@mkdir -p arch/x86/boot && touch arch/x86/boot/bzImage
"""

MERGE_CONFIG = """\
#!/bin/sh
# merge_config.sh -m BASE FRAGMENT
cat "$3" >> "$2"
"""


def fake_source(path: Path, pause: float) -> Path:
    """An xz tarball of a linux-source-6.1 tree that builds OBJECTS fake objects."""
    files = {"linux-source-6.1/Makefile": (MAKEFILE.format(n=OBJECTS, pause=pause), 0o644),
             "linux-source-6.1/scripts/kconfig/merge_config.sh": (MERGE_CONFIG, 0o755)}
    with tarfile.open(path, "w:xz") as tar:
        for name, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return path


def build_env(tmp_path: Path, pause: float, **extra: str) -> dict[str, str]:
    return {**os.environ, "KVMM_CACHE": str(tmp_path / "cache"), "COLUMNS": "120",
            "KVMM_KERNEL_TARBALL": str(fake_source(tmp_path / "linux.tar.xz", pause)), **extra}


def test_not_on_a_terminal_one_line_per_phase(tmp_path: Path) -> None:
    res = subprocess.run([str(BUILD)], capture_output=True, text=True, env=build_env(tmp_path, 0.05), timeout=120)
    assert res.returncode == 0, res.stderr
    out = Path(res.stdout.splitlines()[-1])
    assert (out / "vmlinux").exists() and (out / "bzImage").exists()
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr
    phases = [re.sub(r"\(\d+:\d\d\)", "(T)", ln) for ln in lines if "] " in ln]
    assert phases == ["kernels/build.sh: [1/4] unpack", "kernels/build.sh: [2/4] configure (T)",
                      f"kernels/build.sh: [3/4] compile: {OBJECTS} objects (T)", "kernels/build.sh: [4/4] link (T)"]
    log = tmp_path / "cache" / f"{out.name}.log"
    assert any(str(log) in ln for ln in lines) and "  CC      obj1.o" in log.read_text()
    assert re.fullmatch(rf"kernels/build.sh: built {out} in \d+:\d\d", lines[-1])
    assert len(lines) == 7
    # The cache is used the second time.
    again = subprocess.run([str(BUILD)], capture_output=True, text=True, env=build_env(tmp_path, 0.05), timeout=60)
    assert again.stdout.splitlines()[-1] == str(out) and "cached kernel" in again.stderr


def test_on_a_terminal_the_status_line_moves_every_few_seconds(tmp_path: Path) -> None:
    master, slave = os.openpty()
    chunks: list[tuple[float, bytes]] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child side closed (EIO)
                return
            if not data:
                return
            chunks.append((time.monotonic(), data))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # 40 objects at 0.4 s on 2 jobs: about 8 s of compiling.
    proc = subprocess.run([str(BUILD)], stdout=subprocess.PIPE, stderr=slave, env=build_env(tmp_path, 0.4),
                          timeout=120)
    os.close(slave)
    reader.join(5)
    os.close(master)
    assert proc.returncode == 0
    text = b"".join(c for _, c in chunks).decode()
    # Progress of the compile, with the total from the dry run, then the link.
    seen = [int(n) for n in re.findall(rf"\[3/4\] compile    (\d+)/{OBJECTS} objects \(\d+%\), \d+:\d\d elapsed", text)]
    assert seen and min(seen) < OBJECTS // 2 and len(set(seen)) >= 3, text
    assert "about " in text and " left" in text  # the estimate
    assert re.search(r"\[4/4\] link       LD vmlinux\.o, \d+:\d\d elapsed", text), text
    assert re.search(r"\[3/4\] compile    \d+ objects in \d+:\d\d\r?\n", text)
    assert "built " in text
    # Status updates come every 2 s: no silence of more than 3.5 s from start to end.
    times = [t for t, _ in chunks]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 3.5, gaps


def test_a_failed_build_shows_the_log_tail(tmp_path: Path) -> None:
    env = build_env(tmp_path, 0.01, FAIL_AT="obj7.o")
    res = subprocess.run([str(BUILD)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1
    assert re.search(r"kernels/build.sh: make vmlinux bzImage failed after \d+:\d\d; the last lines of .*\.log:", res.stderr)
    assert "obj7.o: error: made to fail" in res.stderr
    assert not list((tmp_path / "cache").glob("kernel-*/vmlinux"))
    assert not list((tmp_path / "cache").glob("build-*"))  # the work tree is removed


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stopped_build_leaves_no_work_tree_and_no_make(tmp_path: Path, sig: signal.Signals, status: int) -> None:
    proc = subprocess.Popen([str(BUILD)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=build_env(tmp_path, 0.5), preexec_fn=default_signal_dispositions)
    log = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until make compiles
        logs = list((tmp_path / "cache").glob("kernel-*.log"))
        if logs and "  CC      obj" in logs[0].read_text():
            log = logs[0]
            break
        time.sleep(0.2)
    assert log is not None, "the fake build never started compiling"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert "kernels/build.sh: removing the unfinished build tree" in err
    assert not list((tmp_path / "cache").glob("build-*"))
    time.sleep(1)
    compiled = log.read_text().count("  CC      obj")
    time.sleep(1.5)
    assert log.read_text().count("  CC      obj") == compiled, "make went on compiling after the build was stopped"


def test_key_is_unchanged_without_a_tarball_override(tmp_path: Path) -> None:
    """The cache key hashes the source version, the recipe number and config.fragment
    only: a change to the progress display must not rebuild everyone's kernel."""
    env = {k: v for k, v in os.environ.items() if k != "KVMM_KERNEL_TARBALL"}
    env["KVMM_CACHE"] = str(tmp_path)
    res = subprocess.run([str(BUILD), "--print-dir"], capture_output=True, text=True, env=env, check=True)
    text = BUILD.read_text()
    recipe = re.search(r"^recipe=(\d+)$", text, re.M)
    assert recipe
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "linux-source-6.1"], capture_output=True,
                             text=True).stdout
    if not version:
        pytest.skip("linux-source-6.1 is not installed")
    import hashlib

    digest = hashlib.sha256(f"{version} recipe={recipe.group(1)}\n".encode() + (ROOT / "kernels" / "config.fragment").read_bytes())
    assert res.stdout.strip() == f"{tmp_path}/kernel-{digest.hexdigest()[:16]}"
