"""A share is the security boundary: whatever the guest names, kvmm never opens, reads,
changes or creates anything outside the shared directory (docs/security.md). Every
test runs twice: with openat2 (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) and with the
O_NOFOLLOW fallback kvmm uses where the kernel lacks openat2."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from kvmm.p9 import hostfs
from kvmm.p9 import wire as W

from .p9_client import P9Client, P9Error

SECRET = b"outside the share"


@pytest.fixture(params=["openat2", "o_nofollow"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2" and not hostfs.openat2_available():
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(hostfs, "USE_OPENAT2", request.param == "openat2")
    return str(request.param)


@pytest.fixture
def layout(tmp_path: Path, resolution: str) -> tuple[Path, Path]:
    """share/ (a file, a directory, symlinks out of it) and outside/ with a secret."""
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "dir").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (share / "inside").write_bytes(b"inside")
    (share / "rel").symlink_to("../outside")
    (share / "abs").symlink_to(outside)
    (share / "rel_file").symlink_to("../outside/secret")
    (share / "abs_file").symlink_to(outside / "secret")
    (share / "dir" / "up").symlink_to("../..")
    return share, outside


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below ``path`` with its mode, mtime and contents (to show nothing changed)."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


def client(share: Path, read_only: bool) -> P9Client:
    c = P9Client(share, read_only=read_only)
    c.attach(0)
    return c


def refused(err: int | tuple[int, ...], fn, *args) -> None:  # type: ignore[no-untyped-def]
    errs = (err,) if isinstance(err, int) else err
    with pytest.raises(P9Error) as info:
        fn(*args)
    assert info.value.errno in errs, errno.errorcode.get(info.value.errno)


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
def test_dotdot_at_the_root_is_refused(layout: tuple[Path, Path], read_only: bool) -> None:
    share, outside = layout
    c = client(share, read_only)
    refused(errno.EACCES, c.walk, 0, 1, b"..")
    refused(errno.EACCES, c.walk, 0, 1, b"..", b"outside", b"secret")
    assert len(c.walk(0, 1, b"dir", b"..", b"..", b"outside")) == 2 and 1 not in c.server.fids
    refused(errno.EINVAL, c.attach, 5, b"../outside")
    c.close()


@pytest.mark.parametrize("link", [b"rel", b"abs"])
def test_symlink_to_a_directory_outside_is_not_followed(layout: tuple[Path, Path], link: bytes) -> None:
    share, outside = layout
    c = client(share, read_only=False)
    assert c.walk(0, 1, link)[0].type == W.QTSYMLINK
    refused(errno.ENOTDIR, c.walk, 1, 2, b"secret")
    assert len(c.walk(0, 2, link, b"secret")) == 1 and 2 not in c.server.fids
    refused(errno.ELOOP, c.lopen, 1)
    for request in ((W.TLCREATE, "dsddd", 1, b"planted", 0o2 | W.DOTL_CREATE, 0o644, 0),
                    (W.TMKDIR, "dsdd", 1, b"planted", 0o755, 0),
                    (W.TSYMLINK, "dssd", 1, b"planted", b"x", 0),
                    (W.TUNLINKAT, "dsd", 1, b"secret", 0),
                    (W.TRENAMEAT, "dsds", 0, b"inside", 1, b"planted")):
        refused(errno.ENOTDIR, c.rpc, *request)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"] and (outside / "secret").read_bytes() == SECRET
    c.close()


@pytest.mark.parametrize("link", [b"rel_file", b"abs_file"])
def test_symlink_to_a_file_outside_is_never_opened(layout: tuple[Path, Path], link: bytes) -> None:
    share, outside = layout
    before = snapshot(outside)
    c = client(share, read_only=False)
    c.walk(0, 1, link)
    refused(errno.ELOOP, c.lopen, 1)
    refused(errno.ELOOP, c.lopen, 1, W.DOTL_RDWR | W.DOTL_TRUNC)
    assert c.readlink(1) in (b"../outside/secret", str(outside / "secret").encode())  # the text, unresolved
    refused(errno.EOPNOTSUPP, c.rpc, W.TSETATTR, "dddddqqqqq", 1, W.ATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0)
    refused(errno.ELOOP, c.rpc, W.TSETATTR, "dddddqqqqq", 1, W.ATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)
    c.walk(0, 2)
    refused(errno.ELOOP, c.lcreate, 2, link, W.DOTL_RDWR | W.DOTL_TRUNC)  # O_CREAT never follows either
    assert snapshot(outside) == before
    c.close()


def test_symlink_up_the_tree_from_a_subdirectory_is_not_followed(layout: tuple[Path, Path]) -> None:
    share, _ = layout
    c = client(share, read_only=True)
    assert len(c.walk(0, 1, b"dir", b"up", b"outside")) == 2 and 1 not in c.server.fids
    c.close()


def test_names_with_a_slash_or_dotdot_are_refused_in_every_request(layout: tuple[Path, Path]) -> None:
    share, outside = layout
    before = snapshot(outside)
    c = client(share, read_only=False)
    c.walk(0, 1, b"inside")
    for name in (b"../outside/planted", b"dir/../../outside/planted", b"..", b"/tmp/planted", b"."):
        for request in ((W.TLCREATE, "dsddd", 0, name, 0o2 | W.DOTL_CREATE, 0o644, 0),
                        (W.TMKDIR, "dsdd", 0, name, 0o755, 0),
                        (W.TSYMLINK, "dssd", 0, name, b"x", 0),
                        (W.TMKNOD, "dsdddd", 0, name, stat.S_IFREG | 0o644, 0, 0, 0),
                        (W.TLINK, "dds", 0, 1, name),
                        (W.TRENAME, "dds", 1, 0, name),
                        (W.TRENAMEAT, "dsds", 0, b"inside", 0, name),
                        (W.TRENAMEAT, "dsds", 0, name, 0, b"stolen"),
                        (W.TUNLINKAT, "dsd", 0, name, 0)):
            refused(errno.EINVAL, c.rpc, *request)
    assert snapshot(outside) == before and (share / "inside").read_bytes() == b"inside"
    assert not (share / "stolen").exists()
    c.close()


def test_hard_link_out_of_the_share_is_refused(layout: tuple[Path, Path]) -> None:
    share, outside = layout
    before = snapshot(outside)
    c = client(share, read_only=False)
    c.walk(0, 1, b"inside")
    c.walk(0, 2, b"abs")  # a symlink to the outside directory, as the link's directory
    refused(errno.ENOTDIR, c.rpc, W.TLINK, "dds", 2, 1, b"stolen")
    c.walk(0, 3, b"abs_file")  # a symlink to an outside file, as the link's source
    c.rpc(W.TLINK, "dds", 0, 3, b"linked")  # links the symlink itself, inside the share
    assert os.readlink(share / "linked") == str(outside / "secret") and os.lstat(share / "linked").st_nlink == 2
    assert snapshot(outside) == before and os.stat(outside / "secret").st_nlink == 1
    c.close()


def test_rename_out_of_the_share_is_refused(layout: tuple[Path, Path]) -> None:
    share, outside = layout
    before = snapshot(outside)
    c = client(share, read_only=False)
    c.walk(0, 1, b"inside")
    c.walk(0, 2, b"rel")
    refused(errno.ENOTDIR, c.rpc, W.TRENAME, "dds", 1, 2, b"stolen")
    refused(errno.ENOTDIR, c.rpc, W.TRENAMEAT, "dsds", 0, b"inside", 2, b"stolen")
    refused(errno.ENOTDIR, c.rpc, W.TRENAMEAT, "dsds", 2, b"secret", 0, b"stolen")
    c.rpc(W.TRENAMEAT, "dsds", 0, b"rel", 0, b"rel2")  # renaming the link itself stays inside
    assert os.readlink(share / "rel2") == "../outside"
    assert snapshot(outside) == before and (share / "inside").read_bytes() == b"inside"
    c.close()


def _exchange() -> Callable[[Path, Path], None]:
    """renameat2(RENAME_EXCHANGE): two names swap atomically (neither is ever missing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> None:
        if libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return exchange


def test_symlink_swapped_for_a_directory_during_walks_never_leads_outside(layout: tuple[Path, Path]) -> None:
    # A host-side race (a process on the host, or a second guest sharing the directory):
    # share/d is swapped atomically, over and over, between a real directory holding
    # f = "inside" and a symlink to outside/ holding f = SECRET. The guest walks d/f (and
    # d/../d/f) and reads, over and over: it gets "inside" or an error, never SECRET.
    share, outside = layout
    (outside / "f").write_bytes(SECRET)
    (share / "d").mkdir()
    (share / "d" / "f").write_bytes(b"inside")
    (share / "other").symlink_to(outside)
    exchange = _exchange()
    stop = threading.Event()
    flips = [0]

    def flipper() -> None:
        while not stop.is_set():
            exchange(share / "d", share / "other")
            flips[0] += 1
            if flips[0] % 64 == 0:
                time.sleep(0)  # let the guest's side run in either state

    c = client(share, read_only=True)
    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    seen: dict[bytes, int] = {}
    deadline = time.monotonic() + 2
    try:
        for i in range(20000):
            if time.monotonic() > deadline:
                break
            for names in ((b"d", b"f"), (b"d", b"..", b"d", b"f")):
                try:
                    if len(c.walk(0, 1, *names)) != len(names):
                        seen[b"partial"] = seen.get(b"partial", 0) + 1
                        continue
                    c.lopen(1)
                    data = c.read(1, 0, 100)
                    seen[data] = seen.get(data, 0) + 1
                except P9Error as exc:
                    seen[errno.errorcode[exc.errno].encode()] = seen.get(errno.errorcode[exc.errno].encode(), 0) + 1
                finally:
                    if 1 in c.server.fids:
                        c.clunk(1)
    finally:
        stop.set()
        thread.join()
    print(f"\n{flips[0]} flips; outcomes: {seen}")
    assert SECRET not in seen
    assert seen.get(b"inside", 0) > 0 and flips[0] > 10  # the race was run, both ways
    c.close()


def test_a_path_longer_than_path_max_is_refused(layout: tuple[Path, Path]) -> None:
    share, _ = layout
    name = b"n" * 250
    fd = os.open(share, os.O_RDONLY)
    for _ in range(18):  # 18 x 251 bytes > 4096
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    c = client(share, read_only=True)
    walked = len(c.walk(0, 1, *([name] * 16)))
    assert walked == 16
    refused(errno.ENAMETOOLONG, c.walk, 1, 2, name, name)
    c.close()


def test_host_pseudo_file_systems_are_opaque(resolution: str) -> None:
    # The host's / as a share (kvmm run's root): /proc and /sys are visible as empty
    # directories (the guest mounts its own there), their contents never.
    c = client(Path("/"), read_only=True)
    for mount in (b"proc", b"sys"):
        c.walk(0, 1, mount)
        refused(errno.ENOENT, c.walk, 1, 2, b"self" if mount == b"proc" else b"kernel")
        c.lopen(1)
        assert c.readdir(1) == []
        c.clunk(1)
    assert len(c.walk(0, 2, b"proc", b"1", b"environ")) == 1 and 2 not in c.server.fids
    c.close()


def test_device_nodes_of_the_host_are_not_opened(resolution: str) -> None:
    c = client(Path("/"), read_only=True)
    c.walk(0, 1, b"dev", b"null")
    assert stat.S_ISCHR(c.getattr(1)["mode"])  # visible: the guest's own driver serves it
    refused(errno.EACCES, c.lopen, 1)
    c.close()
