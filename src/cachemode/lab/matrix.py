"""The durability matrix, measured: every mode x {guest crash, process crash, power loss}.

Each cell runs the same built-in workload on a fresh lab disk, applies the failure, reads the disk back the
way the next boot would, and counts which acknowledged writes are gone. Nothing here consults the mode
table's ``survival``: the figures come from running the layers; the tests compare them with the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cachemode.lab.disk import LabConfig, LabDisk
from cachemode.lab.layers import MemoryDisk
from cachemode.modes import MODES, CacheMode, Failure, get_mode
from cachemode.units import format_size

SLOT = 4096


@dataclass(frozen=True)
class Op:
    kind: str  # "write", "fua", "flush"
    slot: int = -1


def workload() -> list[Op]:
    """24 writes to distinct 4 KiB slots: some flushed, some FUA, some left unflushed, a FUA among those.

    A FUA write covers only itself, so plain writes before it stay unflushed -- the workload checks that too.
    """
    ops: list[Op] = [Op("write", s) for s in range(0, 6)]
    ops.append(Op("flush"))
    ops += [Op("fua", s) for s in range(6, 10)]
    ops += [Op("write", s) for s in range(10, 14)]
    ops.append(Op("flush"))
    ops += [Op("write", s) for s in range(14, 18)]
    ops.append(Op("fua", 18))  # flushes nothing but itself
    ops += [Op("write", s) for s in range(19, 24)]
    return ops


def _pattern(slot: int) -> bytes:
    return bytes([(slot * 7 + 1) & 0xFF]) * (SLOT - 8) + slot.to_bytes(8, "little")


@dataclass
class Cell:
    mode: str
    failure: str
    disk_cache: int
    acked_unflushed: int
    acked_unflushed_lost: int
    flushed: int
    flushed_lost: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_cell(
    mode: CacheMode,
    failure: Failure,
    config: LabConfig,
    *,
    write_cache: bool = True,
    survivors: str = "worst",
    seed: int | None = None,
) -> Cell:
    """Run the workload on a fresh in-memory lab disk, apply ``failure``, count lost writes by category."""
    ops = workload()
    nslots = max(op.slot for op in ops) + 1
    disk = LabDisk(MemoryDisk(nslots * SLOT), mode, config, write_cache=write_cache)
    flushed: set[int] = set()
    pending: set[int] = set()
    for op in ops:
        if op.kind == "flush":
            disk.flush()
            flushed |= pending  # a FLUSH covers every write that completed before it
            pending.clear()
        else:
            disk.pwrite(_pattern(op.slot), op.slot * SLOT, fua=op.kind == "fua")
            (flushed if op.kind == "fua" else pending).add(op.slot)
    if failure is Failure.GUEST_CRASH:
        pass  # the guest vanishes without flushing; the hypervisor and host keep running
    elif failure is Failure.PROCESS_CRASH:
        disk.crash_process()
    else:
        disk.power_cut(survivors, seed)
    lost = {s for s in flushed | pending if disk.pread(SLOT, s * SLOT) != _pattern(s)}
    return Cell(
        mode.name,
        failure.value,
        config.disk_cache,
        len(pending),
        len(lost & pending),
        len(flushed),
        len(lost & flushed),
    )


def run_matrix(
    config: LabConfig | None = None,
    *,
    modes: list[str] | None = None,
    write_cache: bool = True,
    survivors: str = "worst",
    seed: int | None = None,
) -> list[Cell]:
    config = config or LabConfig()
    chosen = [get_mode(m) for m in modes] if modes else list(MODES)
    return [
        run_cell(m, f, config, write_cache=write_cache, survivors=survivors, seed=seed) for m in chosen for f in Failure
    ]


def plot_matrix(cells: list[Cell], path: str) -> None:
    """A heat map: rows are modes, columns failure x {unflushed lost, flushed lost}, colour = fraction lost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(dict.fromkeys(c.mode for c in cells))
    failures = list(dict.fromkeys(c.failure for c in cells))
    cols = [(f, k) for f in failures for k in ("unflushed", "flushed")]
    grid = np.zeros((len(modes), len(cols)))
    text = [["" for _ in cols] for _ in modes]
    for c in cells:
        r = modes.index(c.mode)
        for k, lost, total in (
            ("unflushed", c.acked_unflushed_lost, c.acked_unflushed),
            ("flushed", c.flushed_lost, c.flushed),
        ):
            j = cols.index((c.failure, k))
            grid[r, j] = lost / total if total else 0.0
            text[r][j] = f"{lost}/{total}"
    fig, ax = plt.subplots(figsize=(1.5 * len(cols) + 2, 0.6 * len(modes) + 1.8))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{Failure(f).label}\n{k} lost" for f, k in cols], fontsize=8)
    ax.set_yticks(range(len(modes)))
    ax.set_yticklabels(modes)
    for r in range(len(modes)):
        for j in range(len(cols)):
            ax.text(j, r, text[r][j], ha="center", va="center", color="black" if grid[r, j] < 0.6 else "white")
    dc = cells[0].disk_cache if cells else 0
    ax.set_title(f"Acknowledged writes lost, measured in the lab (device write cache {format_size(dc)})")
    fig.colorbar(im, ax=ax, label="fraction lost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
