"""virtio-9p and its 9P2000.L server, driven by a Python 9P client over the mock queue:
every message kvmm serves, with its errors (negative tests named after the rule)."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmm.errors import ShareError, SnapshotError
from kvmm.p9 import wire as W
from kvmm.p9.server import Limits
from kvmm.virtio import pci_legacy as L
from kvmm.virtio import p9 as P

from .p9_client import P9Client, P9Error


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """share/ with a file, a directory, symlinks, a FIFO; outside/ beside it."""
    share = tmp_path / "share"
    (share / "dir" / "deeper").mkdir(parents=True)
    (share / "file.txt").write_bytes(b"hello, 9p\n")
    (share / "dir" / "sub.txt").write_bytes(b"sub")
    (share / "big.bin").write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    (share / "link").symlink_to("file.txt")
    os.mkfifo(share / "fifo")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    return share


@pytest.fixture
def ro(tree: Path) -> P9Client:
    c = P9Client(tree, read_only=True)
    c.attach(0)
    yield c
    c.close()


@pytest.fixture
def rw(tree: Path) -> P9Client:
    c = P9Client(tree, read_only=False)
    c.attach(0)
    yield c
    c.close()


def expect_errno(err: int, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(P9Error) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"{errno.errorcode.get(info.value.errno)} instead of {errno.errorcode[err]}"


# --- the device ---------------------------------------------------------------------------------
def test_config_space_holds_the_mount_tag_and_offers_the_feature(tree: Path) -> None:
    c = P9Client(tree, version=False)
    assert c.driver.r(L.HOST_FEATURES, 4) & (1 << P.VIRTIO_9P_MOUNT_TAG)
    tag_len = c.driver.r(L.CONFIG, 2)
    assert tag_len == len(b"kvmmtest")
    assert bytes(c.driver.r(L.CONFIG + 2 + i, 1) for i in range(tag_len)) == b"kvmmtest"
    c.close()


def test_counters_report_walks_reads_and_fids(ro: P9Client) -> None:
    ro.cat(b"file.txt")
    n = ro.device.counters()
    assert n["walks"] == 1 and n["reads"] == 2 and n["read_bytes"] == 10 and n["fids"] == 1 and n["opens"] == 1


def test_a_vm_with_a_share_refuses_snapshots(ro: P9Client) -> None:
    with pytest.raises(SnapshotError, match="9p share"):
        ro.device.save_state()


def test_driver_reset_clunks_every_fid(ro: P9Client) -> None:
    ro.walk(0, 1, b"file.txt")
    ro.device.reset()
    assert ro.server.fids == {} and ro.server.msize == 0


def test_missing_share_directory_is_a_share_error(tmp_path: Path) -> None:
    from kvmm.config import ShareConfig

    with pytest.raises(ShareError, match="does not exist"):
        P.open_share(ShareConfig(str(tmp_path / "nope"), "t"), "9p0")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShareError, match="is not a directory"):
        P.open_share(ShareConfig(str(tmp_path / "f"), "t"), "9p0")


def test_sharing_a_host_pseudo_file_system_is_refused() -> None:
    from kvmm.config import ShareConfig

    with pytest.raises(ShareError, match="proc"):
        P.open_share(ShareConfig("/proc", "t"), "9p0")


# --- Tversion -----------------------------------------------------------------------------------
def test_version_negotiates_the_smaller_msize(tree: Path) -> None:
    c = P9Client(tree, version=False)
    assert c.version(8192) == (8192, W.VERSION)
    assert c.version(1 << 30) == (Limits().max_msize, W.VERSION)
    c.close()


def test_version_other_than_9p2000L_answers_unknown(tree: Path) -> None:
    c = P9Client(tree, version=False)
    assert c.version(8192, b"9P2000.u")[1] == b"unknown"
    expect_errno(errno.EPROTO, c.attach, 0)  # no session after "unknown"
    c.close()


def test_version_msize_below_4k_is_refused(tree: Path) -> None:
    c = P9Client(tree, version=False)
    expect_errno(errno.EINVAL, c.version, 1024)
    c.close()


def test_requests_before_version_are_refused(tree: Path) -> None:
    c = P9Client(tree, version=False)
    expect_errno(errno.EPROTO, c.attach, 0)
    c.close()


def test_version_starts_a_new_session_and_clunks_fids(ro: P9Client) -> None:
    ro.walk(0, 1, b"dir")
    ro.version(65536)
    expect_errno(errno.EBADF, ro.walk, 1, 2, b"sub.txt")


# --- Tattach, Tauth, Tflush, unknown messages -----------------------------------------------------
def test_attach_gives_the_root_qid(tree: Path) -> None:
    c = P9Client(tree)
    qid = c.attach(0)
    assert qid.type == W.QTDIR and qid.path == os.stat(tree).st_ino
    c.close()


def test_attach_with_aname_starts_below_the_root(tree: Path) -> None:
    c = P9Client(tree)
    assert c.attach(0, b"dir").path == os.stat(tree / "dir").st_ino
    expect_errno(errno.EINVAL, c.attach, 1, b"../outside")
    c.close()


def test_attach_to_a_fid_in_use_is_refused(ro: P9Client) -> None:
    expect_errno(errno.EEXIST, ro.attach, 0)


def test_auth_is_not_offered(ro: P9Client) -> None:
    expect_errno(errno.EOPNOTSUPP, ro.rpc, W.TAUTH, "dssd", 5, b"u", b"", 0)


def test_flush_answers_rflush(ro: P9Client) -> None:
    assert ro.rpc(W.TFLUSH, "w", 7) == b""


def test_unknown_message_type_answers_eopnotsupp(ro: P9Client) -> None:
    expect_errno(errno.EOPNOTSUPP, ro.rpc, 200, "d", 0)
    expect_errno(errno.EOPNOTSUPP, ro.rpc, W.TLERROR, "d", 0)
    expect_errno(errno.EOPNOTSUPP, ro.rpc, 124, "d", 0)  # 9P2000's Tstat is not 9P2000.L


# --- Twalk --------------------------------------------------------------------------------------------
def test_walk_returns_a_qid_per_name(ro: P9Client, tree: Path) -> None:
    qids = ro.walk(0, 1, b"dir", b"sub.txt")
    assert [q.type for q in qids] == [W.QTDIR, W.QTFILE]
    assert qids[1].path == os.stat(tree / "dir" / "sub.txt").st_ino
    assert ro.getattr(1)["size"] == 3


def test_walk_with_no_names_clones_the_fid(ro: P9Client) -> None:
    assert ro.walk(0, 1) == []
    assert ro.getattr(1)["qid"] == ro.getattr(0)["qid"]


def test_walk_to_the_same_fid_replaces_it(ro: P9Client) -> None:
    ro.walk(0, 1, b"dir")
    ro.walk(1, 1, b"sub.txt")
    assert ro.getattr(1)["size"] == 3


def test_walk_first_name_missing_is_enoent(ro: P9Client) -> None:
    expect_errno(errno.ENOENT, ro.walk, 0, 1, b"nope")
    assert 1 not in ro.server.fids


def test_walk_failing_later_returns_the_qids_so_far_and_no_new_fid(ro: P9Client) -> None:
    assert len(ro.walk(0, 1, b"dir", b"nope", b"x")) == 1
    assert 1 not in ro.server.fids


def test_walk_through_a_file_is_enotdir(ro: P9Client) -> None:
    ro.walk(0, 1, b"file.txt")
    expect_errno(errno.ENOTDIR, ro.walk, 1, 2, b"x")


def test_walk_through_a_symlink_is_refused(ro: P9Client) -> None:
    # The guest resolves symlinks itself (Treadlink); the server never walks through one.
    (Path(ro.server.root) / "dirlink").symlink_to("dir")
    ro.walk(0, 1, b"dirlink")
    assert ro.getattr(1)["qid"].type == W.QTSYMLINK
    expect_errno(errno.ENOTDIR, ro.walk, 1, 2, b"sub.txt")
    assert len(ro.walk(0, 3, b"dirlink", b"sub.txt")) == 1 and 3 not in ro.server.fids


def test_walk_names_must_be_single_components(ro: P9Client) -> None:
    for bad in (b"dir/sub.txt", b"", b".", b"a\0b", b"x" * 256):
        expect_errno(errno.ENAMETOOLONG if len(bad) > 255 else errno.EINVAL, ro.walk, 0, 1, bad)


def test_walk_of_more_than_16_names_is_refused(ro: P9Client) -> None:
    expect_errno(errno.EINVAL, ro.walk, 0, 1, *([b"dir"] * 17))


def test_walk_dotdot_goes_back_to_the_parent(ro: P9Client) -> None:
    qids = ro.walk(0, 1, b"dir", b"deeper", b"..", b"..")
    assert qids[-1] == ro.getattr(0)["qid"] and qids[-2].path == qids[0].path


def test_walk_dotdot_above_the_root_is_refused(ro: P9Client) -> None:
    expect_errno(errno.EACCES, ro.walk, 0, 1, b"..")
    assert len(ro.walk(0, 1, b"dir", b"..", b"..")) == 2 and 1 not in ro.server.fids


def test_walk_from_an_unknown_fid_is_ebadf(ro: P9Client) -> None:
    expect_errno(errno.EBADF, ro.walk, 42, 1, b"dir")


def test_walk_to_a_newfid_in_use_is_refused(ro: P9Client) -> None:
    ro.walk(0, 1, b"dir")
    expect_errno(errno.EEXIST, ro.walk, 0, 1, b"file.txt")


def test_fids_per_connection_are_bounded(tree: Path) -> None:
    c = P9Client(tree, limits=Limits(max_fids=3))
    c.attach(0)
    c.walk(0, 1)
    c.walk(0, 2)
    expect_errno(errno.EMFILE, c.walk, 0, 3, b"dir")
    c.clunk(2)
    c.walk(0, 3, b"dir")
    c.close()


# --- Tgetattr, Tstatfs, Treadlink --------------------------------------------------------------
def test_getattr_reports_the_host_attributes(ro: P9Client, tree: Path) -> None:
    ro.walk(0, 1, b"big.bin")
    got, st = ro.getattr(1), os.stat(tree / "big.bin")
    assert got["valid"] == W.STATS_BASIC
    assert (got["mode"], got["size"], got["uid"], got["nlink"], got["mtime"]) == (
        st.st_mode, st.st_size, st.st_uid, st.st_nlink, int(st.st_mtime))


def test_getattr_of_a_symlink_is_the_link_itself(ro: P9Client) -> None:
    ro.walk(0, 1, b"link")
    assert stat.S_ISLNK(ro.getattr(1)["mode"])


def test_getattr_of_an_unknown_fid_is_ebadf(ro: P9Client) -> None:
    expect_errno(errno.EBADF, ro.getattr, 9)


def test_statfs_reports_v9fs_and_the_host_block_counts(ro: P9Client, tree: Path) -> None:
    (ftype, bsize, blocks), _ = W.decode(ro.rpc(W.TSTATFS, "d", 0), "ddq")
    vfs = os.statvfs(tree)
    assert ftype == 0x01021997 and bsize == vfs.f_bsize and blocks == vfs.f_blocks


def test_readlink_returns_the_target_unresolved(ro: P9Client) -> None:
    (Path(ro.server.root) / "abs").symlink_to("/etc/passwd")
    ro.walk(0, 1, b"link")
    ro.walk(0, 2, b"abs")
    assert ro.readlink(1) == b"file.txt" and ro.readlink(2) == b"/etc/passwd"


def test_readlink_of_a_regular_file_is_einval(ro: P9Client) -> None:
    ro.walk(0, 1, b"file.txt")
    expect_errno(errno.EINVAL, ro.readlink, 1)


# --- Tlopen, Tread, Treaddir, Tclunk ------------------------------------------------------------
def test_read_zero_copy_layout_and_single_buffer(ro: P9Client, tree: Path) -> None:
    ro.open_path(1, b"big.bin")
    data = (tree / "big.bin").read_bytes()
    assert ro.read(1, 1000, 5000) == data[1000:6000]
    assert ro.read(1, 7, 300, zero_copy=False) == data[7:307]


def test_read_past_the_end_returns_no_data(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    assert ro.read(1, 100, 10) == b"" and ro.read(1, 7, 100) == b"9p\n"


def test_read_count_is_capped_below_msize(tree: Path) -> None:
    c = P9Client(tree, msize=8192)
    c.attach(0)
    c.open_path(1, b"big.bin")
    assert len(c.read(1, 0, 1 << 20)) == 8192 - W.IOHDRSZ
    c.close()


def test_read_count_is_capped_to_the_reply_buffers(ro: P9Client) -> None:
    ro.open_path(1, b"big.bin")
    body = ro.rpc(W.TREAD, "dqd", 1, 0, 60000, reply_room=111)
    assert struct.unpack_from("<I", body)[0] == 100


def test_read_of_a_fid_not_open_is_ebadf(ro: P9Client) -> None:
    ro.walk(0, 1, b"file.txt")
    expect_errno(errno.EBADF, ro.read, 1, 0, 10)
    expect_errno(errno.EBADF, ro.read, 77, 0, 10)


def test_read_of_an_open_directory_is_eisdir(ro: P9Client) -> None:
    ro.open_path(1, b"dir")
    expect_errno(errno.EISDIR, ro.read, 1, 0, 10)


def test_read_at_an_offset_past_2_63_is_einval(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    expect_errno(errno.EINVAL, ro.read, 1, 1 << 63, 10)


def test_lopen_of_a_symlink_is_eloop(ro: P9Client) -> None:
    ro.walk(0, 1, b"link")
    expect_errno(errno.ELOOP, ro.lopen, 1)


def test_lopen_of_a_fifo_is_eacces_and_does_not_block(ro: P9Client) -> None:
    ro.walk(0, 1, b"fifo")
    started = time.monotonic()
    expect_errno(errno.EACCES, ro.lopen, 1)
    assert time.monotonic() - started < 1


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_lopen_of_a_device_node_is_eacces(tree: Path) -> None:
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for read_only in (True, False):
        c = P9Client(tree, read_only=read_only)
        c.attach(0)
        c.walk(0, 1, b"null")
        expect_errno(errno.EACCES, c.lopen, 1)
        c.close()


def test_lopen_twice_is_ebadf(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    expect_errno(errno.EBADF, ro.lopen, 1)


def test_lopen_for_writing_on_a_read_only_share_is_erofs(ro: P9Client) -> None:
    ro.walk(0, 1, b"file.txt")
    for flags in (W.DOTL_WRONLY, W.DOTL_RDWR, W.DOTL_TRUNC, W.DOTL_APPEND):
        expect_errno(errno.EROFS, ro.lopen, 1, flags)
    assert (Path(ro.server.root) / "file.txt").read_bytes() == b"hello, 9p\n"


def test_lopen_of_a_directory_for_writing_is_eisdir(rw: P9Client) -> None:
    rw.walk(0, 1, b"dir")
    expect_errno(errno.EISDIR, rw.lopen, 1, W.DOTL_RDWR)


def test_readdir_lists_every_entry_with_dot_and_dotdot(ro: P9Client, tree: Path) -> None:
    ro.open_path(1)
    assert sorted(ro.listdir(1)) == sorted([b".", b"..", *(p.name.encode() for p in tree.iterdir())])


def test_readdir_pages_through_a_large_directory_by_offset(tree: Path) -> None:
    many = tree / "many"
    many.mkdir()
    names = {f"entry-{i:05d}-{'x' * 40}".encode() for i in range(3000)}
    for name in names:
        (many / name.decode()).touch()
    c = P9Client(tree, msize=8192)
    c.attach(0)
    c.open_path(1, b"many")
    calls_before = c.server.stats["readdirs"]
    assert set(c.listdir(1)) == names | {b".", b".."}
    assert c.server.stats["readdirs"] - calls_before > 10  # many small replies, none over msize
    c.close()


def test_readdir_entry_types_and_qids(ro: P9Client, tree: Path) -> None:
    ro.open_path(1)
    entries = {e[3]: e for e in ro.readdir(1)}
    assert entries[b"dir"][2] == 4 and entries[b"dir"][0].type == W.QTDIR
    assert entries[b"link"][2] == 10 and entries[b"link"][0].type == W.QTSYMLINK
    assert entries[b"file.txt"][0].path == os.stat(tree / "file.txt").st_ino
    assert entries[b".."][0] == ro.getattr(0)["qid"]  # the root's parent is not shown


def test_readdir_of_a_fid_not_open_is_ebadf(ro: P9Client) -> None:
    ro.walk(0, 1, b"dir")
    expect_errno(errno.EBADF, ro.readdir, 1)


def test_readdir_of_an_open_file_is_enotdir(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    expect_errno(errno.ENOTDIR, ro.readdir, 1)


def test_clunk_forgets_the_fid(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    ro.clunk(1)
    expect_errno(errno.EBADF, ro.read, 1, 0, 1)
    expect_errno(errno.EBADF, ro.clunk, 1)


def test_clunk_closes_the_host_descriptors(ro: P9Client) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for fid in range(1, 21):
        ro.open_path(fid, b"file.txt")
    assert len(os.listdir("/proc/self/fd")) >= before + 40
    for fid in range(1, 21):
        ro.clunk(fid)
    assert len(os.listdir("/proc/self/fd")) == before


# --- extended attributes, locks ---------------------------------------------------------------------
def test_xattrwalk_list_is_empty_and_named_attributes_are_enodata(ro: P9Client) -> None:
    size, = W.decode(ro.rpc(W.TXATTRWALK, "dds", 0, 5, b""), "q")[0]
    assert size == 0 and ro.read(5, 0, 100) == b""
    ro.clunk(5)
    expect_errno(errno.ENODATA, ro.rpc, W.TXATTRWALK, "dds", 0, 6, b"security.capability")


def test_xattrcreate_is_not_supported(rw: P9Client, ro: P9Client) -> None:
    expect_errno(errno.EOPNOTSUPP, rw.rpc, W.TXATTRCREATE, "dsqd", 0, b"user.x", 3, 0)
    expect_errno(errno.EROFS, ro.rpc, W.TXATTRCREATE, "dsqd", 0, b"user.x", 3, 0)


def _lock(c: P9Client, fid: int, ltype: int, start: int = 0, length: int = 0) -> int:
    return c.rpc(W.TLOCK, "dbdqqds", fid, ltype, 0, start, length, 1, b"guest")[0]


def test_lock_succeeds_and_a_conflict_answers_blocked(rw: P9Client, tree: Path) -> None:
    rw.open_path(1, b"file.txt", flags=W.DOTL_RDWR)
    assert _lock(rw, 1, W.LOCK_TYPE_WRLCK, 0, 4) == W.LOCK_SUCCESS
    assert _lock(rw, 1, W.LOCK_TYPE_UNLCK, 0, 4) == W.LOCK_SUCCESS
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); fcntl.lockf(f, fcntl.LOCK_EX, 4);"
                               " print('locked', flush=True); time.sleep(30)", str(tree / "file.txt")],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        assert _lock(rw, 1, W.LOCK_TYPE_WRLCK, 0, 4) == W.LOCK_BLOCKED  # answered at once, never waited for
        assert time.monotonic() - started < 1
        ltype, start, length, pid = W.decode(rw.rpc(W.TGETLOCK, "dbqqds", 1, W.LOCK_TYPE_WRLCK, 0, 4, 1, b"g"),
                                             "bqqd")[0]
        assert (ltype, start, length, pid) == (W.LOCK_TYPE_WRLCK, 0, 4, holder.pid)
    finally:
        holder.kill()
        holder.wait()
    ltype = W.decode(rw.rpc(W.TGETLOCK, "dbqqds", 1, W.LOCK_TYPE_WRLCK, 0, 4, 1, b"g"), "b")[0][0]
    assert ltype == W.LOCK_TYPE_UNLCK


def test_lock_of_a_fid_not_open_is_ebadf(ro: P9Client) -> None:
    expect_errno(errno.EBADF, _lock, ro, 0, W.LOCK_TYPE_RDLCK)


def test_lock_with_a_bad_type_answers_lock_error(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    assert _lock(ro, 1, 7) == W.LOCK_ERROR


# --- a read-write share -------------------------------------------------------------------------------
def test_lcreate_write_fsync_and_read_back(rw: P9Client, tree: Path) -> None:
    rw.walk(0, 1, b"dir")
    qid = rw.lcreate(1, b"new.txt", W.DOTL_RDWR, 0o640)
    assert qid.type == W.QTFILE and qid.path == os.stat(tree / "dir" / "new.txt").st_ino
    assert rw.write(1, 0, b"written by the guest") == 20
    assert rw.write(1, 8, b"BY") == 2
    rw.rpc(W.TFSYNC, "dd", 1, 0)
    assert (tree / "dir" / "new.txt").read_bytes() == b"written BY the guest"
    assert stat.S_IMODE(os.stat(tree / "dir" / "new.txt").st_mode) == 0o640
    assert rw.read(1, 8, 100) == b"BY the guest"


def test_lcreate_never_sets_setuid_or_setgid_on_the_host(rw: P9Client, tree: Path) -> None:
    rw.walk(0, 1)
    rw.lcreate(1, b"suid", W.DOTL_RDWR, 0o6755)
    assert stat.S_IMODE(os.stat(tree / "suid").st_mode) == 0o755


def test_lcreate_over_an_existing_symlink_is_eloop(rw: P9Client, tree: Path) -> None:
    (tree / "dangling").symlink_to(tree.parent / "outside" / "created-through-link")
    rw.walk(0, 1)
    expect_errno(errno.ELOOP, rw.lcreate, 1, b"dangling", W.DOTL_RDWR)
    assert not (tree.parent / "outside" / "created-through-link").exists()


def test_lcreate_exclusive_of_an_existing_file_is_eexist(rw: P9Client) -> None:
    rw.walk(0, 1)
    expect_errno(errno.EEXIST, rw.lcreate, 1, b"file.txt", W.DOTL_RDWR | W.DOTL_EXCL)


def test_write_to_a_fid_open_read_only_is_ebadf(rw: P9Client) -> None:
    rw.open_path(1, b"file.txt")
    expect_errno(errno.EBADF, rw.write, 1, 0, b"x")


def test_write_large_data_from_its_own_buffer(rw: P9Client, tree: Path) -> None:
    rw.open_path(1, b"big.bin", flags=W.DOTL_RDWR)
    payload = os.urandom(60000)
    assert rw.write(1, 4096, payload) == len(payload)
    assert (tree / "big.bin").read_bytes()[4096 : 4096 + 60000] == payload


def test_write_with_o_append_appends(rw: P9Client, tree: Path) -> None:
    rw.open_path(1, b"file.txt", flags=W.DOTL_WRONLY | W.DOTL_APPEND)
    rw.write(1, 0, b"more")
    assert (tree / "file.txt").read_bytes() == b"hello, 9p\nmore"


def test_lopen_with_truncate_empties_the_file(rw: P9Client, tree: Path) -> None:
    rw.open_path(1, b"file.txt", flags=W.DOTL_WRONLY | W.DOTL_TRUNC)
    assert (tree / "file.txt").read_bytes() == b""


def test_setattr_size_mode_times(rw: P9Client, tree: Path) -> None:
    rw.walk(0, 1, b"file.txt")
    valid = W.ATTR_SIZE | W.ATTR_MODE | W.ATTR_MTIME | W.ATTR_MTIME_SET | W.ATTR_ATIME | W.ATTR_ATIME_SET
    rw.rpc(W.TSETATTR, "dddddqqqqq", 1, valid, 0o4600, 0, 0, 5, 1000, 7, 2000, 9)
    st = os.stat(tree / "file.txt")
    assert st.st_size == 5 and stat.S_IMODE(st.st_mode) == 0o600  # no setuid
    assert st.st_mtime_ns == 2000 * 10**9 + 9 and st.st_atime_ns == 1000 * 10**9 + 7
    rw.rpc(W.TSETATTR, "dddddqqqqq", 1, W.ATTR_MTIME, 0, 0, 0, 0, 0, 0, 0, 0)  # "now"
    assert abs(os.stat(tree / "file.txt").st_mtime - time.time()) < 60


def test_setattr_mode_of_a_directory_and_the_root(rw: P9Client, tree: Path) -> None:
    rw.walk(0, 1, b"dir")
    rw.rpc(W.TSETATTR, "dddddqqqqq", 1, W.ATTR_MODE, 0o2750, 0, 0, 0, 0, 0, 0, 0)
    assert stat.S_IMODE(os.stat(tree / "dir").st_mode) == 0o2750  # setgid kept on a directory
    rw.rpc(W.TSETATTR, "dddddqqqqq", 0, W.ATTR_MODE, 0o755, 0, 0, 0, 0, 0, 0, 0)
    assert stat.S_IMODE(os.stat(tree).st_mode) == 0o755


def test_setattr_of_a_renamed_away_file_is_estale(rw: P9Client, tree: Path) -> None:
    rw.walk(0, 1, b"file.txt")
    os.rename(tree / "file.txt", tree / "moved.txt")  # behind the guest's back
    (tree / "file.txt").write_bytes(b"another file")
    expect_errno(errno.ESTALE, rw.rpc, W.TSETATTR, "dddddqqqqq", 1, W.ATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)
    assert (tree / "file.txt").read_bytes() == b"another file"


def test_mkdir_symlink_link_rename_unlink(rw: P9Client, tree: Path) -> None:
    qid = W.Qid(*struct.unpack_from("<BIQ", rw.rpc(W.TMKDIR, "dsdd", 0, b"made", 0o750, 0)))
    assert qid.type == W.QTDIR and stat.S_IMODE(os.stat(tree / "made").st_mode) == 0o750
    rw.rpc(W.TSYMLINK, "dssd", 0, b"sl", b"../../anywhere", 0)
    assert os.readlink(tree / "sl") == "../../anywhere"
    rw.walk(0, 1, b"file.txt")
    rw.walk(0, 2, b"made")
    rw.rpc(W.TLINK, "dds", 2, 1, b"hard")
    assert os.stat(tree / "made" / "hard").st_ino == os.stat(tree / "file.txt").st_ino
    rw.rpc(W.TRENAMEAT, "dsds", 0, b"file.txt", 2, b"renamed.txt")
    assert (tree / "made" / "renamed.txt").read_bytes() == b"hello, 9p\n"
    assert rw.getattr(1)["size"] == 10
    rw.lopen(1)  # fid 1 followed its file: its names from the root were updated
    assert rw.read(1, 0, 5) == b"hello"
    rw.rpc(W.TRENAME, "dds", 2, 0, b"made2")  # the directory itself, by fid
    assert (tree / "made2" / "hard").exists()
    rw.walk(2, 3, b"hard")
    rw.rpc(W.TUNLINKAT, "dsd", 2, b"hard", 0)
    assert not (tree / "made2" / "hard").exists()
    expect_errno(errno.EISDIR, rw.rpc, W.TUNLINKAT, "dsd", 0, b"made2", 0)
    expect_errno(errno.ENOTEMPTY, rw.rpc, W.TUNLINKAT, "dsd", 0, b"made2", W.AT_REMOVEDIR)
    rw.rpc(W.TUNLINKAT, "dsd", 2, b"renamed.txt", 0)
    rw.rpc(W.TUNLINKAT, "dsd", 0, b"made2", W.AT_REMOVEDIR)
    assert not (tree / "made2").exists()


def test_remove_unlinks_and_clunks_even_on_failure(rw: P9Client, ro: P9Client, tree: Path) -> None:
    rw.walk(0, 1, b"dir", b"sub.txt")
    rw.rpc(W.TREMOVE, "d", 1)
    assert not (tree / "dir" / "sub.txt").exists() and 1 not in rw.server.fids
    ro.walk(0, 1, b"file.txt")
    expect_errno(errno.EROFS, ro.rpc, W.TREMOVE, "d", 1)
    assert 1 not in ro.server.fids and (tree / "file.txt").exists()


def test_mknod_makes_regular_files_only(rw: P9Client, tree: Path) -> None:
    rw.rpc(W.TMKNOD, "dsdddd", 0, b"plain", stat.S_IFREG | 0o600, 0, 0, 0)
    assert (tree / "plain").is_file()
    for mode in (stat.S_IFCHR | 0o600, stat.S_IFBLK | 0o600, stat.S_IFIFO | 0o600, stat.S_IFSOCK | 0o600):
        expect_errno(errno.EPERM, rw.rpc, W.TMKNOD, "dsdddd", 0, b"special", mode, 1, 3, 0)
    assert not (tree / "special").exists()


MODIFYING = [
    ("lcreate", W.TLCREATE, "dsddd", (0, b"n", 0o2 | W.DOTL_CREATE, 0o644, 0)),
    ("symlink", W.TSYMLINK, "dssd", (0, b"n", b"t", 0)),
    ("mknod", W.TMKNOD, "dsdddd", (0, b"n", stat.S_IFREG | 0o644, 0, 0, 0)),
    ("rename", W.TRENAME, "dds", (1, 0, b"n")),
    ("renameat", W.TRENAMEAT, "dsds", (0, b"file.txt", 0, b"n")),
    ("unlinkat", W.TUNLINKAT, "dsd", (0, b"file.txt", 0)),
    ("mkdir", W.TMKDIR, "dsdd", (0, b"n", 0o755, 0)),
    ("link", W.TLINK, "dds", (0, 1, b"n")),
    ("setattr", W.TSETATTR, "dddddqqqqq", (1, W.ATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)),
    ("xattrcreate", W.TXATTRCREATE, "dsqd", (1, b"user.a", 1, 0)),
    ("remove", W.TREMOVE, "d", (1,)),
]


@pytest.mark.parametrize("name,mtype,fmt,args", MODIFYING, ids=[m[0] for m in MODIFYING])
def test_read_only_share_refuses_every_modifying_request_with_erofs(ro: P9Client, tree: Path, name: str, mtype: int,
                                                                    fmt: str, args: tuple) -> None:  # type: ignore[type-arg]
    ro.walk(0, 1, b"file.txt")
    before = sorted(p.name for p in tree.iterdir()), (tree / "file.txt").read_bytes()
    expect_errno(errno.EROFS, ro.rpc, mtype, fmt, *args)
    assert (sorted(p.name for p in tree.iterdir()), (tree / "file.txt").read_bytes()) == before


def test_read_only_share_refuses_write_with_erofs(ro: P9Client, tree: Path) -> None:
    ro.open_path(1, b"file.txt")
    expect_errno(errno.EROFS, ro.write, 1, 0, b"x")
    assert (tree / "file.txt").read_bytes() == b"hello, 9p\n"


def test_read_only_share_allows_fsync_and_locks(ro: P9Client) -> None:
    ro.open_path(1, b"file.txt")
    ro.rpc(W.TFSYNC, "dd", 1, 1)
    assert _lock(ro, 1, W.LOCK_TYPE_RDLCK) == W.LOCK_SUCCESS


# --- the transport's limits ----------------------------------------------------------------------------
def test_request_without_room_for_a_reply_is_dropped_unexecuted(rw: P9Client, tree: Path) -> None:
    message = W.encode(W.TMKDIR, 1, "dsdd", 0, b"never", 0o755, 0)
    assert rw.raw(message, reply_room=10) == b""
    assert not (tree / "never").exists() and rw.server.stats["dropped"] == 1
    rw.walk(0, 1, b"dir")  # and the device goes on


def test_request_shorter_than_a_header_is_dropped(ro: P9Client) -> None:
    assert ro.raw(b"\x05\x00\x00") == b""
    assert ro.server.stats["dropped"] == 1


def test_message_size_larger_than_msize_is_einval(tree: Path) -> None:
    c = P9Client(tree, msize=8192)
    c.attach(0)
    message = W.encode(W.TWALK, 3, "ddw", 0, 1, 0)
    reply = c.raw(struct.pack("<I", 9000) + message[4:] + bytes(9000))
    assert W.HEADER.unpack_from(reply)[1:] == (W.RLERROR, 3) and struct.unpack_from("<I", reply, 7)[0] == errno.EINVAL
    c.close()


def test_message_size_past_the_buffers_is_einval(ro: P9Client) -> None:
    message = W.encode(W.TCLUNK, 3, "d", 0)
    reply = ro.raw(struct.pack("<I", 100) + message[4:])
    assert struct.unpack_from("<BHI", reply, 4) == (W.RLERROR, 3, errno.EINVAL)
    assert 0 in ro.server.fids  # nothing executed


def test_twrite_count_larger_than_its_message_is_einval(rw: P9Client, tree: Path) -> None:
    rw.open_path(1, b"file.txt", flags=W.DOTL_RDWR)
    message = W.encode(W.TWRITE, 4, "dqd", 1, 0, 1000) + b"short"
    reply = rw.raw(message)
    assert struct.unpack_from("<BHI", reply, 4) == (W.RLERROR, 4, errno.EINVAL)
    assert (tree / "file.txt").read_bytes() == b"hello, 9p\n"


def test_one_turn_serves_at_most_budget_requests(ro: P9Client) -> None:
    # Other devices get the I/O thread after BUDGET requests; the rest waits for a later turn.
    message = W.encode(W.TGETATTR, 9, "dq", 0, W.STATS_BASIC)
    ro.mem.write(0x200000, message)
    heads = []
    for i in range(P.BUDGET * 2 + 5):
        heads.append(ro.q.build_chain([(0x200000, len(message), False), (0x400000 + 4096 * i, 4096, True)]))
    ro.q.publish(*heads)
    assert ro.device.process_queue(0) is True
    assert len(ro.q.take_used()) == P.BUDGET
    assert ro.device.process_queue(0) is True and ro.device.process_queue(0) is False
    assert len(ro.q.take_used()) == P.BUDGET + 5
