"""``cachemode serve``: serve an image over NBD with a cache mode's exact semantics."""

from __future__ import annotations

from typing import Any

import click

from cachemode.cli.lab import lab_config_from_options, lab_options, serve_lab
from cachemode.cli.options import SIZE, disk_options, on_off
from cachemode.cli.serving import DEFAULT_PORT, check_address, open_served_disk, run_server
from cachemode.cli.tls import tls_config_from_options, tls_options
from cachemode.nbd.budget import CONNECTION_BUDGET, LARGEST_REQUEST, SERVER_BUDGET
from cachemode.nbd.server import MAX_CONNECTIONS, SHUTDOWN_TIMEOUT


@click.command()
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@disk_options
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=None, help=f"TCP port [default: {DEFAULT_PORT}].")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None, help="Unix socket instead.")
@click.option("--export-name", default="", help="Export name (the empty default name is always accepted).")
@click.option("--create", "create_size", type=SIZE, default=None, help="Create a sparse image of SIZE first.")
@tls_options
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=MAX_CONNECTIONS,
    show_default=True,
    help="Clients served at once; more are closed before the handshake (and logged).",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=SHUTDOWN_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="On SIGINT/SIGTERM, how long to wait for connections to finish before dropping them "
    "(a second signal drops them at once).",
)
@click.option(
    "--connection-budget",
    type=SIZE,
    default=CONNECTION_BUDGET,
    show_default="8M",
    help="Memory one client may make the server hold: requests in flight and replies queued, together.",
)
@click.option(
    "--memory-budget",
    type=SIZE,
    default=SERVER_BUDGET,
    show_default="256M",
    help="Memory all clients together may make the server hold (each may still use 128 KiB beyond it).",
)
@lab_options
def serve(
    image: str | None,
    cache: str,
    write_cache: str,
    read_only: bool,
    bind: str,
    port: int | None,
    socket_path: str | None,
    export_name: str,
    create_size: int | None,
    tls: str,
    tls_certificates: str | None,
    tls_verify_peer: bool,
    tls_psk: str | None,
    max_connections: int,
    shutdown_timeout: float,
    connection_budget: int,
    memory_budget: int,
    **lab: Any,
) -> None:
    """Serve IMAGE over NBD with the exact semantics of a QEMU cache mode.

    With no IMAGE, serves a sparse 1 GiB demo image in the user's data directory. The client is told of a
    volatile write cache (SEND_FLUSH, SEND_FUA) exactly when the mode has one. Stops on SIGINT/SIGTERM after
    finishing in-flight requests and flushing (except in unsafe).
    """
    port = check_address(port, socket_path)
    tls_config = tls_config_from_options(tls, tls_certificates, tls_verify_peer, tls_psk)
    if connection_budget < 1:
        raise click.UsageError("--connection-budget must be positive")
    if memory_budget < LARGEST_REQUEST:
        # a request of the maximum size must fit in the server's budget, or it would wait forever
        raise click.UsageError(f"--memory-budget must be at least {LARGEST_REQUEST} bytes (one 32 MiB request)")
    listen = {
        "bind": bind,
        "port": port,
        "socket_path": socket_path,
        "export_name": export_name,
        "max_connections": max_connections,
        "shutdown_timeout": shutdown_timeout,
        "connection_budget": connection_budget,
        "server_budget": memory_budget,
        "tls": tls_config,
    }
    lab_config = lab_config_from_options(**lab)
    if lab_config is not None:  # the power-loss lab (cachemode.lab): emulated host caches, --control, --record
        serve_lab(image, cache, on_off(write_cache), read_only, create_size, lab_config, lab["lab_control"], **listen)
        return
    disk = open_served_disk(image, cache, write_cache, read_only, create_size)
    try:
        run_server(disk, **listen)
    finally:
        disk.close()
