"""The guest kernel: fetched once as a Debian package and unpacked (never installed), or brought by the user.

``cachemode vm setup`` resolves the version ``linux-image-cloud-amd64`` depends on today (versioned package names
change with each point release), downloads that package with ``apt-get download``, unpacks it with
``dpkg-deb -x`` into a temporary directory and keeps only ``vmlinuz`` and the modules the guest loads (virtio,
virtio-blk, virtio-net, nbd and what they depend on) in the user's cache directory. Debian's cloud kernel has
ext4, jbd2 and crc32c built in and is LZ4-compressed, so it reaches ``/init`` in a few seconds under TCG.

A kernel from elsewhere: ``--kernel PATH`` and ``--modules DIR`` (a ``lib/modules/VERSION`` tree or any folder of
uncompressed ``.ko`` files). Modules are loaded with busybox ``insmod`` in dependency order, read from each
module's ``.modinfo`` section, so no ``depmod`` or ``modules.dep`` is needed; a module that is absent is assumed
built in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cachemode.vm import VmError

META_PACKAGE = "linux-image-cloud-amd64"
BLOCK_MODULES = ("virtio_pci", "virtio_blk")
NET_MODULES = ("virtio_net", "nbd")
WANTED_MODULES = (*BLOCK_MODULES, *NET_MODULES)

Progress = Callable[[str], None]


def cache_root() -> Path:
    """Where ``vm setup`` keeps kernels: ``~/.cache/cachemode/vm`` (platformdirs' user cache directory)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("cachemode")) / "vm"


def module_name(path: Path) -> str:
    """A module's name as the kernel spells it (``virtio-rng.ko`` is ``virtio_rng``)."""
    return path.name.split(".ko")[0].replace("-", "_")


def module_depends(path: Path) -> list[str]:
    """The modules ``path`` needs loaded first: the ``depends=`` string of its ``.modinfo`` section."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", path.read_bytes())
    if match is None or not match.group(1):
        return []
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",") if name]


@dataclass(frozen=True)
class GuestKernel:
    """A bootable kernel image and the loadable modules found for it (name -> ``.ko``)."""

    vmlinuz: Path
    version: str
    modules: dict[str, Path] = field(default_factory=dict)

    def load_order(self, wanted: Iterable[str]) -> list[Path]:
        """The ``.ko`` files to insmod, dependencies first; names with no ``.ko`` are taken as built in."""
        order: list[Path] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in seen or name not in self.modules:
                return
            if name in chain:
                raise VmError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            for dep in module_depends(self.modules[name]):
                visit(dep, (*chain, name))
            seen.add(name)
            order.append(self.modules[name])

        for name in wanted:
            visit(name, ())
        return order


def scan_modules(directory: Path) -> dict[str, Path]:
    """Every uncompressed ``.ko`` under ``directory`` by module name (compressed ones cannot be insmod-ed)."""
    found: dict[str, Path] = {}
    for path in sorted(directory.rglob("*.ko")):
        found.setdefault(module_name(path), path)
    return found


def user_kernel(kernel: str, modules: str | None) -> GuestKernel:
    """``--kernel PATH [--modules DIR]``: a kernel brought by the user."""
    vmlinuz = Path(kernel)
    if not vmlinuz.is_file():
        raise VmError(f"--kernel {kernel}: no such file")
    found: dict[str, Path] = {}
    if modules is not None:
        mdir = Path(modules)
        if not mdir.is_dir():
            raise VmError(f"--modules {modules}: no such directory")
        found = scan_modules(mdir)
    return GuestKernel(vmlinuz, vmlinuz.name, found)


def cached_kernel() -> GuestKernel | None:
    """The kernel ``vm setup`` cached last, or None."""
    root = cache_root()
    try:
        current = json.loads((root / "current.json").read_text())
    except (OSError, ValueError):
        return None
    kdir = root / current.get("version", "?")
    vmlinuz = kdir / "vmlinuz"
    if not vmlinuz.is_file():
        return None
    return GuestKernel(vmlinuz, current["version"], scan_modules(kdir / "modules"))


def find_kernel(kernel: str | None = None, modules: str | None = None) -> GuestKernel:
    """The kernel a ``vm`` command boots: ``--kernel``, else the cached one, else a one-line error."""
    if kernel is not None:
        return user_kernel(kernel, modules)
    if modules is not None:
        raise VmError("--modules needs --kernel")
    found = cached_kernel()
    if found is None:
        raise VmError(
            f"no guest kernel in {cache_root()}: run 'cachemode vm setup' (downloads {META_PACKAGE}), "
            "or give --kernel PATH [--modules DIR]"
        )
    return found


def _run(argv: list[str], what: str, cwd: Path | None = None, timeout: float = 300) -> str:
    if shutil.which(argv[0]) is None:
        raise VmError(
            f"{argv[0]} not found: 'vm setup' fetches a Debian kernel package; elsewhere give --kernel PATH "
            "[--modules DIR]"
        )
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise VmError(f"{what}: {argv[0]} did not finish in {timeout:.0f} s (no network?)") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise VmError(f"{what}: {detail}")
    return proc.stdout


def resolve_version() -> str:
    """The versioned kernel package the metapackage depends on today (e.g. linux-image-6.1.0-57-cloud-amd64)."""
    out = _run(["apt-cache", "depends", META_PACKAGE], f"cannot resolve {META_PACKAGE} (apt-get update?)")
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise VmError(f"{META_PACKAGE} depends on no linux-image package here (run apt-get update?)")


def setup(progress: Progress = lambda _msg: None, *, force: bool = False) -> GuestKernel:
    """Fetch and unpack the cloud kernel into the cache (once); returns it.

    A newer version that cannot be fetched (no network) leaves the cached kernel in use, with a warning.
    """
    current = cached_kernel()
    try:
        package = resolve_version()
        version = package.removeprefix("linux-image-")
        if current is not None and current.version == version and not force:
            progress(f"{package}: already in {cache_root() / version}")
            return current
        return _fetch(package, version, progress)
    except VmError as exc:
        if current is None:
            raise
        progress(f"warning: {exc}; keeping the cached kernel {current.version}")
        return current


def _fetch(package: str, version: str, progress: Progress) -> GuestKernel:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=root) as tmp:
        work = Path(tmp)
        progress(f"downloading {package} (about 27 MB) with apt-get download ...")
        _run(["apt-get", "download", package], f"cannot download {package} (no network?)", cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise VmError(f"apt-get download {package} left no .deb")
        progress(f"unpacking {debs[0].name} (dpkg-deb -x; nothing is installed) ...")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"cannot unpack {debs[0].name}")
        images = sorted((tree / "boot").glob("vmlinuz-*"))
        if not images:
            raise VmError(f"{debs[0].name} holds no boot/vmlinuz-*")
        unpacked = GuestKernel(images[0], version, scan_modules(tree / "lib" / "modules"))
        staging = work / "kernel"
        (staging / "modules").mkdir(parents=True)
        shutil.copy2(images[0], staging / "vmlinuz")
        for ko in unpacked.load_order(WANTED_MODULES):
            shutil.copy2(ko, staging / "modules" / ko.name)
        target = root / version
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    (root / "current.json").write_text(json.dumps({"version": version, "package": package}) + "\n")
    kernel = cached_kernel()
    assert kernel is not None
    progress(f"{package}: vmlinuz and {len(kernel.modules)} modules cached in {root / version}")
    return kernel
