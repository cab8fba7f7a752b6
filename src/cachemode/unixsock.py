"""Unix sockets that only their owner can connect to, whatever the umask, with no moment when anyone else can.

A socket bound straight at its path takes the process's umask (0755 under 022, world-writable under 0), and a
chmod after bind(2) leaves a window in which another user can connect -- to the NBD socket, which owns the
disk, or to the lab's control socket, which can cut the power. Setting a temporary umask of 077 around bind would
close the window, but the umask belongs to the whole process: any other thread creating a file meanwhile (the
lab's control thread, the NBD server's pool) would get the wrong mode, and no lock can make every caller of
open(2) take part.

So the socket is bound in a fresh private directory (``mkdtemp`` makes it 0700: nobody else can reach anything
inside), made 0600 there, then renamed into place. rename(2) is atomic: the path either does not exist yet (or
is a stale socket) or is the finished owner-only socket. The private directory is made beside the target, so
the rename never crosses a filesystem, and removed at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile


def listen_owner_only(path: str, backlog: int = 128) -> socket.socket:
    """A ``SOCK_STREAM`` Unix socket listening at ``path`` with mode 0600.

    It listens before it appears at ``path``, so a client that waits for the path never finds it refusing.

    An existing socket at ``path`` (a stale one from an earlier run) is replaced; anything else is not
    (:class:`FileExistsError`), so a mistyped path cannot destroy a file.
    """
    target = os.path.abspath(path)
    if os.path.lexists(target) and not stat.S_ISSOCK(os.lstat(target).st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", path)
    private = tempfile.mkdtemp(prefix=".", dir=os.path.dirname(target))
    staged = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(staged)
        os.chmod(staged, 0o600)
        sock.listen(backlog)
        os.rename(staged, target)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        raise
    finally:
        os.rmdir(private)
    return sock
