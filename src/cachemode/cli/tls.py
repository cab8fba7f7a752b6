"""``cachemode serve``'s TLS options, spelled as nbdkit spells them so that users and scripts carry over, and the
warning printed when a disk is served beyond loopback without TLS required."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def tls_options(func: F) -> F:
    """``--tls off|on|require``, ``--tls-certificates DIR``, ``--tls-verify-peer`` and ``--tls-psk FILE``."""
    func = click.option(
        "--tls-psk",
        type=click.Path(dir_okay=False),
        default=None,
        help="Authenticate clients with pre-shared keys: nbdkit's 'username:hexkey' file (needs Python 3.13+).",
    )(func)
    func = click.option(
        "--tls-verify-peer",
        is_flag=True,
        help="Require a client certificate signed by the CA in the certificates directory (ca-cert.pem).",
    )(func)
    func = click.option(
        "--tls-certificates",
        type=click.Path(file_okay=False),
        default=None,
        help="Directory with server-cert.pem, server-key.pem and ca-cert.pem (as nbdkit and QEMU name them).",
    )(func)
    func = click.option(
        "--tls",
        type=click.Choice(["off", "on", "require"]),
        default="off",
        show_default=True,
        help="TLS as nbdkit's --tls: on offers it to clients that ask, require refuses everything but STARTTLS "
        "before it.",
    )(func)
    return func


def tls_config_from_options(tls: str, tls_certificates: str | None, tls_verify_peer: bool, tls_psk: str | None) -> Any:
    """The server's :class:`cachemode.nbd.tls.TLSConfig`, or None for ``--tls off``; bad combinations are
    usage errors, unusable files one-line errors."""
    from cachemode.nbd.handshake import TLSMode
    from cachemode.nbd.tls import TLSConfig, psk_context, x509_context

    mode = TLSMode(tls)
    if mode is TLSMode.OFF:
        for given, name in ((tls_certificates, "--tls-certificates"), (tls_verify_peer, "--tls-verify-peer")):
            if given:
                raise click.UsageError(f"{name} needs --tls on or --tls require")
        if tls_psk:
            raise click.UsageError("--tls-psk needs --tls on or --tls require")
        return None
    if bool(tls_certificates) == bool(tls_psk):
        raise click.UsageError(f"--tls {tls} needs either --tls-certificates DIR or --tls-psk FILE")
    if tls_psk:
        if tls_verify_peer:
            raise click.UsageError("--tls-verify-peer is for certificates; a PSK client is authenticated by its key")
        return TLSConfig(mode, psk_context(tls_psk), "psk")
    assert tls_certificates is not None
    kind = "x509 verify-peer" if tls_verify_peer else "x509"
    return TLSConfig(mode, x509_context(tls_certificates, tls_verify_peer), kind)


def exposure_warning(bind: str, socket_path: str | None, tls: Any) -> str | None:
    """The warning for a TCP listener beyond loopback without ``--tls require``, else None."""
    from cachemode.nbd.handshake import TLSMode

    if socket_path or (tls is not None and tls.mode is TLSMode.REQUIRE) or _loopback(bind):
        return None
    return (
        f"cachemode serve: warning: serving on {bind or 'all addresses'} without --tls require: anyone who can "
        "reach this port can read and overwrite the whole disk"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every address): it may well reach beyond this machine
        return False
