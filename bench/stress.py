#!/usr/bin/env python3
"""Hostile clients against a live ``cachemode serve`` on 127.0.0.1, with the server's memory and a
well-behaved client's latency measured while they attack.

Scenarios (each starts its own server subprocess on a sparse image and stops it afterwards):

    pipeliners   N clients send a burst of 1 MiB READs and never read a reply; meanwhile a well-behaved client
                 reads 4 KiB at a time.  Prints the server's RSS at start, its peak (VmHWM), RSS 5 s after the
                 attackers left, the good client's 4 KiB latency (p50/p99/max) and how long a fresh client
                 takes to connect and read once during the attack.
    idle         M connections negotiate (GO) and then do nothing: RSS per idle connection, RSS after they
                 closed, and how many connections past ``--max-connections`` were refused.
    handshakes   S clients trickle their handshake one byte at a time; the good client's latency meanwhile and
                 how many of them the handshake limit dropped.
    sigterm      one client pipelines READs and never reads; SIGTERM: how long the server takes to exit.

Everything is bounded: fixed client counts, fixed durations, every socket closed and the server stopped at
the end (killed if it does not exit).  Wall-clock figures are noisy on a loaded machine: the load average is
printed with them.

    .venv/bin/python bench/stress.py                         # every scenario, cache none
    .venv/bin/python bench/stress.py --scenario pipeliners --cache writeback --clients 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cachemode.nbd import constants as c  # noqa: E402
from cachemode.nbd.client import Client  # noqa: E402

MIB = 1 << 20
REQUEST = struct.Struct(">IHHQQI")


def rss(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from /proc/PID/status, in bytes (VmRSS now, VmHWM the peak)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Served:
    """``cachemode serve`` as a subprocess on an ephemeral port; the options it was given."""

    def __init__(self, image: Path, cache: str, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "cachemode", "serve", str(image), "--cache", cache, "--port", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"nbd://127\.0\.0\.1:(\d+)/", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line!r} {self.proc.communicate()[1]}")
        self.port = int(match.group(1))
        self.pid = self.proc.pid

    def client(self, timeout: float = 30.0) -> Client:
        return Client("127.0.0.1", self.port, timeout=timeout)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM, wait; returns the seconds it took (killed after ``timeout``)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return time.monotonic() - start


def supports(option: str) -> bool:
    """Whether this ``cachemode serve`` has ``option`` (so the script also runs against older builds)."""
    out = subprocess.run(
        [sys.executable, "-m", "cachemode", "serve", "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    return option in out


@contextlib.contextmanager
def image_file(size: int) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cachemode-stress-") as tmp:
        path = Path(tmp) / "stress.img"
        with open(path, "wb") as f:
            f.truncate(size)
        yield path


class GoodClient(threading.Thread):
    """Reads 4 KiB at random offsets, one at a time, recording each round trip until stopped."""

    def __init__(self, srv: Served, size: int) -> None:
        super().__init__(daemon=True)
        self.client = srv.client(timeout=60)
        self.size = size
        self.latencies: list[float] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = 0x12345
        try:
            while not self.halt.is_set():
                rng = (rng * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
                offset = (rng >> 20) % (self.size // 4096) * 4096
                start = time.perf_counter()
                self.client.pread(4096, offset)
                self.latencies.append(time.perf_counter() - start)
                time.sleep(0.002)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)
        self.client.close()

    def report(self, what: str) -> str:
        lat = [x * 1000 for x in self.latencies]
        err = f" error={self.error!r}" if self.error else ""
        return (
            f"{what}: {len(lat)} 4 KiB reads, p50 {percentile(lat, 50):.2f} ms, p99 {percentile(lat, 99):.2f} ms, "
            f"max {max(lat, default=float('nan')):.2f} ms{err}"
        )


def pipeliner(srv: Served, count: int, size: int) -> Client:
    """A client that sends ``count`` 1 MiB READs in one burst and then reads nothing."""
    cl = srv.client()
    burst = b"".join(
        REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, i, (i * MIB) % (size - MIB), MIB) for i in range(count)
    )
    cl.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        cl.sock.send(burst)  # whatever the server takes; the rest is never sent
    return cl


def fresh_client_time(srv: Served) -> float:
    start = time.perf_counter()
    try:
        with srv.client(timeout=30) as cl:
            cl.pread(4096, 0)
    except OSError:
        return float("inf")
    return time.perf_counter() - start


def scenario_pipeliners(args: argparse.Namespace, image: Path) -> None:
    srv = Served(image, args.cache, args.serve_option)
    try:
        warm = srv.client()
        warm.pread(4096, 0)
        warm.close()
        time.sleep(0.5)
        start_rss = rss(srv.pid)
        good = GoodClient(srv, args.size)
        good.start()
        time.sleep(0.5)
        attackers = [pipeliner(srv, args.burst, args.size) for _ in range(args.clients)]
        peak_seen = 0
        deadline = time.monotonic() + args.hold
        fresh = float("nan")
        while time.monotonic() < deadline:
            peak_seen = max(peak_seen, rss(srv.pid))
            if fresh != fresh and time.monotonic() > deadline - args.hold / 2:
                fresh = fresh_client_time(srv)
            time.sleep(0.1)
        hwm = rss(srv.pid, "VmHWM")
        for cl in attackers:
            cl.sock.close()
        good.stop()
        left = time.monotonic()
        time.sleep(5)
        after = rss(srv.pid)
        print(
            f"pipeliners ({args.clients} clients x {args.burst} x 1 MiB READ, never reading, {args.hold:.0f} s, "
            f"cache={args.cache}): RSS start {mib(start_rss)}, peak {mib(max(hwm, peak_seen))} (VmHWM), "
            f"5 s after they left {mib(after)} ({mib(after - start_rss)} above start; measured "
            f"{time.monotonic() - left:.1f} s after)"
        )
        print("  " + good.report("well-behaved client during the attack"))
        print(f"  fresh client: connect + handshake + one 4 KiB read in {fresh * 1000:.1f} ms")
        p99 = percentile(good.latencies, 99) * 1000
        checks = [
            ("peak RSS < 512 MiB", max(hwm, peak_seen) < 512 * MIB),
            ("back within 64 MiB of the start 5 s after", after - start_rss < 64 * MIB),
            ("good client's 4 KiB p99 < 50 ms", p99 < 50),
        ]
        print("  goals (issue 10): " + "; ".join(f"{what}: {'met' if ok else 'MISSED'}" for what, ok in checks))
    finally:
        srv.stop()


def open_idle(port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections that negotiate with GO and then stay idle; returns them and how many the
    server refused (closed before or during the handshake)."""
    socks: list[socket.socket] = []
    refused = 0
    go = struct.pack(">I", 0) + struct.pack(">H", 0)
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            greeting = s.recv(18, socket.MSG_WAITALL)
            if len(greeting) < 18:
                raise ConnectionResetError
            s.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
            s.sendall(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(go)) + go)
            while True:
                hdr = s.recv(20, socket.MSG_WAITALL)
                if len(hdr) < 20:
                    raise ConnectionResetError
                _, _, rtype, length = struct.unpack(">QIII", hdr)
                if length:
                    s.recv(length, socket.MSG_WAITALL)
                if rtype == c.REP_ACK:
                    break
                if rtype & 0x80000000:
                    raise ConnectionResetError
        except OSError:
            refused += 1
            s.close()
            continue
        socks.append(s)
    return socks, refused


def scenario_idle(args: argparse.Namespace, image: Path) -> None:
    extra = list(args.serve_option)
    limit = supports("--max-connections")
    if limit:
        extra += ["--max-connections", str(args.idle)]
    srv = Served(image, args.cache, extra)
    socks: list[socket.socket] = []
    try:
        warm = srv.client()
        warm.pread(4096, 0)
        warm.close()
        time.sleep(0.5)
        start_rss = rss(srv.pid)
        socks, refused = open_idle(srv.port, args.idle)
        time.sleep(1)
        held = rss(srv.pid)
        extra_socks, over = open_idle(srv.port, 10) if limit else ([], 0)
        socks += extra_socks
        for s in socks:
            s.close()
        time.sleep(5)
        after = rss(srv.pid)
        opened = args.idle - refused
        per = (held - start_rss) / max(1, opened)
        print(
            f"idle ({opened} connections after GO, cache={args.cache}): RSS start {mib(start_rss)}, "
            f"with them {mib(held)} ({per / 1024:.1f} KiB each), 5 s after they closed {mib(after)}"
        )
        print(f"  goal (issue 10): under 64 KiB per idle connection: {'met' if per < 64 * 1024 else 'MISSED'}")
        if limit:
            print(f"  --max-connections {args.idle}: {over} of 10 connections past the limit refused")
    finally:
        for s in socks:
            s.close()
        srv.stop()


def scenario_handshakes(args: argparse.Namespace, image: Path) -> None:
    extra = list(args.serve_option)
    if supports("--max-connections"):
        extra += ["--max-connections", str(args.slow + 10)]  # room for all of them and the good client
    srv = Served(image, args.cache, extra)
    socks: list[socket.socket] = []
    try:
        start_rss = rss(srv.pid)
        good = GoodClient(srv, args.size)
        good.start()
        message = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE) + struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, 6) + bytes(6)
        for _ in range(args.slow):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.setblocking(False)
            socks.append(s)
        end = time.monotonic() + args.hold
        sent = 0
        while time.monotonic() < end and sent < len(message) - 1:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(message[sent : sent + 1])
            sent += 1
            time.sleep(0.5)
        peak = rss(srv.pid, "VmHWM")
        good.stop()
        time.sleep(max(0.0, 11 - (time.monotonic() - (end - args.hold))))  # past the 10 s handshake limit
        dropped = 0
        for s in socks:
            try:
                s.setblocking(True)
                s.settimeout(0.5)
                while True:
                    data = s.recv(65536)
                    if not data:
                        dropped += 1
                        break
            except (ConnectionResetError, BrokenPipeError):
                dropped += 1
            except OSError:
                pass
        print(
            f"handshakes ({args.slow} clients trickling a handshake one byte per 0.5 s): RSS start "
            f"{mib(start_rss)}, peak {mib(peak)}; {dropped} of {args.slow} dropped by the handshake limit"
        )
        print("  " + good.report("well-behaved client meanwhile"))
    finally:
        for s in socks:
            s.close()
        srv.stop()


def scenario_sigterm(args: argparse.Namespace, image: Path) -> None:
    extra = list(args.serve_option)
    if supports("--shutdown-timeout"):
        extra += ["--shutdown-timeout", str(args.shutdown_timeout)]
    srv = Served(image, args.cache, extra)
    attacker = pipeliner(srv, args.burst, args.size)
    try:
        time.sleep(1)
        took = srv.stop(timeout=60)
        told = f"--shutdown-timeout {args.shutdown_timeout}" if "--shutdown-timeout" in extra else "no option"
        print(f"sigterm with a client that never reads ({told}): the server exited {took:.1f} s after SIGTERM")
    finally:
        attacker.sock.close()
        srv.stop()


SCENARIOS = {
    "pipeliners": scenario_pipeliners,
    "idle": scenario_idle,
    "handshakes": scenario_handshakes,
    "sigterm": scenario_sigterm,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--cache", default="none", help="cache mode of the server (default none)")
    ap.add_argument("--clients", type=int, default=16, help="non-reading pipeliners (default 16)")
    ap.add_argument("--burst", type=int, default=256, help="1 MiB READs each pipeliner sends (default 256)")
    ap.add_argument("--hold", type=float, default=8.0, help="seconds an attack lasts (default 8)")
    ap.add_argument("--idle", type=int, default=2000, help="idle connections (default 2000)")
    ap.add_argument("--slow", type=int, default=500, help="slow-handshake clients (default 500)")
    ap.add_argument("--shutdown-timeout", type=float, default=2.0, help="passed to serve when it has the option")
    ap.add_argument("--size", type=int, default=1 << 30, help="image size in bytes (sparse; default 1 GiB)")
    ap.add_argument("--serve-option", action="append", default=[], help="extra option for serve (repeatable)")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with image_file(args.size) as image:
        for name, run in SCENARIOS.items():
            if args.scenario in (name, "all"):
                run(args, image)
                print(f"  load average: {os.getloadavg()}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
