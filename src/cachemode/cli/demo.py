"""``cachemode demo`` (``make demo``): serve the demo image over NBD and show a client session against it.

It starts ``cachemode serve`` on the sparse 1 GiB demo image in the user's data directory, prints the
cache-mode table, runs a short client session over the real socket -- what the client was told, a write, a
flush, a verified read -- and keeps serving in the foreground until Ctrl-C.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import click
from rich.console import Console

from cachemode.cli.console import console as make_console
from cachemode.cli.console import unclipped
from cachemode.cli.options import disk_options, on_off


def client_session(server: Any, console: Console) -> None:
    """Talk to ``server`` as an NBD client would and print what happened."""
    from cachemode.nbd import constants as c
    from cachemode.nbd.client import Client
    from cachemode.nbd.export import describe_flags

    host, _, port = server.address.rpartition(":")
    try:
        with Client(host, int(port), export=server.export.name) as cl:
            told_cache = bool(cl.flags & c.TF_SEND_FLUSH)
            console.print("[bold]client session[/] (a real NBD client over the socket)")
            console.print(f"  told: {' '.join(describe_flags(cl.flags))}")
            console.print(
                "  volatile write cache: "
                + (
                    "[yellow]yes[/] -> the client must FLUSH (SEND_FLUSH, SEND_FUA)"
                    if told_cache
                    else "[green]no[/] -> every write is durable when acknowledged"
                )
            )
            if cl.block_sizes:
                lo, pref, hi = cl.block_sizes
                console.print(f"  block sizes: minimum {lo}, preferred {pref}, maximum {hi}")
            pattern = os.urandom(16) * 256  # 4 KiB
            offset = 1 << 20
            cl.pwrite(pattern, offset)
            console.print(f"  WRITE 4 KiB at {offset}: acknowledged")
            cl.flush()
            verb = "fdatasync" if server.disk.mode.flush_syncs(server.disk.write_cache) else "nothing to sync"
            console.print(f"  FLUSH: ok ({server.disk.mode.name}: {verb})")
            back = cl.pread(len(pattern), offset)
            ok = back == pattern
            console.print(f"  READ 4 KiB at {offset}: " + ("[green]verified[/]" if ok else "[red]MISMATCH[/]"))
            extents = cl.block_status(4 << 20, 0) if cl.context_id is not None else []
            if extents:
                shown = ", ".join(f"{n}B {'hole' if f & 1 else 'data'}" for n, f in extents[:4])
                console.print(f"  BLOCK_STATUS first 4 MiB: {shown}")
    except Exception as exc:  # the demo must keep serving whatever the session does
        console.print(f"[red]client session failed: {exc}[/]")
        return
    console.print(f"serving {server.uri} until Ctrl-C (try: nbdinfo {server.uri})")


@click.command()
@disk_options
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=None, help="TCP port [default: 10809].")
def demo(cache: str, write_cache: str, read_only: bool, bind: str, port: int | None) -> None:
    """Serve the demo image over NBD, show the mode table and a client session, serve until Ctrl-C."""
    from cachemode.cli.modes import mode_table
    from cachemode.cli.serving import check_address, open_served_disk, run_server

    port = check_address(port, None)
    console = make_console()
    disk = open_served_disk(None, cache, write_cache, read_only, None)

    def ready(server: Any) -> None:
        console.print(unclipped(mode_table(on_off(write_cache))))
        threading.Thread(target=client_session, args=(server, console), daemon=True).start()

    try:
        run_server(disk, bind=bind, port=port, socket_path=None, export_name="", on_ready=ready)
    finally:
        disk.close()
