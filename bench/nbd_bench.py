#!/usr/bin/env python3
"""Benchmark ``cachemode serve`` against qemu-nbd and nbdkit's file plugin with the same fio jobs.

For each cache mode, each server in turn serves the same raw image (filled with random data, so reads hit
data, not holes) on loopback TCP (with ``--unix``, on a Unix socket, as QEMU reaches a server on its own host),
and fio with ``ioengine=nbd`` runs:

    randread  4 KiB  iodepth 16      randwrite 4 KiB  iodepth 16
    read      1 MiB  iodepth 4       write     1 MiB  iodepth 4      (sequential)

``--runtime`` seconds each (default 10). Beside IOPS and MiB/s it reports each server's CPU cost -- the
user+system CPU of the server process (all threads, from /proc/PID/stat) over the fio run, per request (us,
4 KiB jobs) or per GiB (ms, 1 MiB jobs) -- and the whole machine's busy CPU per request less fio's own (work
may move into kernel threads or interrupts), with cachemode's ratios and the issue-12 goal (<= 0.8x nbdkit and
<= 0.5x qemu-nbd in writeback/unsafe, <= qemu-nbd in none/writethrough/directsync). Every line carries the
load average: the machine may be shared, and CPU per request is what stays comparable then.

qemu-nbd gets ``--cache=MODE``. nbdkit 1.32's file plugin has neither O_DIRECT nor O_DSYNC nor an unsafe
mode: it is compared in writeback and unsafe (its writeback), and shown for reference elsewhere (in
``none``/``directsync`` with ``cache=none``, page-cache eviction advice, still buffered).

    .venv/bin/python bench/nbd_bench.py --runtime 3 --json out.json          # all five modes
    .venv/bin/python bench/nbd_bench.py --modes writethrough --jobs randread-4k --servers cachemode --repeat 3
    .venv/bin/python bench/nbd_bench.py --modes writethrough --jobs randread-4k --cold     # cache misses

    .venv/bin/python bench/nbd_bench.py --tls --servers cachemode,nbdkit --modes writeback
    .venv/bin/python bench/nbd_bench.py --unix --modes writeback,unsafe      # every server on a Unix socket

``--rate-iops N`` holds fio to N requests a second, so that no server runs flat out; ``--connections K`` runs
K fio jobs, each with its own NBD connection (K guests of one host), sharing that rate equally:

    .venv/bin/python bench/nbd_bench.py --modes writeback --jobs randread-4k --connections 8 --rate-iops 20000

A/B of one path: ``CACHEMODE_NBD_SPLICE=0`` (no splice of large WRITE payloads), ``CACHEMODE_NBD_URING=0``
(page-cache misses on the thread pool), ``CACHEMODE_NBD_AIO=0`` (no native AIO), ``CACHEMODE_NBD_MAP=0`` (small
inline writes pwritten, not stored through the mapped image) in the environment.

With ``--tls`` every server requires TLS (cachemode and nbdkit ``--tls=require``, qemu-nbd ``--tls-creds``) with
certificates made for the run, and fio connects with ``nbds://``. Each run also records ``cpu_us``: the
server's CPU per request in microseconds, for every job (the 1 MiB jobs' cost is otherwise shown per GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proc_cpu import Sample, child_cpu

ROOT = Path(__file__).resolve().parent.parent
JOBS = [
    ("randread-4k", "randread", "4k", 16),
    ("randwrite-4k", "randwrite", "4k", 16),
    ("seqread-1m", "read", "1m", 4),
    ("seqwrite-1m", "write", "1m", 4),
]
SERVERS = ("cachemode", "qemu-nbd", "nbdkit")
MODES = ("writeback", "unsafe", "none", "writethrough", "directsync")
NBDKIT_LIKE = ("writeback", "unsafe")
"""Modes where nbdkit's file plugin is a like-for-like peer (it has no unsafe mode: its writeback stands in)."""


Endpoint = int | str
"""Where a server listens: a loopback TCP port, or the path of a Unix socket (``--unix``)."""


def free_endpoint(unix: bool, tmp: str) -> Endpoint:
    if unix:
        path = os.path.join(tmp, "nbd.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(where: Endpoint, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if isinstance(where, str):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(where)
            else:
                socket.create_connection(("127.0.0.1", where), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {where}")


def server_command(server: str, mode: str, image: str, where: Endpoint, certs: Path | None = None) -> list[str]:
    """The server's command line, listening on ``where``; with ``certs`` (a directory of server certificates)
    it requires TLS."""
    unix = isinstance(where, str)
    if server == "cachemode":
        exe = ROOT / ".venv" / "bin" / "cachemode"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cachemode"]
        tls = ["--tls", "require", "--tls-certificates", str(certs)] if certs else []
        listen = ["--socket", str(where)] if unix else ["--port", str(where)]
        return [*cmd, "serve", image, "--cache", mode, *listen, *tls]
    if server == "qemu-nbd":
        creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off"  # as the other two
        tls = ["--object", creds, "--tls-creds", "tls0"] if certs else []
        listen = ["-k", str(where)] if unix else ["-b", "127.0.0.1", "-p", str(where)]
        return ["qemu-nbd", "-f", "raw", f"--cache={mode}", *listen, "-t", "-e", "0", *tls, image]
    if server == "nbdkit":
        extra = ["cache=none"] if mode in ("none", "directsync") else []
        tls = ["--tls=require", f"--tls-certificates={certs}"] if certs else []
        listen = ["-U", str(where)] if unix else ["-i", "127.0.0.1", "-p", str(where)]
        return ["nbdkit", "-f", *listen, *tls, "file", image, *extra]
    raise ValueError(server)


def fio_uri(where: Endpoint, tls: bool) -> str:
    """libnbd's URI for ``where``. fio's libnbd may not read local files named in a URI (tls-certificates=),
    and as root its default certificate directory is /etc/pki/libnbd: the client encrypts without checking
    the server's certificate."""
    scheme = "nbds" if tls else "nbd"
    check = "tls-verify-peer=false" if tls else ""
    if isinstance(where, str):
        return f"{scheme}+unix:///?socket={where}" + (f"&{check}" if check else "")
    return f"{scheme}://127.0.0.1:{where}/" + (f"?{check}" if check else "")


def run_fio(
    where: Endpoint,
    rw: str,
    bs: str,
    iodepth: int,
    runtime: int,
    size: int,
    tmp: str,
    tls: bool = False,
    rate_iops: int = 0,
    extra: tuple[str, ...] = (),
) -> dict[str, float]:
    """Run one fio job; return its throughput, request and byte counts, and fio's own CPU seconds. With
    ``rate_iops`` fio is held to that many requests a second (``--rate_iops``); ``extra`` are more fio options
    (a mixed job's ``--rwmixread`` and ``--bssplit``), whose reads and writes are then counted together.

    No ramp time: fio then counts every request of the run, so the server's CPU over the whole run divides
    by the right number. fio's CPU comes from ``wait4`` (its job processes included)."""
    out_path = os.path.join(tmp, "fio.json")
    uri = fio_uri(where, tls)
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
        "--output-format=json",
        f"--output={out_path}",
        *([f"--rate_iops={rate_iops}"] if rate_iops else []),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"fio failed ({proc.returncode}): {err.strip()}")
    text = Path(out_path).read_text()
    job = json.loads(text[text.index("{") :])["jobs"][0]
    sides = [job["read"], job["write"]] if rw in ("randrw", "rw") else [job["read"] if "read" in rw else job["write"]]
    return {
        "iops": sum(float(side["iops"]) for side in sides),
        "mib_s": sum(float(side["bw_bytes"]) for side in sides) / (1 << 20),
        "requests": sum(int(side["total_ios"]) for side in sides),
        "bytes": sum(int(side["io_bytes"]) for side in sides),
        "fio_cpu_s": child_cpu(rusage),
    }


def fill_image(path: str, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def cost(job: str, cpu_s: float, run: dict[str, float]) -> float:
    """CPU cost of a job: microseconds per request for 4 KiB jobs, milliseconds per GiB for 1 MiB ones."""
    if unit(job) == "us/req":
        return cpu_s * 1e6 / max(run["requests"], 1)
    return cpu_s * 1e3 / max(run["bytes"] / (1 << 30), 1e-12)


def unit(job: str) -> str:
    return "us/req" if job.endswith(("-4k", "-mixed")) else "ms/GiB"


def evict(image: str) -> None:
    """Drop the image's pages from the page cache (it was synced), so reads start cold."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_run(
    server: str,
    mode: str,
    image: str,
    size: int,
    runtime: int,
    job: tuple,
    tmp: str,
    cold: bool = False,
    certs: Any = None,
    rate_iops: int = 0,
    connections: int = 1,
    unix: bool = False,
) -> dict:
    """Start ``server`` afresh (requiring TLS with ``certs``; on a Unix socket with ``unix``), sync (and with
    ``cold`` evict the image), run one fio job against it, and measure the CPU it took."""
    name, rw, bs, depth = job
    where = free_endpoint(unix, tmp)
    command = server_command(server, mode, image, where, certs.server if certs else None)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(where, proc)
        os.sync()
        if cold:
            evict(image)
        before = Sample.take(proc.pid)
        started = time.monotonic()
        run: dict = run_fio(
            where, rw, bs, depth, runtime, size, tmp, certs is not None, -(-rate_iops // connections),
            ("--numjobs=" + str(connections), "--group_reporting") if connections > 1 else (),
        )  # fmt: skip
        wall = time.monotonic() - started
        used = Sample.take(proc.pid).since(before)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    system_cpu = max(used.machine - run["fio_cpu_s"], 0.0)
    run.update(
        mode=mode,
        job=name,
        server=server,
        transport="unix" if unix else "tcp",
        server_cpu_s=used.server,
        kthreads_cpu_s=used.kthreads,
        interrupts_cpu_s=used.interrupts,
        machine_cpu_s=used.machine,
        server_cost=cost(name, used.server, run),
        cpu_us=used.server * 1e6 / max(run["requests"], 1),
        kernel_cost=cost(name, used.server_and_kernel, run),
        system_cost=cost(name, system_cpu, run),
        # Each process's share of one CPU over the run: a server near 100% alongside fio near 100% is
        # saturated, and its CPU per request is then about one over the rate fio reaches.
        server_busy=used.server / wall,
        fio_busy=run["fio_cpu_s"] / wall,
        unit=unit(name),
        loadavg=os.getloadavg(),
    )
    return run


def bench_mode(
    mode: str,
    image: str,
    size: int,
    runtime: int,
    servers: list[str],
    jobs: list[tuple],
    repeat: int,
    tmp: str,
    cold: bool = False,
    certs: Any = None,
    rate_iops: int = 0,
    connections: int = 1,
    unix: bool = False,
) -> list[dict]:
    """Run every job against every server, ``repeat`` times. Each run starts its server afresh, after a sync,
    and the server order rotates from job to job, so no server always inherits the page-cache state another
    one left."""
    runs = []
    for index, job in enumerate(jobs):
        order = servers[index % len(servers) :] + servers[: index % len(servers)]
        for _ in range(repeat):
            for server in order:
                r = one_run(server, mode, image, size, runtime, job, tmp, cold, certs, rate_iops, connections, unix)
                runs.append(r)
                load = " ".join(f"{x:.2f}" for x in r["loadavg"])
                print(
                    f"  {mode:<12} {job[0]:<13} {server:<10} {r['iops']:>9.0f} IOPS {r['mib_s']:>8.1f} MiB/s"
                    f"  cpu {r['server_cost']:>7.1f} {r['unit']} (+kernel {r['kernel_cost']:>7.1f},"
                    f" system-fio {r['system_cost']:>7.1f}; {r['cpu_us']:>7.1f} us/req)"
                    f"  busy {r['server_busy']:.0%} fio {r['fio_busy']:.0%}  load {load}",
                    flush=True,
                )
    return runs


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Median of every figure over the repeats: mode -> job -> server -> figure."""
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        grouped.setdefault((r["mode"], r["job"], r["server"]), []).append(r)
    out: dict = {}
    for (mode, job, server), rs in grouped.items():
        keys = ("iops", "mib_s", "server_cost", "kernel_cost", "system_cost", "cpu_us")
        out.setdefault(mode, {}).setdefault(job, {})[server] = {k: statistics.median(r[k] for r in rs) for k in keys}
    return out


def ratio(summary: dict, mode: str, job: str, peer: str, key: str = "server_cost") -> float | None:
    """cachemode's ``key`` over the peer's; None where the peer is no like-for-like comparison in ``mode``."""
    per = summary[mode][job]
    if peer == "nbdkit" and mode not in NBDKIT_LIKE:
        return None
    if "cachemode" not in per or peer not in per or not per[peer][key]:
        return None
    return per["cachemode"][key] / per[peer][key]


def goal_met(summary: dict, mode: str, job: str) -> bool | None:
    """The issue's goal: <= 0.8x nbdkit and <= 0.5x qemu-nbd in writeback/unsafe, <= 1x qemu-nbd elsewhere."""
    limits = {"nbdkit": 0.8, "qemu-nbd": 0.5} if mode in NBDKIT_LIKE else {"qemu-nbd": 1.0}
    checked = [(ratio(summary, mode, job, peer), limit) for peer, limit in limits.items()]
    if any(r is None for r, _ in checked):
        return None
    return all(r <= limit for r, limit in checked)  # type: ignore[operator]


def report(summary: dict, servers: list[str]) -> None:
    peers = [s for s in servers if s != "cachemode"]
    print()
    print("cpu: the server process's user+system CPU (all threads) per 4 KiB request (us) or per GiB of 1 MiB")
    print("requests (ms). +kern: the same plus the kernel's own work meanwhile (kernel threads, irq, softirq).")
    print("system: the whole machine's busy CPU less fio's own (includes anything else running). Throughput in")
    print("IOPS (4k) or MiB/s. Ratios: cachemode / peer, lower is better; nbdkit compared in writeback/unsafe only.")
    header = f"{'mode':<12} {'job':<13} " + " ".join(f"{s:>10} {'cpu':>7} {'+kern':>7} {'system':>7}" for s in servers)
    if "cachemode" in servers:
        header += "".join(f" {'cpu vs ' + p:>14}" for p in peers)
        header += "".join(f" {'+kern vs ' + p:>16}" for p in peers) + f" {'goal':>5}"
    print(header)
    for mode, jobs in summary.items():
        for job, per in jobs.items():
            line = f"{mode:<12} {job:<13} "
            for s in servers:
                if s not in per:
                    line += f"{'-':>34} "
                    continue
                f = per[s]
                tput = f["iops"] if job.endswith("-4k") else f["mib_s"]
                line += f"{tput:>10.0f} {f['server_cost']:>7.1f} {f['kernel_cost']:>7.1f} {f['system_cost']:>7.1f} "
            if "cachemode" in servers:
                for key, width in (("server_cost", 13), ("kernel_cost", 15)):
                    for p in peers:
                        r = ratio(summary, mode, job, p, key)
                        line += f" {r:>{width}.2f}x" if r is not None else f" {'-':>{width + 1}}"
                met = goal_met(summary, mode, job)
                line += f" {'-' if met is None else 'yes' if met else 'NO':>5}"
            print(line)


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine_info() -> dict[str, object]:
    """What a reader needs to compare figures: the peers' and fio's versions, kernel, cores, CPU model."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "qemu-nbd": version(["qemu-nbd", "--version"]),
        "nbdkit": version(["nbdkit", "--version"]),
        "fio": version(["fio", "--version"]),
        "cachemode_commit": commit,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "cores": os.cpu_count(),
        "cpu_model": model,
        "loadavg_at_start": os.getloadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated cache modes")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: cachemode,qemu-nbd,nbdkit")
    ap.add_argument("--jobs", default=",".join(j[0] for j in JOBS), help="comma-separated subset of the jobs")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--repeat", type=int, default=1, help="runs per job and server (the report shows medians)")
    ap.add_argument("--cold", action="store_true", help="evict the image from the page cache before every run")
    ap.add_argument("--size-mib", type=int, default=1024, help="image size in MiB")
    ap.add_argument("--dir", default="/var/tmp", help="where to put the image (O_DIRECT needs a real filesystem)")
    ap.add_argument("--json", dest="json_out", help="write the machine, every run and the medians as JSON here")
    ap.add_argument("--tls", action="store_true", help="every server requires TLS (certificates made for the run)")
    ap.add_argument(
        "--rate-iops",
        type=int,
        default=0,
        help="hold fio to this many requests a second (0: as fast as it goes), so no server runs flat out",
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=1,
        help="fio jobs, each with its own NBD connection (as many guests), sharing --rate-iops equally",
    )
    ap.add_argument(
        "--unix",
        action="store_true",
        help="every server listens on a Unix socket, as for guests on the same host, instead of loopback TCP",
    )
    args = ap.parse_args()
    if args.connections < 1:
        print(f"nbd_bench: --connections must be at least 1, not {args.connections}", file=sys.stderr)
        return 2
    servers = [s for s in args.servers.split(",") if s]
    known = {j[0]: j for j in JOBS}
    try:
        jobs = [known[name] for name in args.jobs.split(",") if name]
    except KeyError as exc:
        print(f"nbd_bench: unknown job {exc.args[0]} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    missing = [tool for tool in ("fio", *[s for s in servers if s != "cachemode"]) if shutil.which(tool) is None]
    if missing:
        print(f"nbd_bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    info = machine_info()
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    size = args.size_mib << 20
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-bench-") as tmp:
        image = os.path.join(tmp, "bench.img")
        print(f"filling {args.size_mib} MiB image {image} ...", flush=True)
        fill_image(image, size)
        certs = None
        if args.tls:
            sys.path.insert(0, str(ROOT))
            from tests.tls_certs import make_certificates

            certs = make_certificates(Path(tmp) / "certs")
        for mode in [m for m in args.modes.split(",") if m]:
            runs += bench_mode(
                mode, image, size, args.runtime, servers, jobs, args.repeat, tmp, args.cold, certs, args.rate_iops,
                args.connections, args.unix,
            )  # fmt: skip
    summary = summarise(runs)
    report(summary, servers)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json_out:
        doc = {"machine": info, "args": vars(args), "runs": runs, "summary": summary}
        Path(args.json_out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
