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

The server runs on the machine's I/O thread, so a request never races device work. The
socket is created with mode 0600: whoever can connect controls the VM.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Any

from .config import Outcome, VmResult
from .errors import ConfigError, KvmmError

if TYPE_CHECKING:
    from .vm import Machine

LOG = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
COMMANDS = ("status", "pause", "resume", "snapshot", "shutdown", "stats")


class ApiError(KvmmError):
    """A control-socket request that cannot be served (sent back as ``error``)."""


class ApiServer:
    def __init__(self, machine: Machine, path: str) -> None:
        self.machine = machine
        self.path = path
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
        self.sock.listen(8)
        self.conns: dict[int, tuple[socket.socket, bytearray]] = {}
        machine.loop.add_reader(self.sock.fileno(), self._accept, quiesce=False)
        LOG.info("control socket at %s", path)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of file descriptors, say: the VM goes on, the client is not served
            LOG.warning("control socket: cannot accept a connection: %s", exc.strerror)
            return
        conn.setblocking(False)
        self.conns[conn.fileno()] = (conn, bytearray())
        self.machine.loop.add_reader(conn.fileno(), lambda: self._readable(conn), quiesce=False)

    def _readable(self, conn: socket.socket) -> None:
        _, buf = self.conns[conn.fileno()]
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if not self._reply(conn, self.handle_line(line)):
                return
        if len(buf) > MAX_REQUEST:
            self._reply(conn, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
            self._drop(conn)

    def _reply(self, conn: socket.socket, response: dict[str, Any]) -> bool:
        try:
            conn.settimeout(2.0)  # a client that does not read its answer is dropped
            conn.sendall(json.dumps(response).encode() + b"\n")
            conn.setblocking(False)
            return True
        except OSError:
            self._drop(conn)
            return False

    def _drop(self, conn: socket.socket) -> None:
        self.machine.loop.remove_reader(conn.fileno())
        self.conns.pop(conn.fileno(), None)
        conn.close()

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return {"ok": False, "error": "the request is not valid JSON"}
        try:
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ApiError('expected an object with a "command" string')
            return {"ok": True, **self.handle(request)}
        except KvmmError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a kvmm bug: report it, keep serving
            LOG.exception("control socket: %s failed", request.get("command"))
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
        for conn, _ in list(self.conns.values()):
            self._drop(conn)
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
    cannot be reached, TimeoutError if no answer comes within ``timeout`` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        buf = b""
        deadline = time.monotonic() + timeout
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
