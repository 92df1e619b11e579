"""The I/O thread's event loop: readers, writers (the control socket's pending answers),
and hold/release (a paused VM's device readers)."""

from __future__ import annotations

import socket

from kvmm.eventloop import EventLoop


def test_a_writer_is_called_while_its_fd_is_writable_and_coexists_with_its_reader() -> None:
    loop = EventLoop()
    a, b = socket.socketpair()
    calls: list[str] = []
    loop.add_reader(a.fileno(), lambda: calls.append("read") or a.recv(100), quiesce=False)
    loop.add_writer(a.fileno(), lambda: calls.append("write"))
    b.send(b"x")
    loop.run_once(0)
    assert calls == ["read", "write"]
    loop.remove_writer(a.fileno())
    calls.clear()
    loop.run_once(0)
    assert calls == [] and loop.has_reader(a.fileno())  # the reader stays
    loop.remove_reader(a.fileno())
    assert a.fileno() not in loop.selector.get_map()
    loop.close()
    a.close(), b.close()


def test_hold_stops_device_readers_but_not_writers_or_the_control_socket() -> None:
    loop = EventLoop()
    dev, dev_peer = socket.socketpair()
    ctl, ctl_peer = socket.socketpair()
    calls: list[str] = []
    loop.add_reader(dev.fileno(), lambda: calls.append("device") or dev.recv(100))
    loop.add_reader(ctl.fileno(), lambda: calls.append("control") or ctl.recv(100), quiesce=False)
    loop.add_writer(ctl.fileno(), lambda: calls.append("answer"))
    dev_peer.send(b"x"), ctl_peer.send(b"y")
    loop.hold()
    loop.run_once(0)
    assert calls == ["control", "answer"] and loop.has_reader(dev.fileno())
    loop.release()
    calls.clear()
    loop.remove_writer(ctl.fileno())
    loop.run_once(0)
    assert calls == ["device"]
    loop.close()
    for s in (dev, dev_peer, ctl, ctl_peer):
        s.close()


def test_removing_a_closed_fd_is_harmless() -> None:
    loop = EventLoop()
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda: None)
    a.close()
    loop.remove_reader(fd)
    loop.remove_writer(fd)
    loop.close()
    b.close()
