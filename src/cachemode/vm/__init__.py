"""A real Linux guest on the lab disk: boot it under QEMU, cut the power at a chosen step, see what ext4 kept.

The pieces, each in its own module:

* :mod:`cachemode.vm.kernel`: the guest kernel and its modules (``cachemode vm setup``), cached per user;
* :mod:`cachemode.vm.initramfs`: the initramfs built at run time (busybox, modules, ``/init``, programs
  brought in with their shared libraries);
* :mod:`cachemode.vm.workloads`: the built-in workloads (shell scripts run in the guest) and their console lines;
* :mod:`cachemode.vm.qemu`: the QEMU command line and the KVM probe;
* :mod:`cachemode.vm.guest`: a booted guest read line by line from its serial console;
* :mod:`cachemode.vm.verify`: what the crashed image kept, checked on the host (e2fsck, debugfs);
* :mod:`cachemode.vm.run`: one crash run end to end; :mod:`cachemode.vm.matrix`: every mode.

See docs/vm.md.
"""

from cachemode.errors import CachemodeError


class VmError(CachemodeError):
    """The guest cannot be set up or run (a missing tool, kernel, bad option)."""


__all__ = ["VmError"]
