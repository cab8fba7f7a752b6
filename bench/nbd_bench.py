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
    .venv/bin/python bench/nbd_bench.py --tls --servers cachemode,nbdkit --modes writeback

With ``--tls`` every server requires TLS (cachemode and nbdkit ``--tls=require``, qemu-nbd ``--tls-creds``) with
certificates made for the run, fio connects with ``nbds://``, and each line also shows the server's CPU time per
request: user+system from /proc/PID/stat over the fio run (its 1 s ramp included) divided by the requests fio
completed, so it overstates every server alike by the ramp's share.
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
from typing import Any

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


def server_command(server: str, mode: str, image: str, port: int, certs: Path | None = None) -> list[str]:
    """The server's command line; with ``certs`` (a directory of server certificates) it requires TLS."""
    if server == "cachemode":
        exe = ROOT / ".venv" / "bin" / "cachemode"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cachemode"]
        tls = ["--tls", "require", "--tls-certificates", str(certs)] if certs else []
        return [*cmd, "serve", image, "--cache", mode, "--port", str(port), *tls]
    if server == "qemu-nbd":
        creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off"  # as the other two
        tls = ["--object", creds, "--tls-creds", "tls0"] if certs else []
        listen = ["-b", "127.0.0.1", "-p", str(port)]
        return ["qemu-nbd", "-f", "raw", f"--cache={mode}", *listen, "-t", "-e", "0", *tls, image]
    if server == "nbdkit":
        extra = ["cache=none"] if mode in ("none", "directsync") else []
        tls = ["--tls=require", f"--tls-certificates={certs}"] if certs else []
        return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *tls, "file", image, *extra]
    raise ValueError(server)


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(port: int, rw: str, bs: str, iodepth: int, runtime: int, size: int, tls: bool = False) -> dict:
    # fio's libnbd may not read local files named in a URI (tls-certificates=), and as root its default
    # certificate directory is /etc/pki/libnbd: the client encrypts without checking the server's certificate.
    uri = f"nbds://127.0.0.1:{port}/?tls-verify-peer=false" if tls else f"nbd://127.0.0.1:{port}/"
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
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
    return {"iops": float(side["iops"]), "mib_s": float(side["bw_bytes"]) / (1 << 20), "ios": int(side["total_ios"])}


def fill_image(path: str, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def bench_mode(
    mode: str, image: str, size: int, runtime: int, servers: list[str], certs: Any = None
) -> dict[str, dict[str, dict]]:
    """Run every job against every server. Each job starts each server afresh, after a sync, and the server
    order rotates from job to job, so no server always inherits the page-cache state another one left."""
    results: dict[str, dict[str, dict]] = {name: {} for name, *_ in JOBS}
    for index, (name, rw, bs, depth) in enumerate(JOBS):
        order = servers[index % len(servers) :] + servers[: index % len(servers)]
        for server in order:
            port = free_port()
            command = server_command(server, mode, image, port, certs.server if certs else None)
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_port(port, proc)
                os.sync()
                cpu = cpu_seconds(proc.pid)
                results[name][server] = r = run_fio(port, rw, bs, depth, runtime, size, certs is not None)
                r["cpu_us"] = (cpu_seconds(proc.pid) - cpu) * 1e6 / max(1, r["ios"])
                print(
                    f"  {mode:<10} {name:<13} {server:<10} {r['iops']:>10.0f} IOPS {r['mib_s']:>9.1f} MiB/s "
                    f"{r['cpu_us']:>8.1f} us CPU/request  (load {'/'.join(f'{x:.1f}' for x in os.getloadavg())})",
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
    columns = (f"{s + ' IOPS':>15} {'MiB/s':>8} {'us CPU/req':>10}" for s in servers)
    header = f"{'mode':<10} {'job':<13} " + " ".join(columns)
    header += "".join(f" {'vs ' + p:>12}" for p in peers if "cachemode" in servers)
    print(header)
    for mode, jobs in all_results.items():
        for name, per_server in jobs.items():
            line = f"{mode:<10} {name:<13} "
            line += " ".join(
                f"{per_server[s]['iops']:>15.0f} {per_server[s]['mib_s']:>8.1f} {per_server[s]['cpu_us']:>10.1f}"
                if s in per_server
                else f"{'-':>35}"
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
    ap.add_argument("--tls", action="store_true", help="every server requires TLS (certificates made for the run)")
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
        certs = None
        if args.tls:
            sys.path.insert(0, str(ROOT))
            from tests.tls_certs import make_certificates

            certs = make_certificates(Path(tmp) / "certs")
        all_results = {}
        for mode in [m for m in args.modes.split(",") if m]:
            all_results[mode] = bench_mode(mode, image, size, args.runtime, servers, certs)
    report(all_results, servers)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
