"""``cachemode vm matrix``: the crash run for every mode and the set-ups that tell where loss comes from.

Rows: the five modes with the guest's write cache on; writeback and none with it off (QEMU then sends every
write with FUA); none with no device cache (``--disk-cache 0``); and none and writethrough on a device that
ignores FLUSH and FUA. Next to each, what ``cachemode modes`` promises for fsynced data at a power loss,
assuming a device that honours flushes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cachemode.modes import MODES, Failure, get_mode
from cachemode.vm.run import RunOptions, prepare, run_vm


@dataclass(frozen=True)
class Row:
    label: str
    mode: str
    write_cache: bool = True
    disk_cache: int | None = None
    disk_flush: str = "honour"


ROWS: tuple[Row, ...] = (
    *(Row(m.name, m.name) for m in MODES),
    Row("writeback wc=off", "writeback", write_cache=False),
    Row("none wc=off", "none", write_cache=False),
    Row("none disk-cache=0", "none", disk_cache=0),
    Row("none lying disk", "none", disk_flush="ignore"),
    Row("writethrough lying disk", "writethrough", disk_flush="ignore"),
)


def promised(row: Row) -> str:
    """What the mode table says about fsynced data at a power loss (for a device that honours flushes)."""
    survival = get_mode(row.mode).survival(Failure.POWER_LOSS, row.write_cache)
    if survival.acked:
        return "all acked kept"
    return "fsynced kept" if survival.flushed else "may lose fsynced"


def run_matrix(
    *,
    explore_states: int | None = None,
    verify_boot: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
    rows: tuple[Row, ...] = ROWS,
    **common: Any,
) -> list[dict[str, Any]]:
    """One crash run per row, sharing one kernel, initramfs and accelerator choice."""
    base = RunOptions(explore_states=explore_states, verify_boot=verify_boot, **common)
    out = []
    with tempfile.TemporaryDirectory(prefix="cachemode-vm-matrix-") as tmp:
        prepared = prepare(base, Path(tmp))
        for row in rows:
            progress(f"[{len(out) + 1}/{len(rows)}] {row.label}")
            opts = replace(
                base, mode=row.mode, write_cache=row.write_cache, disk_cache=row.disk_cache, disk_flush=row.disk_flush
            )
            result = run_vm(opts, prepared)
            result.pop("files", None)
            out.append({"row": row.label, "promised": promised(row), **result})
    return out


def plot_rows(rows: list[dict[str, Any]], path: str) -> None:
    """A horizontal bar chart: the share of fsynced and of unsynced steps lost, per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["row"] for r in rows]
    fs = [r["fsynced_lost"] / r["fsynced_total"] if r["fsynced_total"] else 0.0 for r in rows]
    un = [r["unsynced_lost"] / r["unsynced_total"] if r["unsynced_total"] else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], fs, height=0.4, label="fsynced lost", color="#c0392b")
    ax.barh([y + 0.2 for y in ys], un, height=0.4, label="unsynced lost", color="#95a5a6")
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of acknowledged steps lost at the power cut")
    ax.set_title("a real Linux guest (ext4) on the lab disk")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
