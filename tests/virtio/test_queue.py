"""Split virtqueue processing; negative tests are named after the rule they exercise."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmm.memory import GuestMemory
from kvmm.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VRING_AVAIL_F_NO_INTERRUPT,
    Chain,
    ChainError,
    Queue,
    QueueError,
    legacy_layout,
)

from .mock_queue import MockQueue

MEM_SIZE = 4 << 20
PFN = 0x10  # rings at 64 KiB
SIZE = 16


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(MEM_SIZE, check_available=False)


@pytest.fixture
def driver(mem: GuestMemory) -> MockQueue:
    return MockQueue(mem, PFN, SIZE, data_base=0x100000)


@pytest.fixture
def queue(mem: GuestMemory) -> Queue:
    q = Queue(SIZE)
    assert q.activate_legacy(mem, PFN)
    return q


def test_legacy_layout_aligns_used_ring_to_4096() -> None:
    desc, avail, used, total = legacy_layout(0x10000, 256)
    assert (desc, avail) == (0x10000, 0x10000 + 16 * 256)
    assert used == 0x10000 + 0x2000 and used % 4096 == 0  # 4096 + 518 bytes round up
    assert total == used + 6 + 8 * 256 - 0x10000


def test_chain_is_read_in_order_and_split_by_direction(driver: MockQueue, queue: Queue) -> None:
    a, b, c = driver.alloc(16, b"h" * 16), driver.alloc(512), driver.alloc(1)
    head = driver.build_chain([(a, 16, False), (b, 512, True), (c, 1, True)])
    driver.publish(head)
    chain = queue.pop()
    assert isinstance(chain, Chain) and chain.head == head
    assert [(d.addr, d.length) for d in chain.readable] == [(a, 16)]
    assert [(d.addr, d.length) for d in chain.writable] == [(b, 512), (c, 1)]
    assert queue.pop() is None


def test_indirect_descriptors(driver: MockQueue, queue: Queue) -> None:
    bufs = [(driver.alloc(16), 16, False), (driver.alloc(64), 64, True), (driver.alloc(1), 1, True)]
    head = driver.build_indirect_chain(bufs)
    driver.publish(head)
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert [(d.addr, d.length, d.is_write_only) for d in chain.descriptors] == bufs


def test_used_element_and_index(driver: MockQueue, queue: Queue) -> None:
    head = driver.build_chain([(driver.alloc(8), 8, True)])
    driver.publish(head)
    chain = queue.pop()
    assert chain is not None
    queue.push_used(chain.head, 8)
    driver.check_used(head, 8)


def test_used_element_is_written_before_used_index(mem: GuestMemory, driver: MockQueue, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    head = driver.build_chain([(driver.alloc(8), 8, True)])
    driver.publish(head)
    queue.pop()
    seen: list[tuple[int, int]] = []
    original = mem.write_u16

    def watch(gpa: int, value: int) -> None:
        if gpa == queue.used + 2:  # the used index: the element must already be there
            seen.append(struct.unpack("<II", mem.read(queue.used + 4, 8)))
        original(gpa, value)

    monkeypatch.setattr(mem, "write_u16", watch)
    queue.push_used(head, 5)
    assert seen == [(head, 5)]


def test_indices_wrap_at_16_bits(mem: GuestMemory, driver: MockQueue, queue: Queue) -> None:
    driver.start_indices_at(0xFFFE)
    queue.last_avail_idx = queue.used_idx = 0xFFFE
    heads = [driver.build_chain([(driver.alloc(4), 4, True)]) for _ in range(4)]
    driver.publish(*heads)
    for h in heads:
        chain = queue.pop()
        assert chain is not None and chain.head == h
        queue.push_used(h, 4)
    assert queue.pop() is None
    assert driver.used_idx() == 2
    assert driver.take_used() == [(h, 4) for h in heads]


def test_no_interrupt_flag_suppresses_interrupt(driver: MockQueue, queue: Queue) -> None:
    driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    driver.publish(driver.build_chain([(driver.alloc(4), 4, True)]))
    chain = queue.pop()
    assert chain is not None
    queue.push_used(chain.head, 0)
    assert not queue.needs_interrupt()
    driver.set_avail_flags(0)
    assert queue.needs_interrupt()


def test_notify_on_empty_overrides_no_interrupt(driver: MockQueue, queue: Queue) -> None:
    # 0.9.5 "VIRTIO_F_NOTIFY_ON_EMPTY": interrupt when the device runs out of buffers,
    # even with interrupts suppressed.
    queue.notify_on_empty = True
    driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    driver.publish(driver.build_chain([(driver.alloc(4), 4, True)]))
    chain = queue.pop()
    assert chain is not None
    queue.push_used(chain.head, 0)
    assert queue.needs_interrupt()


def test_event_idx_interrupts_only_when_used_event_is_crossed(driver: MockQueue, queue: Queue) -> None:
    queue.event_idx = True
    heads = [driver.build_chain([(driver.alloc(4), 4, True)]) for _ in range(4)]
    driver.publish(*heads)
    driver.set_used_event(2)  # the driver wants an interrupt once used idx passes 2
    for expected in (True, False, True, False):  # first always; then at idx 3 (> 2)
        chain = queue.pop()
        assert chain is not None
        queue.push_used(chain.head, 0)
        assert queue.needs_interrupt() is expected
    # The device published avail_event = last_avail_idx so the driver knows when to kick.
    assert driver.mem.read_u16(queue.used + 4 + 8 * SIZE) == 4


# --- hostile rings: each names the rule it exercises ------------------------------------
def test_avail_index_may_not_move_more_than_queue_size(driver: MockQueue, queue: Queue) -> None:
    driver.mem.write_u16(driver.avail + 2, SIZE + 1)
    with pytest.raises(QueueError, match="more than the queue size"):
        queue.pop()
    assert queue.broken and queue.pop() is None  # stopped until reset, no spinning


def test_avail_ring_head_must_be_inside_the_queue(driver: MockQueue, queue: Queue) -> None:
    driver.publish(SIZE)
    with pytest.raises(QueueError, match="outside the queue"):
        queue.pop()
    assert queue.broken


def test_next_must_be_inside_the_descriptor_table(driver: MockQueue, queue: Queue) -> None:
    driver.write_desc(0, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, SIZE)
    driver.publish(0)
    with pytest.raises(ChainError, match="outside a table") as exc:
        queue.pop()
    assert exc.value.head == 0 and not queue.broken


def test_descriptor_loop_ends_by_ttl(driver: MockQueue, queue: Queue) -> None:
    buf = driver.alloc(4)
    driver.write_desc(0, buf, 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, buf, 4, VIRTQ_DESC_F_NEXT, 0)
    driver.publish(0)
    with pytest.raises(ChainError, match="loop"):
        queue.pop()


def test_self_loop_ends_by_ttl(driver: MockQueue, queue: Queue) -> None:
    driver.write_desc(3, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 3)
    driver.publish(3)
    with pytest.raises(ChainError, match="loop"):
        queue.pop()


@pytest.mark.parametrize("addr,length", [(MEM_SIZE - 2, 4), (0xD000_0000, 16), (2**64 - 8, 16), (0, 2**32 - 1)])
def test_buffer_must_lie_in_guest_ram(driver: MockQueue, queue: Queue, addr: int, length: int) -> None:
    driver.write_desc(0, addr, length, 0, 0)
    driver.publish(0)
    with pytest.raises(ChainError, match="outside guest RAM"):
        queue.pop()


def test_total_chain_length_may_not_overflow(mem: GuestMemory) -> None:
    big = GuestMemory.allocate(3 << 30, check_available=False)  # sparse: never touched
    d = MockQueue(big, PFN, SIZE, data_base=0x100000)
    q = Queue(SIZE)
    assert q.activate_legacy(big, PFN)
    d.build_chain([(0x4000_0000, 0x8000_0000, True), (0x4000_0000, 0x8000_0000, True)])
    d.publish(0)
    with pytest.raises(ChainError, match="overflows"):
        q.pop()


def test_indirect_table_must_not_contain_indirect_descriptors(driver: MockQueue, queue: Queue) -> None:
    table = driver.alloc(32)
    driver.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, table=table)
    driver.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(ChainError, match="indirect descriptor inside an indirect table"):
        queue.pop()


def test_indirect_descriptor_must_not_have_next(driver: MockQueue, queue: Queue) -> None:
    table = driver.alloc(16)
    driver.write_desc(0, driver.alloc(4), 4, 0, table=table)
    driver.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    driver.publish(0)
    with pytest.raises(ChainError, match="NEXT"):
        queue.pop()


@pytest.mark.parametrize("length", [0, 15, 17])
def test_indirect_table_length_must_be_whole_descriptors(driver: MockQueue, queue: Queue, length: int) -> None:
    driver.write_desc(0, driver.alloc(64), length, VIRTQ_DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(ChainError, match="indirect table of"):
        queue.pop()


def test_indirect_table_next_must_stay_inside_the_table(driver: MockQueue, queue: Queue) -> None:
    table = driver.alloc(32)
    driver.write_desc(0, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 2, table=table)  # table has 2 entries
    driver.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(ChainError, match="outside a table of 2"):
        queue.pop()


def test_rings_outside_ram_are_refused_at_queue_pfn(mem: GuestMemory) -> None:
    q = Queue(256)
    assert not q.activate_legacy(mem, (MEM_SIZE >> 12) - 1)
    assert not q.ready
    assert not q.activate_legacy(mem, 0xFFFF_FFFF)


def test_queue_size_must_be_power_of_two() -> None:
    for bad in (0, 3, 100, 65536):
        with pytest.raises(ValueError):
            Queue(bad)


# --- property: any ring content ends, with only the documented outcomes -------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.lists(
        st.tuples(
            st.one_of(st.integers(0, MEM_SIZE), st.integers(0, 2**64 - 1)),
            st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
            st.integers(0, 7),
            st.integers(0, 2 * SIZE),
        ),
        min_size=SIZE,
        max_size=SIZE,
    ),
    ring=st.lists(st.integers(0, 2 * SIZE), min_size=SIZE, max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF),
    indirect_blob=st.binary(min_size=0, max_size=256),
)
def test_any_ring_content_terminates_with_documented_outcomes(
    mem: GuestMemory, table: list[tuple[int, int, int, int]], ring: list[int], avail_idx: int, indirect_blob: bytes
) -> None:
    q = Queue(SIZE)
    assert q.activate_legacy(mem, PFN)
    desc, avail, _, _ = legacy_layout(PFN << 12, SIZE)
    blob_addr = 0x200000
    mem.write(blob_addr, indirect_blob.ljust(256, b"\0"))
    for i, (addr, length, flags, nxt) in enumerate(table):
        if flags & VIRTQ_DESC_F_INDIRECT and i % 2:
            addr = blob_addr  # point some indirect descriptors at fuzzed tables
        mem.write(desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    for i, head in enumerate(ring):
        mem.write_u16(avail + 4 + 2 * i, head)
    mem.write_u16(avail + 2, avail_idx)
    outcomes = 0
    for _ in range(SIZE + 2):  # at most SIZE chains can be pending; then None or broken
        try:
            chain = q.pop()
        except ChainError as exc:
            assert 0 <= exc.head < SIZE
            outcomes += 1
            continue
        except QueueError:
            assert q.broken
            break
        if chain is None:
            break
        outcomes += 1
        assert 1 <= len(chain.descriptors) <= SIZE * 2
        for d in chain.descriptors:
            assert mem.contains(d.addr, d.length)
            assert not d.flags & VIRTQ_DESC_F_INDIRECT
    else:
        pytest.fail("pop() kept returning chains past the queue size")
    assert outcomes <= SIZE


def test_serve_queue_stops_at_its_budget_and_says_work_is_left(driver: MockQueue, queue: Queue) -> None:
    # One busy queue may not starve the others: a turn completes at most `budget` chains.
    from kvmm.virtio.device import serve_queue

    class Irq:
        lock = None
        signals: list[int] = []

        def signal_used(self, index: int) -> None:
            self.signals.append(index)

    heads = [driver.build_chain([(driver.alloc(4), 4, True)]) for _ in range(10)]
    driver.publish(*heads)
    irq = Irq()
    assert serve_queue(queue, 0, irq, "test", lambda chain: 4, budget=4) is True  # type: ignore[arg-type]
    assert [h for h, _ in driver.take_used()] == heads[:4]
    assert serve_queue(queue, 0, irq, "test", lambda chain: 4, budget=8) is False  # type: ignore[arg-type]
    assert [h for h, _ in driver.take_used()] == heads[4:]
