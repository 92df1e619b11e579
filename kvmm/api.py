"""The control socket: JSON requests over a Unix stream socket (``--api-sock PATH``).

One request is one line of JSON, ``{"command": NAME, ...}``; each gets one line back,
``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE}``. A connection may send
several requests in turn. Commands (docs/snapshots.md, "The control socket"):

``status``    ``state`` (running, paused or stopped), uptime, vCPUs, memory size
``pause``     stop the vCPUs and the device work (see :meth:`Machine.pause`)
``resume``    continue after ``pause``
``snapshot``  ``{"path": DIR}``: write a snapshot directory (the VM pauses meanwhile)
``shutdown``  end the VM (kvmm exits with status 0)
``stats``     exits to kvmm by kind and device counters

The server runs on the machine's I/O thread, so a request never races device work, and
no client can stall that thread (non-blocking sockets, a bounded outbox per client, a
request of at most 64 KiB). The socket is created with mode 0600: whoever can connect
controls the VM.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Any

from .config import Outcome, VmResult
from .errors import ConfigError, KvmmError
from .ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from .vm import Machine

LOG = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10  # bytes of one request line, newline excluded (docs/snapshots.md)
OUTBOX_LIMIT = 1 << 20  # answers waiting for a client that does not read them; then it is dropped
LISTEN_BACKLOG = 128  # connections the kernel queues while the I/O thread is busy (a snapshot)
MAX_CLIENTS = 64  # connections served at once (each holds an fd); more wait in the listen queue
COMMANDS = ("status", "pause", "resume", "snapshot", "shutdown", "stats")


class ApiError(KvmmError):
    """A control-socket request that cannot be served (sent back as ``error``)."""


class _Client:
    """One connection: its unparsed input and its unsent answers."""

    __slots__ = ("sock", "fd", "inbox", "outbox", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbox = bytearray()  # the start of a request whose newline has not come yet
        self.outbox = bytearray()
        self.closed = False


class ApiServer:
    """The control socket on the machine's I/O thread. No client can hold that thread:
    sockets are non-blocking, answers wait in a per-client outbox of at most
    :data:`OUTBOX_LIMIT` bytes (a client that lets it fill is dropped), a request line
    may be at most :data:`MAX_REQUEST` bytes, and lines are split in place (each byte
    received is copied a bounded number of times, however many lines one read holds)."""

    def __init__(self, machine: Machine, path: str) -> None:
        self.machine = machine
        self.path = path
        self.log = RateLimitedLog(LOG)  # clients can repeat what they do at will, too
        _claim(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # a socket is made 0777 & ~umask: 0600, as documented
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise ConfigError(f"cannot create the control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        self.sock.listen(LISTEN_BACKLOG)
        self.clients: dict[int, _Client] = {}
        self._accepting = True
        machine.loop.add_reader(self.sock.fileno(), self._accept, quiesce=False)
        LOG.info("control socket at %s", path)

    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):  # everyone waiting, but a bounded turn
            if len(self.clients) >= MAX_CLIENTS:
                # The rest wait in the kernel's listen queue (connect() waits or fails
                # there, as with any busy server) until a client leaves: connections
                # without end must not use up kvmm's file descriptors (the disks', a
                # snapshot's). The listening socket is not watched meanwhile, or the
                # loop would spin on it.
                self.machine.loop.remove_reader(self.sock.fileno())
                self._accepting = False
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the VM goes on, the client is not served
                self.log.warning("control socket: cannot accept a connection: %s", exc.strerror)
                return
            conn.setblocking(False)
            client = _Client(conn)
            self.clients[client.fd] = client
            self.machine.loop.add_reader(client.fd, functools.partial(self._readable, client), quiesce=False)

    def _readable(self, client: _Client) -> None:
        if client.closed:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        self.take_input(client, data)

    def take_input(self, client: _Client, data: bytes) -> None:
        """Serve every complete request line in ``data`` (after what ``client`` sent
        before), keep the incomplete rest. A request longer than MAX_REQUEST is answered
        with an error and the connection closed (its end cannot be found reliably)."""
        inbox = client.inbox
        start = 0
        if inbox:
            # The partial request from before: only as much as can complete it is copied.
            nl = data.find(b"\n", 0, MAX_REQUEST + 1 - len(inbox))
            if nl < 0:
                inbox += data[: MAX_REQUEST + 1 - len(inbox)]
                if len(inbox) > MAX_REQUEST:
                    self._refuse_long(client)
                return
            inbox += data[:nl]
            line = bytes(inbox)
            inbox.clear()
            if not self._serve(client, line):
                return
            start = nl + 1
        view = memoryview(data)
        end = len(data)
        while start < end:
            nl = data.find(b"\n", start, start + MAX_REQUEST + 1)
            if nl < 0:
                if end - start > MAX_REQUEST:
                    self._refuse_long(client)
                else:
                    inbox += view[start:]
                break
            if not self._serve(client, view[start:nl]):
                return
            start = nl + 1
        self._flush(client)

    def _refuse_long(self, client: _Client) -> None:
        self._queue(client, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
        self._flush(client)
        self._drop(client)

    def _serve(self, client: _Client, line: bytes | memoryview) -> bool:
        """Answer one request line; False if the client was dropped meanwhile."""
        return self._queue(client, self.handle_line(line))

    def _queue(self, client: _Client, response: dict[str, Any]) -> bool:
        if client.closed:
            return False
        try:
            answer = json.dumps(response).encode()
        except (TypeError, ValueError) as exc:  # a kvmm bug: an answer JSON cannot carry
            self.log.exception("control socket: an answer could not be encoded")
            answer = json.dumps({"ok": False, "error": f"internal error: {exc!r}"}).encode()
        client.outbox += answer + b"\n"
        if len(client.outbox) > OUTBOX_LIMIT:
            self._flush(client)  # a client that reads as it sends keeps up
            if len(client.outbox) > OUTBOX_LIMIT:
                self.log.warning("control socket: a client left %d bytes of answers unread; dropped",
                                 len(client.outbox))
                self._drop(client)
                return False
        return True

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes now; the rest when it is writable again."""
        if client.closed:
            return
        out = client.outbox
        sent = 0
        try:
            while sent < len(out):
                n = client.sock.send(memoryview(out)[sent:])
                if n <= 0:
                    break
                sent += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the client went away
            self._drop(client)
            return
        del out[:sent]
        if out:
            self.machine.loop.add_writer(client.fd, lambda: self._flush(client))
        else:
            self.machine.loop.remove_writer(client.fd)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.machine.loop.remove_writer(client.fd)
        self.machine.loop.remove_reader(client.fd)
        self.clients.pop(client.fd, None)
        client.outbox.clear()
        client.inbox.clear()
        client.sock.close()
        if not self._accepting and len(self.clients) < MAX_CLIENTS and self.sock.fileno() >= 0:
            self._accepting = True
            self.machine.loop.add_reader(self.sock.fileno(), self._accept, quiesce=False)

    def handle_line(self, line: bytes | memoryview) -> dict[str, Any]:
        try:
            request = json.loads(line.tobytes() if isinstance(line, memoryview) else line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return {"ok": False, "error": "the request is not valid JSON"}
        try:
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ApiError('expected an object with a "command" string')
            return {"ok": True, **self.handle(request)}
        except KvmmError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a kvmm bug: report it, keep serving
            self.log.exception("control socket: %s failed", request.get("command"))
            return {"ok": False, "error": f"internal error: {exc!r}"}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        m = self.machine
        command = request["command"]
        if command not in COMMANDS:
            raise ApiError(f"unknown command {command!r:.40}: expected one of {', '.join(COMMANDS)}")
        allowed = {"command", "path"} if command == "snapshot" else {"command"}
        extra = set(request) - allowed
        if extra:
            raise ApiError(f"{command} takes no {', '.join(sorted(extra))}")
        if command == "status":
            return m.status()
        if m.stopped:
            raise ApiError("the VM has stopped")
        if command == "pause":
            m.pause()
        elif command == "resume":
            m.resume()
        elif command == "snapshot":
            path = request.get("path")
            if not isinstance(path, str) or not path:
                raise ApiError('snapshot needs "path": a directory to create')
            return m.snapshot(path)
        elif command == "shutdown":
            m.resume()  # parked vCPUs must see the stop
            m.stop(VmResult(Outcome.SHUTDOWN, "shut down through the control socket"))
        elif command == "stats":
            return {"exits": m.exit_report()}
        return {"state": m.status()["state"]}

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        self.machine.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _claim(path: str) -> None:
    """Remove a stale socket left by a kvmm that died; refuse one in use or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--api-sock {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ConfigError(f"--api-sock {path} is in use by a running kvmm")


def request(socket_path: str, command: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """Send one request to a kvmm control socket and return its JSON response
    (``request("/tmp/vm.sock", "snapshot", path="snap1")``). Raises OSError if the socket
    cannot be reached, TimeoutError if no answer comes within ``timeout`` seconds. A full
    listen queue (kvmm's I/O thread busy, a snapshot say) is waited out within ``timeout``."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        while True:
            try:
                s.connect(socket_path)
                break
            except BlockingIOError:  # EAGAIN: the listen queue is full, kvmm has not accepted yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kvmm did not accept the control connection within {timeout:g} s") from None
                time.sleep(0.05)
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = s.recv(65536)
            except socket.timeout:  # connected, but no answer yet
                raise TimeoutError(f"no answer to {command} within {timeout:g} s") from None
            if not chunk:
                raise OSError(f"kvmm closed the control connection without answering {command}")
            buf += chunk
    response = json.loads(buf.partition(b"\n")[0])
    if not isinstance(response, dict):
        raise OSError("the control socket answered with something other than a JSON object")
    return response
