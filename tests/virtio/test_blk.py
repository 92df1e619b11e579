"""virtio-blk requests on a temporary raw image (virtio 0.9.5 Appendix D)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmm.errors import DiskError
from kvmm.memory import GuestMemory
from kvmm.virtio import blk as B
from kvmm.virtio import pci_legacy as L
from kvmm.virtio import device as vd
from kvmm.virtio.queue import VIRTQ_DESC_F_NEXT

from .harness import LegacyDriver
from .mock_queue import MockQueue

SECTORS = 2048  # 1 MiB image


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return p


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(16 << 20, check_available=False)


def make(image: Path, mem: GuestMemory, read_only: bool = False) -> tuple[LegacyDriver, MockQueue, B.RawDisk]:
    disk = B.RawDisk(str(image), read_only=read_only, serial="kvmm-test-serial-0123456789")
    drv = LegacyDriver(B.VirtioBlk(disk, mem), mem)
    drv.init()
    return drv, drv.queues[0], disk


def request(q: MockQueue, rtype: int, sector: int, data: list[tuple[int, bool]]) -> tuple[int, list[int], int]:
    """Build header + data + status; returns (head, data addresses, status address)."""
    hdr = q.alloc(16, struct.pack("<IIQ", rtype, 0, sector))
    addrs = [q.alloc(n) for n, _ in data]
    status = q.alloc(1, b"\xee")
    head = q.build_chain([(hdr, 16, False), *[(a, n, w) for a, (n, w) in zip(addrs, data)], (status, 1, True)])
    q.publish(head)
    return head, addrs, status


def test_config_space_reports_capacity_and_limits(image: Path, mem: GuestMemory) -> None:
    drv, _, _ = make(image, mem)
    cap, size_max, seg_max = struct.unpack("<QII", bytes(drv.r(L.CONFIG + i, 1) for i in range(16)))
    assert (cap, size_max, seg_max) == (SECTORS, B.SIZE_MAX, B.QUEUE_SIZE - 2)
    assert drv.r(L.CONFIG + 20, 4) == 512
    assert drv.r(L.HOST_FEATURES, 4) & (1 << B.VIRTIO_BLK_F_FLUSH)
    assert not drv.r(L.HOST_FEATURES, 4) & (1 << B.VIRTIO_BLK_F_RO)


def test_read_fills_guest_buffers_from_the_file(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    head, (a, b), status = request(q, B.VIRTIO_BLK_T_IN, 3, [(512, True), (1024, True)])
    drv.kick()
    q.check_used(head, 1536 + 1)
    expected = image.read_bytes()[3 * 512 : 3 * 512 + 1536]
    assert mem.read(a, 512) + mem.read(b, 1024) == expected
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_OK
    assert drv.isr() == L.ISR_QUEUE


def test_write_then_read_back_and_flush_reaches_the_file(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    head, (a,), status = request(q, B.VIRTIO_BLK_T_OUT, 10, [(1024, False)])
    mem.write(a, b"W" * 1024)
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_OK
    head, _, status = request(q, B.VIRTIO_BLK_T_FLUSH, 0, [])
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_OK
    with open(image, "rb") as f:  # a separate open file sees it
        f.seek(10 * 512)
        assert f.read(1024) == b"W" * 1024
    head, (r,), _ = request(q, B.VIRTIO_BLK_T_IN, 10, [(1024, True)])
    drv.kick()
    q.check_used(head, 1025)
    assert mem.read(r, 1024) == b"W" * 1024


def test_get_id_returns_serial(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    head, (a,), status = request(q, B.VIRTIO_BLK_T_GET_ID, 0, [(20, True)])
    drv.kick()
    q.check_used(head, 21)
    assert mem.read(a, 20) == b"kvmm-test-serial-012"
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_OK


def test_indirect_request(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    hdr = q.alloc(16, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 1))
    data, status = q.alloc(512), q.alloc(1)
    head = q.build_indirect_chain([(hdr, 16, False), (data, 512, True), (status, 1, True)])
    q.publish(head)
    drv.kick()
    q.check_used(head, 513)
    assert mem.read(data, 512) == image.read_bytes()[512:1024]


# --- requests that must fail, and the device goes on --------------------------------------
def test_unsupported_request_type_answers_unsupp(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    head, _, status = request(q, 99, 0, [])
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("sector,nbytes", [(SECTORS, 512), (SECTORS - 1, 1024), (2**64 - 1, 512), (2**63, 512)])
def test_out_of_range_sectors_answer_ioerr(image: Path, mem: GuestMemory, sector: int, nbytes: int) -> None:
    drv, q, _ = make(image, mem)
    head, _, status = request(q, B.VIRTIO_BLK_T_IN, sector, [(nbytes, True)])
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_IOERR


def test_device_must_not_write_read_only_disk(image: Path, mem: GuestMemory) -> None:
    before = image.read_bytes()
    drv, q, _ = make(image, mem, read_only=True)
    assert drv.r(L.HOST_FEATURES, 4) & (1 << B.VIRTIO_BLK_F_RO)
    head, (a,), status = request(q, B.VIRTIO_BLK_T_OUT, 0, [(512, False)])
    mem.write(a, b"X" * 512)
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


def test_read_into_device_readable_buffer_answers_ioerr(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    head, _, status = request(q, B.VIRTIO_BLK_T_IN, 0, [(512, False)])
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_IOERR


def test_partial_sector_answers_ioerr(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    head, _, status = request(q, B.VIRTIO_BLK_T_IN, 0, [(100, True)])
    drv.kick()
    q.check_used(head, 1)
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_IOERR


def test_request_without_status_byte_completes_with_len_0(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    hdr = q.alloc(16, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0))
    head = q.build_chain([(hdr, 16, False)])
    q.publish(head)
    drv.kick()
    q.check_used(head, 0)


def test_malformed_chain_completes_and_next_request_still_works(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    q.write_desc(0, q.alloc(16), 16, VIRTQ_DESC_F_NEXT, 0)  # self loop
    q.next_desc = 1
    q.publish(0)
    head, (a,), status = request(q, B.VIRTIO_BLK_T_IN, 0, [(512, True)])
    drv.kick()
    assert q.take_used() == [(0, 0), (head, 513)]
    assert mem.read_u8(status) == B.VIRTIO_BLK_S_OK


def test_avail_jump_marks_device_needs_reset(image: Path, mem: GuestMemory) -> None:
    drv, q, _ = make(image, mem)
    mem.write_u16(q.avail + 2, B.QUEUE_SIZE + 5)
    drv.kick()
    assert drv.r(L.STATUS, 1) & vd.STATUS_DEVICE_NEEDS_RESET
    assert q.used_idx() == 0


# --- the image file ---------------------------------------------------------------------------
def test_image_opened_read_write_is_locked_against_a_second_user(image: Path) -> None:
    first = B.RawDisk(str(image))
    with pytest.raises(DiskError, match="in use by another process"):
        B.RawDisk(str(image))
    with pytest.raises(DiskError, match="in use"):
        B.RawDisk(str(image), read_only=True)
    first.close()
    B.RawDisk(str(image)).close()


def test_read_only_users_share_the_image(image: Path) -> None:
    a, b = B.RawDisk(str(image), read_only=True), B.RawDisk(str(image), read_only=True)
    with pytest.raises(DiskError):
        B.RawDisk(str(image))
    a.close()
    b.close()


def test_missing_and_unwritable_images(tmp_path: Path, image: Path) -> None:
    with pytest.raises(DiskError, match="does not exist"):
        B.RawDisk(str(tmp_path / "nope.img"))
    with pytest.raises(DiskError, match="is a directory"):
        B.RawDisk(str(tmp_path))
    if os.geteuid() != 0:  # root may open a 0444 file read-write
        image.chmod(0o444)
        with pytest.raises(DiskError, match="add ,ro"):
            B.RawDisk(str(image))


# --- property: random requests never raise and always complete ------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reqs=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 4, 8, 3, 0xFFFFFFFF]),
            st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1)),
            st.lists(st.tuples(st.integers(0, 4096), st.booleans()), max_size=4),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_random_requests_complete_without_raising(image: Path, mem: GuestMemory, reqs) -> None:  # type: ignore[no-untyped-def]
    drv, q, disk = make(image, mem)
    heads = []
    for rtype, sector, data, status_len in reqs:
        hdr = q.alloc(16, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(q.alloc(max(n, 1)), n, w) for n, w in data]
        status = [(q.alloc(4), status_len, True)] if status_len else []
        heads.append(q.build_chain([(hdr, 16, False), *bufs, *status]))
    q.publish(*heads)
    drv.kick()
    used = q.take_used()
    assert [h for h, _ in used] == heads
    disk.close()
