"""The server's fast paths observed for real: ``cachemode serve`` under strace, a libnbd client, and the bytes
checked on both sides (what the client reads back, what the image file holds)."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cachemode.disk import open_disk
from cachemode.nbd import constants as c
from cachemode.nbd.client import Client
from cachemode.nbd.server import EXT4_SUPER_MAGIC, filesystem_magic
from tests.interop.test_serve_cli import client_for
from tests.nbd.serving import MIB, ServeProcess, ThreadServer, nbdsh, need, need_libnbd_python, served
from tests.nbd.test_splice_writes import dirty_pages

pytestmark = pytest.mark.interop


def need_strace() -> None:
    need("strace")
    probe = subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("strace cannot trace here (ptrace not permitted)")


def traced(
    image: Path, trace: Path, calls: str, *args: str, env: dict[str, str] | None = None, unix: Path | None = None
) -> ServeProcess:
    return ServeProcess(
        [str(image), "--create", "16M", *args],
        prefix=["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(trace)],
        env=env,
        unix=unix,
    )


def run_script(srv: ServeProcess, script: str) -> str:
    """Run a libnbd script against ``srv``, then stop the server, which must exit cleanly; the script's output."""
    try:
        out = nbdsh(srv.uri, script).stdout
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    return out


# A page-cache read must not wait on the device in any buffered mode: O_DSYNC makes writes durable and
# leaves reads alone, and the write cache switched off makes writes FUA -- neither changes a read.
@pytest.mark.parametrize(
    "args",
    [["--cache", "writethrough"], ["--cache", "writeback", "--write-cache", "off"], ["--cache", "writeback"]],
    ids=["writethrough", "writeback-wc-off", "writeback"],
)
def test_buffered_reads_are_served_inline_in_every_buffered_mode(tmp_path: Path, args: list[str]) -> None:
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "preadv2,pread64,sendfile", *args)
    script = (
        "small = bytes(range(256)) * 16\n"
        "big = bytes(reversed(range(256))) * 4096\n"
        f"h.pwrite(small, {4 * MIB})\n"
        f"h.pwrite(big, {8 * MIB})\n"
        f"assert h.pread(4096, {4 * MIB}) == small\n"
        f"assert h.pread({MIB}, {8 * MIB}) == big\n"
        "print('ok')\n"
    )
    assert run_script(srv, script).strip() == "ok"
    text = trace.read_text()
    # The 4 KiB read: one preadv2 with RWF_NOWAIT in the event loop (a pool read would be a plain pread64).
    assert re.search(rf"preadv2\(\d+, .*iov_len=4096\}}\], 1, {4 * MIB}, RWF_NOWAIT\) = 4096", text), text
    assert not re.search(rf"pread64\(\d+, .*, 4096, {4 * MIB}\)", text), text
    # The 1 MiB read: straight from the image to the socket.
    assert re.search(rf"sendfile\(\d+, \d+, \[{8 * MIB}\] => \[\d+\], {MIB}\)", text), text
    assert image.read_bytes()[4 * MIB : 4 * MIB + 4096] == bytes(range(256)) * 16


def splice_calls(text: str) -> tuple[list[str], list[str]]:
    """(socket -> pipe, pipe -> image) splice lines of a trace."""
    into_pipe = re.findall(r"splice\(\d+, NULL, \d+, NULL, \d+, SPLICE_F_MOVE\|SPLICE_F_NONBLOCK\) = \d+", text)
    into_image = re.findall(r"splice\(\d+, NULL, \d+, \[\d+\], \d+, (?:0|SPLICE_F_MOVE)\) = \d+", text)
    return into_pipe, into_image


def test_large_plain_writes_are_spliced_and_flushed(tmp_path: Path) -> None:
    """libnbd writes 1 MiB and 300 KiB payloads: they reach the image by splice, read back intact, and the
    FLUSH after them syncs (the mode layer was told of writes it did not see)."""
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "splice,fdatasync,pwritev2", "--cache", "writeback")
    script = (
        "import random\n"
        "a = random.Random(1).randbytes(1 << 20)\n"
        "b = random.Random(2).randbytes(300 * 1024)\n"
        f"h.pwrite(a, {MIB})\n"
        f"h.pwrite(b, {3 * MIB} + 512)\n"
        "h.flush()\n"
        f"assert h.pread(len(a), {MIB}) == a\n"
        f"assert h.pread(len(b), {3 * MIB} + 512) == b\n"
    )
    run_script(srv, script)
    data = image.read_bytes()
    assert data[MIB : 2 * MIB] == random.Random(1).randbytes(MIB)
    assert data[3 * MIB + 512 : 3 * MIB + 512 + 300 * 1024] == random.Random(2).randbytes(300 * 1024)
    text = trace.read_text()
    into_pipe, into_image = splice_calls(text)
    assert into_pipe and into_image, text
    assert len(re.findall(r"\bfdatasync\(", text)) >= 1, text  # the FLUSH was not skipped


@pytest.mark.parametrize(
    ("args", "flags"),
    [(["--cache", "writeback"], "FUA"), (["--cache", "writethrough"], "0"), (["--cache", "none"], "0")],
    ids=["writeback-fua", "writethrough", "none"],
)
def test_writes_that_need_the_stack_are_not_spliced(tmp_path: Path, args: list[str], flags: str) -> None:
    """A FUA write, an O_DSYNC mode and O_DIRECT keep their durability path: no splice into the image."""
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "splice", *args)
    fua = "nbd.CMD_FLAG_FUA" if flags == "FUA" else "0"
    script = f"import os\na = os.urandom(1 << 20)\nh.pwrite(a, {MIB}, {fua})\nassert h.pread(len(a), {MIB}) == a\n"
    run_script(srv, script)
    assert splice_calls(trace.read_text()) == ([], []), trace.read_text()


def test_a_payload_in_many_small_segments_that_pauses_midway(tmp_path: Path) -> None:
    """A client that sends a 1 MiB payload in 1 KiB segments and stops halfway for a moment: the splice path
    waits for the socket, and the image gets exactly the payload; the next request is parsed as usual."""
    need_strace()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "splice,read", "--cache", "writeback")
    payload = bytes(range(256)) * 4096
    try:
        with client_for(srv.uri) as cl:
            header = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 7, 2 * MIB, len(payload))
            cl.sock.sendall(header)
            for pos in range(0, len(payload), 1024):
                cl.sock.sendall(payload[pos : pos + 1024])
                if pos == len(payload) // 2:
                    time.sleep(0.3)
            reply = cl.read_reply()
            assert (reply.error, reply.cookie) == (0, 7)
            assert cl.pread(len(payload), 2 * MIB) == payload
            cl.pwrite(b"after", 5)
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    data = image.read_bytes()
    assert data[2 * MIB : 3 * MIB] == payload
    assert data[5:10] == b"after"
    text = trace.read_text()
    into_pipe, into_image = splice_calls(text)
    assert into_pipe and into_image, text
    assert "EAGAIN" in text  # it did wait for the socket


def resident_pages(path: Path, offset: int, length: int) -> int:
    """How many pages of the range are in the page cache: mincore(2) on a private mapping of it, which faults
    none in (a private mapping, so that ctypes may take its address; nothing is written to it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(length // mmap.PAGESIZE)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    try:
        start = ctypes.c_char.from_buffer(m)
        failed = libc.mincore(ctypes.addressof(start), length, vec)
        del start
    finally:
        m.close()
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw)


def evict(path: Path, offset: int, length: int) -> None:
    """Sync the file and drop the range from the page cache, until mincore says it is gone: under load one
    POSIX_FADV_DONTNEED may leave pages that are briefly busy, and a read that hits would test nothing."""
    for _ in range(50):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if resident_pages(path, offset, length) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: pages at {offset} stay in the page cache after 50 evictions")


@pytest.mark.parametrize("uring", ["1", "0"], ids=["io_uring", "pool"])
@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
def test_reads_that_miss_the_page_cache(tmp_path: Path, mode: str, uring: str) -> None:
    """Data written, flushed and evicted from the page cache, then read by libnbd: each READ is probed once
    with RWF_NOWAIT, and each probe that misses is read with io_uring from the event loop (no pool thread's
    pread), or by the pool where io_uring is off; the bytes are right either way.

    A NOWAIT probe that misses starts the page's read, and on a fast device that read can finish within the
    probe, which then succeeds: so the reads are retried, evicted afresh, until some probe missed."""
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    env = {**os.environ, "CACHEMODE_NBD_URING": uring}
    srv = traced(image, trace, "io_uring_enter,pread64,preadv2", "--cache", mode, env=env)
    reads = ((0, 4096), (12288, 4096), (65536, 32768), (200000, 4096), (40960, 100000))
    wanted = {(4 << 20) + off for off, _ in reads}
    script = (
        f"import random\ndata = random.Random(3).randbytes(1 << 20)\nfor off, n in {reads!r}:\n"
        "    assert h.pread(n, (4 << 20) + off) == data[off : off + n], off\n"
    )
    try:
        nbdsh(srv.uri, "import random\nh.pwrite(random.Random(3).randbytes(1 << 20), 4 << 20)\n")
        for _ in range(20):
            evict(image, 4 * MIB, MIB)
            marker = len(trace.read_text())
            nbdsh(srv.uri, script)
            text = trace.read_text()[marker:]
            probes = re.findall(r"preadv2\(\d+, .*\], 1, (\d+), RWF_NOWAIT\) = (-?\d+)", text)
            probes = [(int(off), int(got)) for off, got in probes if int(off) in wanted]
            if any(got < 0 for _, got in probes):
                break
        else:
            pytest.fail("no NOWAIT probe missed the page cache in 20 rounds of eviction")
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    assert sorted(off for off, _ in probes) == sorted(wanted), text  # each READ probed once
    missed = {off for off, got in probes if got < 0}
    pool_reads = {int(off) for off in re.findall(r"pread64\(\d+, .*, \d+, (\d+)\)", text)} & wanted
    if uring == "1":
        # the server's ring submits without waiting (uvloop's own ring waits: ", n, n, IORING_ENTER_GETEVENTS")
        assert re.search(r"io_uring_enter\(\d+, [1-9]\d*, 0, 0,", text), text
        assert not pool_reads, text
    else:
        assert pool_reads == missed, text


def test_directsync_writes_go_through_native_aio_on_the_dsync_fd(tmp_path: Path) -> None:
    """directsync: the image fd is O_DIRECT|O_DSYNC, so plain and FUA writes alike are durable when the
    kernel completes them -- native AIO takes them (io_submit, no pool pwrite, no fdatasync) and libnbd
    reads back what it wrote."""
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "io_submit,pwrite64,pwritev,pwritev2,fdatasync", "--cache", "directsync")
    try:
        script = (
            "import random\n"
            "a = random.Random(4).randbytes(8192)\n"
            f"h.pwrite(a, {MIB})\n"
            f"assert h.pread(len(a), {MIB}) == a\n"
        )
        nbdsh(srv.uri, script)
        # libnbd sends no FUA where it is not advertised; the server accepts it anyway (docs/nbd.md)
        with client_for(srv.uri) as cl:
            b = random.Random(5).randbytes(65536)
            cl.pwrite(b, 2 * MIB, c.CMD_FLAG_FUA)
            assert cl.pread(len(b), 2 * MIB) == b
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    text = trace.read_text()
    assert len(re.findall(r"io_submit\(", text)) >= 2, text
    assert not re.search(r"\b(pwrite64|pwritev|pwritev2|fdatasync)\(", text), text
    data = image.read_bytes()
    assert data[MIB : MIB + 8192] == random.Random(4).randbytes(8192)
    assert data[2 * MIB : 2 * MIB + 65536] == random.Random(5).randbytes(65536)


def test_native_aio_submits_a_burst_in_one_call(tmp_path: Path) -> None:
    """libnbd sends 64 writes then 64 reads in bursts of 16 (cache=none): the server hands each burst it
    receives to the kernel in one io_submit (fewer calls than requests), and every byte reads back."""
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "io_submit", "--cache", "none")
    script = (
        "import random\n"
        "blocks = [random.Random(i).randbytes(4096) for i in range(64)]\n"
        "def burst(make):\n"
        "    for first in range(0, 64, 16):\n"
        "        for i in range(first, first + 16):\n"
        "            make(i)\n"
        "        while h.aio_in_flight() > 0:\n"
        "            h.poll(-1)\n"
        "burst(lambda i: h.aio_pwrite(blocks[i], i * 65536))\n"
        "bufs = [nbd.Buffer(4096) for _ in range(64)]\n"
        "burst(lambda i: h.aio_pread(bufs[i], i * 65536))\n"
        "assert [b.to_bytearray() for b in bufs] == blocks\n"
    )
    run_script(srv, script)
    counts = [int(n) for n in re.findall(r"io_submit\(0x[0-9a-f]+, (\d+),", trace.read_text())]
    assert sum(counts) == 128, counts
    assert len(counts) < 128 and max(counts) > 1, counts
    data = image.read_bytes()
    assert all(data[i * 65536 : i * 65536 + 4096] == random.Random(i).randbytes(4096) for i in range(64))


def test_a_stream_of_large_writes_is_spliced_by_the_c_loop(tmp_path: Path) -> None:
    """A client that streams 1 MiB WRITEs after a FUA one, with a bad one (past the end) among them: the
    server's C loop takes the plain ones whole from the socket (peeked headers), the core answers the bad one
    with its error and the FUA one goes through the stack; every payload lands where it belongs, and the FLUSH
    after them syncs."""
    need_strace()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "splice,recvfrom,fdatasync", "--cache", "writeback")
    payloads = [random.Random(i).randbytes(MIB) for i in range(8)]
    plan = (
        [(0, 0, c.CMD_FLAG_FUA)]
        + [(i, i * MIB, 0) for i in range(1, 5)]
        + [(5, 16 * MIB, 0), (6, 6 * MIB, 0), (7, 7 * MIB, 0)]
    )
    stream = b"".join(
        struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, c.CMD_WRITE, cookie, offset, MIB) + payloads[cookie]
        for cookie, offset, flags in plan
    )
    try:
        with client_for(srv.uri) as cl:
            sender = threading.Thread(target=cl.sock.sendall, args=(stream,))
            sender.start()
            got = {}
            for _ in plan:
                reply = cl.read_reply()
                got[reply.cookie] = reply.error
            sender.join()
            cl.flush()
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    assert got == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: c.ENOSPC, 6: 0, 7: 0}
    data = image.read_bytes()
    for cookie, offset, _ in plan:
        if cookie != 5:
            assert data[offset : offset + MIB] == payloads[cookie], cookie
    text = trace.read_text()
    assert re.search(r"recvfrom\(\d+, .*, 28, MSG_PEEK\|MSG_DONTWAIT, NULL, NULL\) = 28", text), text
    # The FLUSH synced after the last payload went into the image: the mode layer was told of the spliced writes.
    last_splice = max(m.start() for m in re.finditer(r"splice\(\d+, NULL, \d+, \[\d+\]", text))
    assert any(m.start() > last_splice for m in re.finditer(r"\bfdatasync\(", text)), text


def test_a_client_that_vanishes_inside_a_payload_the_c_loop_took(tmp_path: Path) -> None:
    """A whole 1 MiB WRITE, then the next one's header and half its payload, then the client is gone: the C loop
    waits for that payload to be whole; the end of the stream wakes it, it takes the header and hands the half
    payload on to the splicer, which sees the end of the stream -- the first payload is in the image, nothing of
    the second, and the server goes on serving.

    The C loop runs only when the first payload was spliced in one go; on a loaded machine the socket may run
    dry inside it (the splicer then finishes it on a wake-up and the core reads the next header), so the
    scenario is repeated, each time checked in full, until the C loop has taken the header (5 tries at most)."""
    need_strace()
    taken = re.compile(r"recvfrom\(\d+, .*, 28, MSG_DONTWAIT, NULL, NULL\) = 28")  # not a peek: the C loop took it
    first, second = random.Random(1).randbytes(MIB), random.Random(2).randbytes(MIB)
    for attempt in range(5):
        image = tmp_path / f"disk{attempt}.img"
        trace = tmp_path / f"trace{attempt}.txt"
        srv = traced(image, trace, "recvfrom", "--cache", "writeback")
        try:
            with client_for(srv.uri) as cl:
                cl.sock.sendall(
                    struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 0, MIB)
                    + first
                    + struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 2, 4 * MIB, MIB)
                    + second[: MIB // 2]
                )
                assert cl.read_reply().cookie == 1
            with client_for(srv.uri) as cl:  # still serving
                assert cl.pread(MIB, 0) == first
                assert cl.pread(MIB, 4 * MIB) == bytes(MIB)
        finally:
            rc, _, err = srv.stop(signal.SIGTERM)
        assert rc == 0, err
        assert image.read_bytes()[4 * MIB : 5 * MIB] == bytes(MIB)
        text = trace.read_text()
        if taken.search(text):
            return
    raise AssertionError(f"the C loop never took the second header in 5 tries; the last trace:\n{text}")


def test_after_a_spliced_write_the_next_one_is_awaited_whole_and_reading_is_handed_back(tmp_path: Path) -> None:
    """A streaming client: once a large WRITE was spliced, the server sleeps until the socket holds the next
    request (SO_RCVLOWAT: a header's worth, then header and payload) instead of being woken for every segment.
    Here the next payload stops halfway for a moment: no reply until it is whole, then one splice takes it.
    The low-water mark goes back to 1 before the transport reads again, so a lone small request that follows
    is answered (with the mark left up, it would never be)."""
    need_strace()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "setsockopt,splice", "--cache", "writeback")
    first, second = random.Random(5).randbytes(MIB), random.Random(6).randbytes(MIB)
    header = struct.Struct(">IHHQQI")
    try:
        with client_for(srv.uri) as cl:
            cl.pwrite(first, 0)  # spliced: the server now waits for whole requests
            cl.sock.sendall(header.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 8, 3 * MIB, MIB) + second[: MIB // 2])
            cl.sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # no reply before the payload is whole
                cl.sock.recv(1, socket.MSG_PEEK)
            cl.sock.settimeout(10)
            cl.sock.sendall(second[MIB // 2 :])
            reply = cl.read_reply()
            assert (reply.error, reply.cookie) == (0, 8)
            time.sleep(0.2)  # the server is waiting for a header now, then it is a lone READ of 4 KiB
            assert cl.pread(4096, 3 * MIB) == second[:4096]
            cl.flush()
    finally:
        rc, _, err = srv.stop(signal.SIGTERM)
    assert rc == 0, err
    data = image.read_bytes()
    assert data[:MIB] == first and data[3 * MIB : 4 * MIB] == second
    text = trace.read_text()
    marks = [int(n) for n in re.findall(r"SO_RCVLOWAT, \[(\d+)\]", text)]
    assert 28 + MIB in marks and marks[-1] == 1, marks
    # Once woken, the payload was all there: socket -> pipes in one call per pipe (a pipe whose slots fill says
    # EAGAIN, tried once more before the next pipe: at most two such), not one call per segment that came in.
    awaited = text[text.index(f"SO_RCVLOWAT, [{28 + MIB}]") :]
    awaited = awaited[: awaited.index("SO_RCVLOWAT", 20)]
    into_pipe = re.findall(r"splice\(\d+, NULL, \d+, NULL, \d+, SPLICE_F_MOVE\|SPLICE_F_NONBLOCK\) = (\S+)", awaited)
    moved = [int(n) for n in into_pipe if n != "-1"]
    assert sum(moved) == MIB and len(moved) <= 2 and len(into_pipe) <= 4, awaited


def test_on_a_unix_socket_large_writes_are_spliced_as_they_come(tmp_path: Path) -> None:
    """Over a Unix socket -- how QEMU reaches a server on its own host -- libnbd streams 1 MiB WRITEs, four in
    flight. Such a socket never holds a whole payload (only what the client's send buffer allows) and its poll
    ignores SO_RCVLOWAT, so the server must not wait for whole payloads there: it splices each as it comes,
    never raises the low-water mark, and a lone small READ after the stream is answered at once."""
    need_strace()
    need_libnbd_python()
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    srv = traced(image, trace, "setsockopt,splice", "--cache", "writeback", unix=tmp_path / "nbd.sock")
    script = (
        "import random\n"
        "blocks = [random.Random(i).randbytes(1 << 20) for i in range(12)]\n"
        "for i, block in enumerate(blocks):\n"
        "    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block)), i << 20)\n"
        "    while h.aio_in_flight() >= 4:\n"
        "        h.poll(-1)\n"
        "while h.aio_in_flight():\n"
        "    h.poll(-1)\n"
        "assert h.pread(4096, 5 << 20) == blocks[5][:4096]\n"
        "h.flush()\n"
        "print('ok')\n"
    )
    assert run_script(srv, script).strip() == "ok"
    data = image.read_bytes()
    for i in range(12):
        assert data[i * MIB : (i + 1) * MIB] == random.Random(i).randbytes(MIB), i
    text = trace.read_text()
    assert re.search(r"splice\(\d+, NULL, \d+, \[\d+\], \d+", text), text  # payloads went pipe -> image
    assert "SO_RCVLOWAT" not in text, text


@pytest.mark.parametrize("mapped", ["1", "0"], ids=["mapped", "pwrite"])
def test_small_writes_to_cached_pages_are_stored_through_the_mapped_image(tmp_path: Path, mapped: str) -> None:
    """libnbd fills 1 MiB (now in the page cache), then writes 64 blocks of 4 KiB into it in bursts of 16:
    the server stores them through its mapping of the image (mincore, no pwrite64 for most of them; with
    CACHEMODE_NBD_MAP=0 each is a pwrite64), the FLUSH syncs them, and the client and the image file hold
    every byte."""
    need_strace()
    need_libnbd_python()
    if mapped == "1" and on_filesystem(tmp_path) != EXT4_SUPER_MAGIC:
        pytest.skip("the image is mapped only on ext2/3/4, and the test directory is elsewhere")
    image = tmp_path / "disk.img"
    trace = tmp_path / "trace.txt"
    env = {**os.environ, "CACHEMODE_NBD_MAP": mapped}
    srv = traced(image, trace, "pwrite64,mincore,fdatasync", "--cache", "writeback", env=env)
    script = (
        "import random\n"
        f"h.pwrite(random.Random(9).randbytes(1 << 20), {4 * MIB})\n"
        "blocks = [random.Random(i).randbytes(4096) for i in range(64)]\n"
        "for first in range(0, 64, 16):\n"
        "    for i in range(first, first + 16):\n"
        f"        h.aio_pwrite(blocks[i], {4 * MIB} + i * 16384)\n"
        "    while h.aio_in_flight() > 0:\n"
        "        h.poll(-1)\n"
        "h.flush()\n"
        f"assert [h.pread(4096, {4 * MIB} + i * 16384) for i in range(64)] == blocks\n"
    )
    run_script(srv, script)
    data = image.read_bytes()
    assert all(
        data[4 * MIB + i * 16384 : 4 * MIB + i * 16384 + 4096] == random.Random(i).randbytes(4096) for i in range(64)
    )
    text = trace.read_text()
    pwritten = {int(off) - 4 * MIB for off in re.findall(r"pwrite64\(\d+, .*, 4096, (\d+)\)", text)}
    assert re.search(r"\bfdatasync\(", text), text  # the mode layer was told of the writes it did not see
    if mapped == "1":
        assert re.search(r"\bmincore\(", text), text
        assert len(pwritten) < 32, text  # a payload split across reads takes the one-by-one path: pwritten
    else:
        assert pwritten == {i * 16384 for i in range(64)}, text
        assert not re.search(r"\bmincore\(", text), text


def on_filesystem(path: Path) -> int | None:
    """The statfs magic of the filesystem ``path`` is on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return filesystem_magic(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("structured", [True, False])
def test_bursts_of_small_reads_are_served_by_the_fused_call_and_the_rest_by_the_core(
    tmp_path: Path, structured: bool
) -> None:
    """Bursts of 4 KiB READs, each burst in one segment, reach the fused call (``_serve_reads``): served, in the
    page cache, with the core never seeing them. A WRITE and a FLUSH in the middle of a burst, a READ that
    misses the page cache and a READ with a flag are left to the core -- the fused call stops before them --
    and every reply is right."""
    path = tmp_path / "d.img"
    content = random.Random(9).randbytes(4 * MIB)
    path.write_bytes(content)
    disk = open_disk(path)
    srv = ThreadServer(disk)
    try:
        if srv.server.nowait_fd is None:
            pytest.skip("RWF_NOWAIT reads do not work on this filesystem: no page-cache READ path")
        with Client("127.0.0.1", srv.port, structured=structured) as cl:
            assert cl.structured == structured
            header = struct.Struct(">IHHQQI")
            offsets = [4096 * random.Random(i).randrange(256) for i in range(16)]

            def burst(extra: bytes = b"", at: int = 8) -> dict[int, bytes]:
                reads = [header.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, k + 1, off, 4096) for k, off in enumerate(offsets)]
                cl.sock.sendall(b"".join(reads[:at]) + extra + b"".join(reads[at:]))
                got = {}
                for _ in range(len(offsets) + (2 if extra else 0)):
                    if structured:
                        reply = cl.read_reply()
                        assert reply.error == 0, reply
                        got[reply.cookie] = reply.data
                    else:  # a simple reply does not say whether data follows: the cookie does
                        magic, error, cookie = struct.unpack(">IIQ", cl._recv(16))
                        assert (magic, error) == (c.SIMPLE_REPLY_MAGIC, 0)
                        got[cookie] = cl._recv(4096) if cookie <= len(offsets) else b""
                return got

            assert burst() == {k + 1: content[off : off + 4096] for k, off in enumerate(offsets)}
            fused = srv.server.stats.fused_reads
            assert fused >= 8, fused  # the first burst's READs came in one segment or a few: most were fused
            new = random.Random(10).randbytes(4096)
            write = header.pack(c.REQUEST_MAGIC, 0, c.CMD_WRITE, 100, 3 * MIB, 4096) + new
            got = burst(write + header.pack(c.REQUEST_MAGIC, 0, c.CMD_FLUSH, 101, 0, 0), at=5)
            assert got[100] == b"" and got[101] == b""
            assert srv.server.stats.fused_reads > fused
            assert cl.pread(4096, 3 * MIB) == new
            assert cl.pread(4096, 4096, c.CMD_FLAG_DF if structured else 0) == content[4096:8192]
            evict(path, MIB, MIB)  # away from the page written through the mapped image, which stays
            assert cl.pread(4096, MIB + 8192) == content[MIB + 8192 : MIB + 12288]
    finally:
        srv.stop()
        disk.close()
    assert path.read_bytes()[3 * MIB : 3 * MIB + 4096] == new


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("mapped", ["1", "0"])
def test_large_writes_over_dirty_pages_are_received_into_the_mapped_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: str, transport: str
) -> None:
    """A client streams 1 MiB WRITEs over the same 4 MiB again and again without a FLUSH: the first round
    finds those pages clean and is spliced; once they are dirty, the payloads go straight into the server's
    mapping of the image (``stats.mapped_writes``; none with CACHEMODE_NBD_MAP=0): over TCP the C loop
    receives each one, whole in the socket, into it; over a Unix socket, which never holds a whole one, the
    splicer reads each from its pipes into it once all of it is there. Every round reads back as written, and
    the FLUSH at the end leaves none of those pages dirty."""
    if mapped == "1" and on_filesystem(tmp_path) != EXT4_SUPER_MAGIC:
        pytest.skip("the image is mapped only on ext2/3/4, and the test directory is elsewhere")
    monkeypatch.setenv("CACHEMODE_NBD_MAP", mapped)
    image = tmp_path / "disk.img"
    unix = tmp_path / "nbd.sock" if transport == "unix" else None
    with served(image, size=16 * MIB, unix=unix) as srv:
        probe = os.open(image, os.O_RDONLY)
        try:
            dirty_pages(probe, 0, 4 * MIB)  # skips where the kernel lacks cachestat(2)
            with Client(socket_path=str(unix)) if unix else client_for(srv.uri) as cl:
                for rnd in range(8):
                    payloads = [random.Random(rnd * 4 + i).randbytes(MIB) for i in range(4)]
                    stream = b"".join(
                        struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, i, i * MIB, MIB) + payloads[i]
                        for i in range(4)
                    )
                    sender = threading.Thread(target=cl.sock.sendall, args=(stream,))
                    sender.start()
                    assert sorted((r.cookie, r.error) for r in (cl.read_reply() for _ in range(4))) == [
                        (i, 0) for i in range(4)
                    ]
                    sender.join()
                    assert [cl.pread(MIB, i * MIB) for i in range(4)] == payloads, rnd
                    if rnd >= 2 and srv.server.stats.mapped_writes:
                        break
                cl.flush()
                assert dirty_pages(probe, 0, 4 * MIB) == 0  # the mode layer was told of the writes it did not see
        finally:
            os.close(probe)
        stored = srv.server.stats.mapped_writes
    assert image.read_bytes()[: 4 * MIB] == b"".join(payloads)
    if mapped == "1":
        assert stored > 0
    else:
        assert stored == 0
