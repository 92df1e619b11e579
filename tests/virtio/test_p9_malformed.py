"""Malformed 9P messages: every length, count and offset field of every request kvmm
serves, set to the values that break parsers, and random messages (hypothesis). kvmm
answers each with an Rlerror or a well-formed reply, or drops it (no reply at all),
never raises, never waits; the device answers the next request."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmm.p9 import wire as W

from .p9_client import P9Client

# A valid request of each type, on the tree below (fid 0: root; 1: file.txt, open rw;
# 2: dir). The fields are then broken one at a time.
TEMPLATES: list[tuple[int, str, tuple]] = [  # type: ignore[type-arg]
    (W.TVERSION, "ds", (8192, W.VERSION)),
    (W.TAUTH, "dssd", (9, b"user", b"", 0)),
    (W.TATTACH, "ddssd", (9, W.NOFID, b"user", b"", 0)),
    (W.TFLUSH, "w", (1,)),
    (W.TWALK, "ddwss", (0, 9, 2, b"dir", b"sub")),
    (W.TREAD, "dqd", (1, 0, 100)),
    (W.TWRITE, "dqd", (1, 0, 4)),  # + 4 bytes of data
    (W.TCLUNK, "d", (2,)),
    (W.TREMOVE, "d", (2,)),
    (W.TSTATFS, "d", (0,)),
    (W.TLOPEN, "dd", (2, 0)),
    (W.TLCREATE, "dsddd", (2, b"new", 0o102, 0o644, 0)),
    (W.TSYMLINK, "dssd", (2, b"sl", b"target", 0)),
    (W.TMKNOD, "dsdddd", (2, b"nod", 0o100644, 0, 0, 0)),
    (W.TRENAME, "dds", (1, 2, b"moved")),
    (W.TREADLINK, "d", (1,)),
    (W.TGETATTR, "dq", (1, W.STATS_BASIC)),
    (W.TSETATTR, "dddddqqqqq", (1, W.ATTR_SIZE | W.ATTR_MTIME | W.ATTR_MTIME_SET, 0o644, 0, 0, 3, 1, 2, 3, 4)),
    (W.TXATTRWALK, "dds", (1, 9, b"")),
    (W.TXATTRCREATE, "dsqd", (1, b"user.x", 3, 0)),
    (W.TREADDIR, "dqd", (0, 0, 4096)),
    (W.TFSYNC, "dd", (1, 0)),
    (W.TLOCK, "dbdqqds", (1, 1, 0, 0, 10, 1, b"client")),
    (W.TGETLOCK, "dbqqds", (1, 1, 0, 10, 1, b"client")),
    (W.TLINK, "dds", (2, 1, b"hard")),
    (W.TMKDIR, "dsdd", (2, b"newdir", 0o755, 0)),
    (W.TRENAMEAT, "dsds", (0, b"file.txt", 2, b"renamed")),
    (W.TUNLINKAT, "dsd", (2, b"sub", 0)),
]
SIZES = {"b": 1, "w": 2, "d": 4, "q": 8}
BAD_INTS = {1: (0, 0xFF), 2: (0, 1, 0xFFFF), 4: (0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF), 8: (0, 1, 1 << 63, (1 << 64) - 1)}


def fields(fmt: str, values: tuple) -> list[tuple[int, int, str]]:  # type: ignore[type-arg]
    """(offset in the message, size, what) of each integer, string length and count."""
    out, pos = [], W.HEADER_SIZE
    for ch, value in zip(fmt, values):
        if ch in SIZES:
            out.append((pos, SIZES[ch], "count" if ch == "w" else "int"))
            pos += SIZES[ch]
        else:
            out.append((pos, 2, "strlen"))
            pos += 2 + len(value)
    return out


def mutations(mtype: int, fmt: str, values: tuple) -> list[tuple[str, bytes]]:  # type: ignore[type-arg]
    good = W.encode(mtype, 5, fmt, *values) + (b"data" if mtype == W.TWRITE else b"")
    good = struct.pack("<I", len(good)) + good[4:]
    out = []
    for size in (0, 1, 6, 7, len(good) - 1, len(good) + 1, 1 << 20, 0xFFFF_FFFF):
        out.append((f"size={size}", struct.pack("<I", size) + good[4:]))
    for cut in range(W.HEADER_SIZE, len(good)):
        fixed = struct.pack("<I", cut) + good[4:cut]
        out.append((f"truncated at {cut}", fixed))
    for offset, size, what in fields(fmt, values):
        current = int.from_bytes(good[offset : offset + size], "little")
        bad = set(BAD_INTS[size])
        if what == "strlen":
            bad |= {max(current - 1, 0), current + 1, len(good)}
        for value in sorted(bad):
            msg = good[:offset] + value.to_bytes(size, "little") + good[offset + size :]
            out.append((f"{what}@{offset}={value:#x}", msg))
    return out


def tree(root: Path) -> None:
    """The share's contents, afresh (the root itself stays: the server holds it open)."""
    root.mkdir(exist_ok=True)
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "file.txt").write_bytes(b"0123456789")
    (root / "sl0").symlink_to("file.txt")


def fresh(c: P9Client) -> None:
    c.version(65536)
    tree(Path(c.server.root))
    c.attach(0)
    c.walk(0, 1, b"file.txt")
    c.lopen(1, 0 if c.server.read_only else W.DOTL_RDWR)
    c.walk(0, 2, b"dir")


def check_reply(reply: bytes, mtype: int, what: str) -> None:
    if reply == b"":
        return  # dropped: no tag to answer
    size, rtype, tag = W.HEADER.unpack_from(reply)
    assert size == len(reply), what
    assert rtype in (W.RLERROR, mtype + 1), f"{what}: reply type {rtype}"
    if rtype == W.RLERROR:
        assert size == W.RLERROR_SIZE, what


@pytest.mark.parametrize("mtype,fmt,values", TEMPLATES, ids=[W.NAMES[t[0]] for t in TEMPLATES])
def test_every_field_of_every_request_broken(tmp_path: Path, mtype: int, fmt: str, values: tuple) -> None:  # type: ignore[type-arg]
    root = tmp_path / "share"
    tree(root)
    c = P9Client(root, read_only=False)
    fresh(c)
    cases = mutations(mtype, fmt, values)
    assert len(cases) > 10
    for what, message in cases:
        started = time.monotonic()
        check_reply(c.raw(message), mtype, what)
        assert time.monotonic() - started < 2, f"{what} took {time.monotonic() - started:.1f} s"
        fresh(c)  # the device answers the next requests (a new session each time)
    assert c.server.stats["requests"] > len(cases)
    c.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mtype=st.sampled_from(sorted(W.REQUESTS)) | st.integers(0, 255), body=st.binary(max_size=300),
       size_delta=st.sampled_from([0, 0, 0, -1, 1, 1000]), room=st.sampled_from([8192, 4096, 11, 10, 0]))
def test_random_messages_answer_or_drop(tmp_path_factory: pytest.TempPathFactory, mtype: int, body: bytes,
                                        size_delta: int, room: int) -> None:
    root = tmp_path_factory.mktemp("share")
    tree(root)
    c = P9Client(root, read_only=bool(len(body) % 2), msize=8192)
    fresh(c)
    message = struct.pack("<IBH", W.HEADER_SIZE + len(body) + size_delta, mtype, 7) + body
    reply = c.raw(message, reply_room=room)
    if room < W.RLERROR_SIZE:
        assert reply == b""
    check_reply(reply, mtype, f"type {mtype}")
    fresh(c)
    c.close()
