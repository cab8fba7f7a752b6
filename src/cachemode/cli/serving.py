"""What every serving command shares (``serve``, ``demo``, ``serve --lab``): the demo image, the listen
address checks, the ready line, and running the server with start-up failures turned into one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cachemode.cli.options import on_off
from cachemode.errors import CachemodeError

DEMO_SIZE = 1 << 30
DEFAULT_PORT = 10809


class ServeError(CachemodeError):
    """The server could not start (address in use, bad socket path, ...)."""


def demo_image_path() -> Path:
    """The sparse demo image in the user's data directory (created on first use)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("cachemode")) / "demo.img"


def ensure_demo_image() -> Path:
    path = demo_image_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServeError(f"cannot create {path.parent}: {exc.strerror}") from None
    if not path.exists():
        from cachemode.disk import create_image

        create_image(path, DEMO_SIZE)
    return path


def ready_line(server: Any) -> str:
    """The one line printed when the server listens: URI, mode, what the client is told."""
    from cachemode.nbd.export import describe_flags

    disk = server.disk
    told = "SEND_FLUSH+SEND_FUA" if disk.guest_write_cache else "no write cache (no SEND_FLUSH/SEND_FUA)"
    flags = server.export.transmission_flags(True)
    tls = f" tls={server.tls.mode.value}({server.tls.kind})" if server.tls is not None else ""
    return (
        f"cachemode serve: {server.uri} cache={disk.mode.name} "
        f"write-cache={'on' if disk.write_cache else 'off'} size={disk.size} "
        f"told={told} flags={'|'.join(describe_flags(flags))}{tls}"
    )


def check_address(port: int | None, socket_path: str | None) -> int:
    if port is not None and socket_path:
        raise click.UsageError("--port and --socket are mutually exclusive")
    if port is None:
        return DEFAULT_PORT
    if not 0 <= port <= 65535:
        raise click.UsageError(f"--port {port} is out of range 0..65535")
    return port


def open_served_disk(image: str | None, cache: str, write_cache: str, read_only: bool, create_size: int | None) -> Any:
    from cachemode.disk import open_disk

    if image is None:
        if create_size is not None:
            raise click.UsageError("--create needs an IMAGE")
        image = str(ensure_demo_image())
    if create_size is not None and create_size <= 0:
        raise click.UsageError("--create SIZE must be positive")
    return open_disk(image, cache, write_cache=on_off(write_cache), read_only=read_only, create_size=create_size)


def run_server(
    disk: Any,
    *,
    bind: str,
    port: int,
    socket_path: str | None,
    export_name: str,
    on_ready: Any = None,
    tls: Any = None,
    **limits: Any,
) -> Any:
    """Serve ``disk`` until SIGINT/SIGTERM; print the ready line; turn start-up failures into ServeError.

    ``tls`` is a :class:`cachemode.nbd.tls.TLSConfig` (see :mod:`cachemode.cli.tls`) or None; ``limits`` go to
    :func:`cachemode.nbd.server.serve` (max_connections, shutdown_timeout, budgets).
    """
    from cachemode.cli.tls import exposure_warning
    from cachemode.nbd.server import serve

    warning = exposure_warning(bind, socket_path, tls)
    if warning:
        click.echo(warning, err=True)

    def ready(server: Any) -> None:
        click.echo(ready_line(server))
        sys.stdout.flush()
        if on_ready is not None:
            on_ready(server)

    try:
        return serve(
            disk,
            host=bind,
            port=port,
            socket_path=socket_path,
            export_name=export_name,
            description=f"cachemode {disk.mode.name} export of {getattr(disk.image, 'path', '?')}",
            on_ready=ready,
            tls=tls,
            **limits,
        )
    except OSError as exc:
        where = socket_path or f"{bind}:{port}"
        raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}") from None
