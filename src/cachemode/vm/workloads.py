"""What runs in the guest: ``/init``, its roles, and the workloads, as busybox shell scripts.

The console protocol (every line the host acts on starts with ``cm: ``):

* ``cm: ready write_cache=write_back`` -- the disk is up; what the guest kernel's
  ``/sys/block/vda/queue/write_cache`` says (spaces as underscores);
* ``cm: step N KIND NAME MD5`` -- step N is done and acknowledged: KIND is ``fsynced`` (the file and its
  directory were fsynced), ``wrote`` (written, never synced: buffered, or with O_DIRECT), ``renamed``
  (replaced by a rename, never synced) or ``committed`` (an SQLite COMMIT returned; NAME is the transaction
  number, MD5 is ``-``);
* ``cm: cut N`` -- the guest stopped after step N (or ``cut end``) and waits, doing nothing, to be killed;
* ``cm: file NAME MD5 SIZE`` and ``cm: listed`` -- a verify boot's listing of what it sees;
* ``cm: error TEXT`` -- the guest could not do its part; ``cm: done`` -- the role finished.

A ``--workload FILE`` is a shell script sourced in the mounted filesystem's root (``/mnt``) with ``cm_step KIND
NAME`` available: call it after each step, once the step is acknowledged (after its ``sync FILE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachemode.vm import VmError

NBD_GUEST_ADDRESS = "10.0.2.100"
NBD_GUEST_PORT = 10809

INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin:/usr/sbin HOME=/tmp
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
say() { echo "cm: $*"; }
say init
for m in $(cat /etc/cm-modules); do insmod "/lib/modules/$m" || say error "insmod $m failed"; done
for w in $(cat /proc/cmdline); do
  case "$w" in cm.*=*) k=${w%%=*}; k=${k#cm.}; eval "CM_$k=\${w#*=}";; esac
done
wait_disk() {
  i=0
  while [ ! -e "/sys/block/$1" ]; do
    i=$((i + 1)); [ $i -gt 200 ] && { say error "no /dev/$1 after 20 s"; finish; }
    sleep 0.1
  done
}
finish() { say done; reboot -f; sleep 1000; }
cm_cut() { say cut "$1"; while :; do sleep 1000; done; }
cm_step() {
  CM_STEP=$((CM_STEP + 1))
  sum=-
  [ -f "$2" ] && { sum=$(md5sum < "$2"); sum=${sum%% *}; }
  say step "$CM_STEP" "$1" "$2" "$sum"
  [ "$CM_STEP" = "$CM_cut" ] && cm_cut "$CM_STEP"
  return 0
}
. /etc/cm-role.sh
finish
"""

ROLE_CRASH = r"""
wait_disk vda
wc=$(cat /sys/block/vda/queue/write_cache)
say ready "write_cache=$(echo $wc | tr ' ' _)"
mount -t ext4 /dev/vda /mnt || { say error "cannot mount /dev/vda"; finish; }
cd /mnt
CM_STEP=0
. /etc/cm-workload.sh
cm_cut end
"""

ROLE_VERIFY = r"""
wait_disk vda
mount -t ext4 /dev/vda /mnt || { say error "cannot mount /dev/vda"; finish; }
for f in /mnt/*; do
  [ -f "$f" ] || continue
  sum=$(md5sum < "$f"); say file "${f#/mnt/}" "${sum%% *}" "$(stat -c %s "$f")"
done
say listed
umount /mnt
"""

ROLE_NBD = rf"""
ip link set lo up
ip link set eth0 up || {{ say error "no eth0"; finish; }}
ip addr add 10.0.2.15/24 dev eth0
n=0
until timeout 20 nbd-client {NBD_GUEST_ADDRESS} {NBD_GUEST_PORT} /dev/nbd0 -N "$CM_export" -b 4096 >/tmp/nbd.log 2>&1
do
  n=$((n + 1)); [ $n -ge 3 ] && {{ say error "nbd-client: $(tail -n 1 /tmp/nbd.log)"; finish; }}
  sleep 1
done
wc=$(cat /sys/block/nbd0/queue/write_cache)
say ready "write_cache=$(echo $wc | tr ' ' _)"
head -c 262144 /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of=/dev/nbd0 bs=65536 oflag=direct conv=fsync 2>/dev/null || say error "dd to /dev/nbd0 failed"
sum=$(md5sum < /tmp/pattern); say step 1 fsynced nbd0 "${{sum%% *}}"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
"""

ROLES = {"crash": ROLE_CRASH, "verify": ROLE_VERIFY, "nbd": ROLE_NBD, "probe": ""}

FSYNC_FILES = r"""
i=1
while [ $i -le "$CM_files" ]; do
  f=$(printf 'f%03d' $i)
  head -c 7168 /dev/urandom > "$f"
  if [ $((i % 2)) -eq 0 ]; then sync "$f"; sync .; cm_step fsynced "$f"; else cm_step wrote "$f"; fi
  i=$((i + 1))
done
"""

# Each file first exists in an old version (synced before the steps start), then each step replaces it the
# way editors and databases do: write a temporary file, rename it over the old one. Even steps fsync the new
# file before the rename and the directory after (durable); odd steps only rename (ordered, not durable: the
# file must read as the old or the new version, never empty).
RENAME = r"""
i=1
while [ $i -le "$CM_files" ]; do f=$(printf 'f%03d' $i); echo "old $f" > "$f"; i=$((i + 1)); done
sync
i=1
while [ $i -le "$CM_files" ]; do
  f=$(printf 'f%03d' $i)
  head -c 7168 /dev/urandom > "$f.tmp"
  if [ $((i % 2)) -eq 0 ]; then
    sync "$f.tmp"; mv "$f.tmp" "$f"; sync .; cm_step fsynced "$f"
  else
    mv "$f.tmp" "$f"; cm_step renamed "$f"
  fi
  i=$((i + 1))
done
"""

# Writes that reach the disk without a flush: every file is made (zeros) and synced first, then the first half
# of the steps overwrite their file in place with O_DIRECT and fsync it, and the second half overwrite theirs
# with O_DIRECT and no fsync. Those last writes were acknowledged by the disk but never flushed (no later flush
# covers them), so whether they survive is up to the host: the mode's page cache and the device's cache.
DIRECT = r"""
i=1
while [ $i -le "$CM_files" ]; do dd if=/dev/zero of=$(printf 'f%03d' $i) bs=8192 count=1 2>/dev/null; i=$((i + 1)); done
sync
half=$(((CM_files + 1) / 2))
i=1
while [ $i -le "$CM_files" ]; do
  f=$(printf 'f%03d' $i)
  head -c 8192 /dev/urandom > /tmp/block
  if [ $i -le $half ]; then
    dd if=/tmp/block of="$f" bs=8192 oflag=direct conv=notrunc,fsync 2>/dev/null; cm_step fsynced "$f"
  else
    dd if=/tmp/block of="$f" bs=8192 oflag=direct conv=notrunc 2>/dev/null; cm_step wrote "$f"
  fi
  i=$((i + 1))
done
"""

SQLITE = r"""
sqlite3 db.sqlite "PRAGMA journal_mode=DELETE; CREATE TABLE t(n INTEGER PRIMARY KEY, v BLOB);" >/dev/null \
  || { say error "sqlite3 cannot create db.sqlite"; finish; }
sync db.sqlite; sync .
i=1
while [ $i -le "$CM_files" ]; do
  sqlite3 db.sqlite "PRAGMA synchronous=$CM_sqlite_sync; INSERT INTO t VALUES($i, randomblob(3000));" \
    || { say error "commit $i failed"; finish; }
  cm_step committed "$i"
  i=$((i + 1))
done
"""


def old_version(name: str) -> bytes:
    """What the rename workload writes into a file before its step replaces it."""
    return f"old {name}\n".encode()


@dataclass(frozen=True)
class Workload:
    """A workload: its shell script and the host programs it needs in the guest."""

    name: str
    script: str
    programs: tuple[str, ...] = ()


BUILTIN: dict[str, Workload] = {
    "fsync-files": Workload("fsync-files", FSYNC_FILES),
    "rename": Workload("rename", RENAME),
    "direct": Workload("direct", DIRECT),
    "sqlite": Workload("sqlite", SQLITE, ("sqlite3",)),
}


def load_workload(spec: str) -> Workload:
    """A built-in workload by name, or a user's shell script by path."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise VmError(f"--workload {spec}: neither a built-in workload ({', '.join(BUILTIN)}) nor a file")
    try:
        return Workload(path.name, path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise VmError(f"--workload {spec}: cannot read it: {exc}") from None
