"""The guest's initramfs, built at run time: static busybox, the kernel modules, ``/init`` and the workload.

The archive is the kernel's "newc" cpio format, gzip-compressed, written here directly: every entry is a
header of thirteen hex fields and a name, so device nodes and modes need no root and no staging directory.
``add_program`` copies a host program and the shared libraries ``ldd`` names for it, at their own paths, as
dracut's ``inst_binary`` does, so a workload can run what users run (``--with sqlite3``).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath

from cachemode.vm import VmError

BUSYBOX_HINT = "busybox not found: install busybox-static (apt-get install busybox-static)"


def static_busybox() -> Path:
    """The host's busybox, which must be statically linked: the guest has no C library of its own."""
    found = shutil.which("busybox")
    if found is None:
        raise VmError(BUSYBOX_HINT)
    if shared_libraries(Path(found)):
        raise VmError(f"{found} is dynamically linked: install busybox-static (apt-get install busybox-static)")
    return Path(found)


def shared_libraries(program: Path) -> list[Path]:
    """The shared objects ``program`` loads (the dynamic loader included), as ``ldd`` resolves them."""
    if shutil.which("ldd") is None:
        raise VmError("ldd not found: install libc-bin")
    proc = subprocess.run(["ldd", str(program)], capture_output=True, text=True, timeout=30, check=False)
    text = proc.stdout + proc.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if proc.returncode != 0:
        raise VmError(f"ldd {program}: {text.strip().splitlines()[-1] if text.strip() else proc.returncode}")
    libs: list[Path] = []
    for line in proc.stdout.splitlines():
        if "=> not found" in line:
            raise VmError(f"{program}: needs {line.split()[0]}, which ldd cannot find")
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


class Initramfs:
    """An initramfs being assembled: guest path -> (mode, content); directories are implied by files."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

    def _parents(self, path: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            name = str(parent).lstrip("/")
            if name and name not in self._entries:
                self._entries[name] = (stat.S_IFDIR | 0o755, b"", 0)

    def add_dir(self, path: str) -> None:
        self._parents(path + "/x")

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(path)
        self._entries[path.lstrip("/")] = (stat.S_IFREG | mode, data, 0)

    def add_host_file(self, path: str, host: Path, mode: int | None = None) -> None:
        try:
            data = host.read_bytes()
            perm = stat.S_IMODE(host.stat().st_mode) if mode is None else mode
        except OSError as exc:
            raise VmError(f"{host}: cannot read it for the initramfs: {exc.strerror}") from None
        self.add_file(path, data, perm)

    def add_char_device(self, path: str, major: int, minor: int) -> None:
        self._parents(path)
        self._entries[path.lstrip("/")] = (stat.S_IFCHR | 0o600, b"", os.makedev(major, minor))

    def add_program(self, program: str) -> str:
        """Copy a host program and its shared libraries in; returns the program's path in the guest."""
        found = shutil.which(program)
        if found is None:
            raise VmError(f"--with {program}: no such program on this host")
        path = Path(found).resolve()
        self.add_host_file(str(path), path, 0o755)
        for lib in shared_libraries(path):
            self.add_host_file(str(lib), lib.resolve(), 0o755)
        return str(path)

    def newc(self) -> bytes:
        """The archive in cpio newc format (uncompressed)."""
        out = bytearray()
        for ino, (name, (mode, data, rdev)) in enumerate(sorted(self._entries.items()), start=1):
            _newc_entry(out, ino, name, mode, data, rdev)
        _newc_entry(out, 0, "TRAILER!!!", 0, b"", 0)
        return bytes(out)

    def write(self, path: Path) -> int:
        """Write the gzip-compressed archive (what QEMU's ``-initrd`` takes); returns its size."""
        blob = gzip.compress(self.newc(), compresslevel=1, mtime=0)
        path.write_bytes(blob)
        return len(blob)


def _newc_entry(out: bytearray, ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(mode) else 1,
        0,  # mtime
        len(data),
        0,  # devmajor
        0,  # devminor
        os.major(rdev),
        os.minor(rdev),
        len(encoded),
        0,  # check
    )
    out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
