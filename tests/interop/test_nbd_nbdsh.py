"""libnbd (nbdsh's Python binding) scripts against ``cachemode serve``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nbd.serving import nbdsh, need_libnbd_python, served

pytestmark = pytest.mark.interop


def test_structured_block_status_req_one_and_df(tmp_path: Path) -> None:
    need_libnbd_python()
    script = r"""
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_df()
h.pwrite(b"\xab" * 65536, 1 << 20)
seen = []
def cb(metacontext, offset, entries, err):
    seen.append((metacontext, offset, list(entries)))
h.block_status(4 << 20, 0, cb)
ctx, off, entries = seen[-1]
assert ctx == "base:allocation" and off == 0, seen
pairs = list(zip(entries[::2], entries[1::2]))
assert sum(n for n, _ in pairs) == 4 << 20
assert all(n > 0 for n, _ in pairs)
pos = 0
for n, flags in pairs:
    if pos <= (1 << 20) < pos + n:
        assert flags & 1 == 0, pairs   # the written range is data
    pos += n
# REQ_ONE: exactly one descriptor, no longer than the request
seen.clear()
h.block_status(4 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
entries = seen[-1][2]
assert len(entries) == 2 and 0 < entries[0] <= 4 << 20
assert entries[1] & 1 == 1, entries     # the start of the image is a hole
# DF: the read arrives as one chunk
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(65536, 1 << 20, chunk, nbd.CMD_FLAG_DF)
assert buf == b"\xab" * 65536
assert chunks == [(1 << 20, 65536, nbd.READ_DATA)], chunks
print("ok")
"""
    with served(tmp_path / "disk.img") as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"


def test_many_requests_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_libnbd_python()
    script = r"""
import os
N = 256
blobs = [os.urandom(4096) for _ in range(N)]
cookies = [h.aio_pwrite(blobs[i], i * 8192) for i in range(N)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for ck in cookies:
    assert h.aio_command_completed(ck)
bufs = [nbd.Buffer(4096) for _ in range(N)]
cookies = [h.aio_pread(bufs[i], i * 8192) for i in range(N)]
peak = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, ck in enumerate(cookies):
    assert h.aio_command_completed(ck)
    assert bufs[i].to_bytearray() == blobs[i], i
if h.can_flush():
    h.flush()
print("ok", peak)
"""
    for mode, aio in (("writeback", "1"), ("none", "1"), ("none", "0"), ("directsync", "1")):
        # none with AIO off: every O_DIRECT request goes through the disk stack on the thread pool
        monkeypatch.setenv("CACHEMODE_NBD_AIO", aio)
        with served(tmp_path / f"{mode}-{aio}.img", mode) as srv:
            assert (srv.server.aio is not None) == (aio == "1" and srv.disk.mode.direct)
            out = nbdsh(srv.uri, script).stdout.split()
            assert out[0] == "ok" and int(out[1]) > 1


def test_multi_conn_write_flush_read(tmp_path: Path) -> None:
    need_libnbd_python()
    script = r"""
assert h.can_multi_conn()
a = h
b = nbd.NBD(); b.connect_uri(sys.argv[1])
c = nbd.NBD(); c.connect_uri(sys.argv[1])
a.pwrite(b"\x5a" * 8192, 40960)      # completed (replied) on connection a
b.flush()                             # flush on another connection covers it
assert c.pread(8192, 40960) == b"\x5a" * 8192
print("ok")
"""
    with served(tmp_path / "disk.img") as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"
        assert srv.server.stats.flushes >= 1


def test_bad_input_with_strict_mode_relaxed(tmp_path: Path) -> None:
    need_libnbd_python()
    script = r"""
h.set_strict_mode(0)
size = h.get_size()
def expect(errno_name, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errno == errno_name, (fn.__name__, args[1:], e.errno, e.string)
        return
    raise AssertionError(f"{fn.__name__}{args[1:]} succeeded")
expect("EINVAL", h.pread, 512, size)                  # read past the end
expect("EINVAL", h.pread, 512, size - 256)            # read straddling the end
expect("ENOSPC", h.pwrite, b"x" * 512, size - 256)    # write past the end: payload consumed
expect("ENOSPC", h.zero, 4096, size)
expect("EINVAL", h.trim, 4096, size)
expect("EINVAL", h.pread, 0, 0)                       # zero length
expect("EINVAL", h.pread, 512, 0, 1 << 7)             # unknown command flag
expect("EINVAL", h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_REQ_ONE)  # inapplicable flag
expect("EOVERFLOW", h.pread, (32 << 20) + 512, 0)     # oversized READ
expect("EINVAL", h.pwrite, b"y" * ((32 << 20) + 512), 0)  # oversized WRITE, 32 MiB payload skipped
# the connection is still usable, and nothing was written by the rejected requests
assert h.pread(512, 0) == bytes(512)
assert h.pread(256, size - 256) == bytes(256)
h.pwrite(b"z" * 512, 4096)
assert h.pread(512, 4096) == b"z" * 512
print("ok")
"""
    with served(tmp_path / "disk.img") as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"


def test_read_only_export_eperm(tmp_path: Path) -> None:
    need_libnbd_python()
    script = r"""
h.set_strict_mode(0)
for fn, args in ((h.pwrite, (b"x" * 512, 0)), (h.trim, (512, 0)), (h.zero, (512, 0))):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errno == "EPERM", e.errno
    else:
        raise AssertionError("write accepted on a read-only export")
assert h.pread(512, 0) == bytes(512)
print("ok")
"""
    with served(tmp_path / "disk.img", read_only=False):
        pass  # create the image
    with served(tmp_path / "disk.img", read_only=True) as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"


def test_flush_answered_in_writethrough_and_fast_zero(tmp_path: Path) -> None:
    need_libnbd_python()
    script = r"""
h.set_strict_mode(0)
assert not h.can_flush() and not h.can_fua()
h.pwrite(b"q" * 4096, 0)
h.flush()                                  # sent anyway: answered with success
h.pwrite(b"r" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"r" * 4096
if h.can_fast_zero():
    try:
        h.zero(65536, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e.errno
h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 0) == bytes(4096)
print("ok")
"""
    with served(tmp_path / "disk.img", "writethrough") as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"


@pytest.mark.parametrize("mode", ["writeback", "none"])
def test_simple_replies_small_and_large_reads(tmp_path: Path, mode: str) -> None:
    """A client that declines structured replies gets simple replies: small reads (header and data in one
    buffer from the page cache) and large ones (sent separately) must both arrive intact."""
    need_libnbd_python()
    script = r"""
import os
h.shutdown()
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
for size, offset in ((512, 0), (4096, 8192), (65536 - 512, 1 << 20), (256 * 1024, 3 << 20)):
    blob = os.urandom(size)
    h.pwrite(blob, offset)
    assert h.pread(size, offset) == blob, (size, offset)
    assert h.pread(size, offset) == blob, (size, offset)   # now certainly a page-cache hit
assert h.pread(4096, 10 << 20) == bytes(4096)
print("ok")
"""
    with served(tmp_path / "disk.img", mode) as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == "ok"
