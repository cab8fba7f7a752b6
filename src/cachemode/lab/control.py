"""The lab's control socket: ``cachemode lab power-cut|crash-process|status --control PATH``.

One JSON object per line each way over a Unix socket. Requests: ``{"cmd": "status"}``,
``{"cmd": "power-cut", "survivors": "worst"|"random", "seed": S}``, ``{"cmd": "crash-process"}``.
Replies: ``{"ok": true, ...status...}`` or ``{"ok": false, "error": "..."}``.

A server that serves the lab disk registers ``on_failure`` callbacks: they run after a power cut or a
process crash (the server drops its connections, as the real failure would).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable

from cachemode.errors import CachemodeError
from cachemode.lab.disk import LabDisk
from cachemode.unixsock import listen_owner_only


class ControlError(CachemodeError):
    """The control socket cannot be reached or answered with an error."""


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            try:
                request = json.loads(line)
                reply = {"ok": True, **self.server.dispatch(request)}
            except Exception as exc:  # reported to the client, never fatal to the server
                reply = {"ok": False, "error": str(exc)}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, lab: LabDisk, path: str) -> None:
        self.lab = lab
        self.path = path
        self.on_failure: list[Callable[[str], None]] = []
        if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlError(f"{path}: exists and is not a socket; not replacing it")
        super().__init__(path, _Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="lab-control", daemon=True)

    def server_bind(self) -> None:
        # Whoever can connect can cut the power: the socket is owner-only from the moment it exists.
        self.socket.close()
        self.socket = listen_owner_only(self.path, self.request_queue_size)

    def start(self) -> ControlServer:
        self.thread.start()
        return self

    def dispatch(self, request: dict[str, object]) -> dict[str, object]:
        cmd = request.get("cmd")
        if cmd == "status":
            return self.lab.status()
        if cmd == "power-cut":
            seed = request.get("seed")
            out = self.lab.power_cut(str(request.get("survivors", "worst")), None if seed is None else int(seed))
        elif cmd == "crash-process":
            out = self.lab.crash_process()
        else:
            raise ValueError(f"unknown command {cmd!r}")
        for hook in self.on_failure:
            hook(str(cmd))
        return out

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def send(path: str, request: dict[str, object], timeout: float = 30.0) -> dict[str, object]:
    """Send one request to a lab control socket and return its reply; errors become ControlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise ControlError(
            f"{path}: no such control socket (start cachemode serve ... --lab --control {path})"
        ) from None
    except OSError as exc:
        raise ControlError(f"{path}: cannot reach the lab control socket: {exc.strerror or exc}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: the control socket sent no valid reply") from None
    if not reply.get("ok"):
        raise ControlError(f"{path}: {reply.get('error', 'request failed')}")
    return reply
