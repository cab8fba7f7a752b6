"""Certificates for the TLS tests, made once per session with openssl(1) (P-256 keys: fast to make).

``make_certificates(root)`` lays out the directories nbdkit, libnbd and QEMU's tls-creds-x509 expect:

* ``server/``: ca-cert.pem, server-cert.pem, server-key.pem (for 127.0.0.1 and localhost)
* ``client/``: ca-cert.pem, client-cert.pem, client-key.pem -- a client the CA signed
* ``anon/``: ca-cert.pem only -- a client that trusts the server but has no certificate
* ``rogue/``: ca-cert.pem (the real CA), client-cert.pem, client-key.pem signed by another CA
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_CA_EXT = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
_SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
)
_CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
)


@dataclass(frozen=True)
class Certificates:
    server: Path
    client: Path
    anon: Path
    rogue: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _key_and_request(work: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, csr = work / f"{name}-key.pem", work / f"{name}.csr"
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", subject,
    )  # fmt: skip
    return key, csr


def _ca(work: Path, name: str) -> tuple[Path, Path]:
    key, csr = _key_and_request(work, name, f"/CN=cachemode test {name}")
    cert = work / f"{name}-cert.pem"
    ext = work / f"{name}.ext"
    ext.write_text(_CA_EXT)
    _openssl("x509", "-req", "-in", csr, "-signkey", key, "-out", cert, "-days", "2", "-extfile", ext)
    return key, cert


def _signed(work: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr = _key_and_request(work, name, f"/CN={name}")
    cert = work / f"{name}-cert.pem"
    ext = work / f"{name}.ext"
    ext.write_text(extensions)
    ca_key, ca_cert = ca
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", "2",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return key, cert


def make_certificates(root: Path) -> Certificates:
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    other_ca = _ca(work, "other-ca")
    server = _signed(work, "localhost", ca, _SERVER_EXT)
    client = _signed(work, "client", ca, _CLIENT_EXT)
    rogue = _signed(work, "rogue", other_ca, _CLIENT_EXT)
    dirs = Certificates(root / "server", root / "client", root / "anon", root / "rogue")
    layout = {
        dirs.server: {"server-key.pem": server[0], "server-cert.pem": server[1]},
        dirs.client: {"client-key.pem": client[0], "client-cert.pem": client[1]},
        dirs.anon: {},
        dirs.rogue: {"client-key.pem": rogue[0], "client-cert.pem": rogue[1]},
    }
    for directory, files in layout.items():
        directory.mkdir()
        shutil.copy(ca[1], directory / "ca-cert.pem")
        for name, source in files.items():
            shutil.copy(source, directory / name)
    return dirs
