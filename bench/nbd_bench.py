#!/usr/bin/env python3
"""Benchmark ``cachemode serve`` against qemu-nbd and nbdkit's file plugin with the same fio jobs.

For each cache mode, each server in turn serves the same raw image (filled with random data, so reads hit
data, not holes) on loopback TCP, and fio with ``ioengine=nbd`` runs:

    randread  4 KiB  iodepth 16      randwrite 4 KiB  iodepth 16
    read      1 MiB  iodepth 4       write     1 MiB  iodepth 4      (sequential)

``--runtime`` seconds each (default 10). It prints IOPS, MiB/s and cachemode's ratio to each peer, per mode.
qemu-nbd gets ``--cache=MODE``; nbdkit 1.32's file plugin has no O_DIRECT switch, so in ``none`` it runs with
``cache=none`` (page-cache eviction advice, still buffered) and is shown for reference only.

    .venv/bin/python bench/nbd_bench.py                      # writeback and none, 10 s per job
    .venv/bin/python bench/nbd_bench.py --modes writeback --runtime 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = [
    ("randread-4k", "randread", "4k", 16),
    ("randwrite-4k", "randwrite", "4k", 16),
    ("seqread-1m", "read", "1m", 4),
    ("seqwrite-1m", "write", "1m", 4),
]
SERVERS = ("cachemode", "qemu-nbd", "nbdkit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port}")


def server_command(server: str, mode: str, image: str, port: int) -> list[str]:
    if server == "cachemode":
        exe = ROOT / ".venv" / "bin" / "cachemode"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cachemode"]
        return [*cmd, "serve", image, "--cache", mode, "--port", str(port)]
    if server == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", f"--cache={mode}", "-b", "127.0.0.1", "-p", str(port), "-t", "-e", "0", image]
    if server == "nbdkit":
        extra = ["cache=none"] if mode in ("none", "directsync") else []
        return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", image, *extra]
    raise ValueError(server)


def run_fio(port: int, rw: str, bs: str, iodepth: int, runtime: int, size: int) -> dict[str, float]:
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri=nbd://127.0.0.1:{port}/",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": float(side["iops"]), "mib_s": float(side["bw_bytes"]) / (1 << 20)}


def fill_image(path: str, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def bench_mode(mode: str, image: str, size: int, runtime: int, servers: list[str]) -> dict[str, dict[str, dict]]:
    """Run every job against every server. Each job starts each server afresh, after a sync, and the server
    order rotates from job to job, so no server always inherits the page-cache state another one left."""
    results: dict[str, dict[str, dict]] = {name: {} for name, *_ in JOBS}
    for index, (name, rw, bs, depth) in enumerate(JOBS):
        order = servers[index % len(servers) :] + servers[: index % len(servers)]
        for server in order:
            port = free_port()
            proc = subprocess.Popen(
                server_command(server, mode, image, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                wait_port(port, proc)
                os.sync()
                results[name][server] = r = run_fio(port, rw, bs, depth, runtime, size)
                print(
                    f"  {mode:<10} {name:<13} {server:<10} {r['iops']:>10.0f} IOPS {r['mib_s']:>9.1f} MiB/s",
                    flush=True,
                )
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return results


def report(all_results: dict[str, dict[str, dict[str, dict]]], servers: list[str]) -> None:
    peers = [s for s in servers if s != "cachemode"]
    print()
    header = f"{'mode':<10} {'job':<13} " + " ".join(f"{s + ' IOPS':>15} {'MiB/s':>8}" for s in servers)
    header += "".join(f" {'vs ' + p:>12}" for p in peers if "cachemode" in servers)
    print(header)
    for mode, jobs in all_results.items():
        for name, per_server in jobs.items():
            line = f"{mode:<10} {name:<13} "
            line += " ".join(
                f"{per_server[s]['iops']:>15.0f} {per_server[s]['mib_s']:>8.1f}" if s in per_server else f"{'-':>24}"
                for s in servers
            )
            if "cachemode" in per_server:
                for p in peers:
                    if p in per_server and per_server[p]["iops"]:
                        line += f" {per_server['cachemode']['iops'] / per_server[p]['iops']:>11.2f}x"
            print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="writeback,none", help="comma-separated cache modes")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: cachemode,qemu-nbd,nbdkit")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--size-mib", type=int, default=1024, help="image size in MiB")
    ap.add_argument("--dir", default="/var/tmp", help="where to put the image (O_DIRECT needs a real filesystem)")
    ap.add_argument("--json", dest="json_out", help="write the results as JSON here")
    args = ap.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    missing = [tool for tool in ("fio", *[s for s in servers if s != "cachemode"]) if shutil.which(tool) is None]
    if missing:
        print(f"nbd_bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-bench-") as tmp:
        image = os.path.join(tmp, "bench.img")
        print(f"filling {args.size_mib} MiB image {image} ...", flush=True)
        fill_image(image, size)
        all_results = {}
        for mode in [m for m in args.modes.split(",") if m]:
            all_results[mode] = bench_mode(mode, image, size, args.runtime, servers)
    report(all_results, servers)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
