"""The write log: completion order, dm-log-writes barrier semantics with concurrent writes, bad logs."""

from __future__ import annotations

import threading

import pytest

from cachemode.disk.layer import Layer
from cachemode.lab.disk import LabConfig, LabDisk
from cachemode.lab.explore import CrashModel
from cachemode.lab.layers import MemoryDisk
from cachemode.lab.record import FLUSH, WRITE, LogError, Recorder, read_log
from cachemode.modes import get_mode


class Gate(Layer):
    """Holds a write to offset 0 until released, so the test controls completion order."""

    def __init__(self, lower: Layer) -> None:
        super().__init__(lower)
        self.arrived = threading.Event()
        self.release = threading.Event()

    def pwrite(self, data, offset, *, fua=False):
        if offset == 0:
            self.arrived.set()
            assert self.release.wait(10)
        self.lower.pwrite(data, offset, fua=fua)


def test_flush_covers_only_writes_completed_before_it_was_issued(tmp_path):
    # The dm-log-writes example: W1 submitted, W2 completes, FLUSH issued, then W1 completes.
    gate = Gate(MemoryDisk(1 << 16))
    rec = Recorder(gate, tmp_path / "w.log")
    w1 = threading.Thread(target=rec.pwrite, args=(b"1" * 512, 0))
    w1.start()
    assert gate.arrived.wait(10)
    rec.pwrite(b"2" * 512, 512)
    rec.flush()  # issued and completed while W1 is still in flight
    gate.release.set()
    w1.join(10)
    rec.close()
    log = read_log(tmp_path / "w.log")
    kinds = [(e.kind, e.offset) for e in log.entries]
    assert kinds == [(WRITE, 512), (FLUSH, 0), (WRITE, 0)]
    assert log.entries[1].covers == 1
    model = CrashModel(log, get_mode("writeback"))
    assert model.durable(3) == [0]  # W2 is durable ...
    assert model.candidates(3) == [2]  # ... W1 completed after the flush was issued: only a candidate


def test_flush_completing_after_a_later_write_still_covers_only_its_prefix(tmp_path):
    # W2 completes, FLUSH issued (slow), W3 completes meanwhile, FLUSH completes: log W2, W3, FLUSH(covers=1)
    class SlowFlush(Layer):
        def __init__(self, lower):
            super().__init__(lower)
            self.in_flush = threading.Event()
            self.go = threading.Event()

        def flush(self):
            self.in_flush.set()
            assert self.go.wait(10)

    slow = SlowFlush(MemoryDisk(1 << 16))
    rec = Recorder(slow, tmp_path / "w.log")
    rec.pwrite(b"2" * 512, 512)
    t = threading.Thread(target=rec.flush)
    t.start()
    assert slow.in_flush.wait(10)
    rec.pwrite(b"3" * 512, 1024)
    slow.go.set()
    t.join(10)
    rec.close()
    log = read_log(tmp_path / "w.log")
    assert [e.kind for e in log.entries] == [WRITE, WRITE, FLUSH]
    assert log.entries[2].covers == 1
    model = CrashModel(log, get_mode("writeback"))
    assert model.durable(3) == [0] and model.candidates(3) == [1]


def test_fua_and_mode_barriers(tmp_path):
    disk = LabDisk(MemoryDisk(1 << 16), "writeback", LabConfig(record=str(tmp_path / "w.log")))
    disk.pwrite(b"a" * 512, 0)
    disk.pwrite(b"b" * 512, 512, fua=True)
    disk.flush()
    disk.pwrite(b"c" * 512, 1024)
    disk.mark("end")
    disk.close()
    log = read_log(tmp_path / "w.log")
    assert [e.name for e in log.entries] == ["write", "write", "flush", "write", "end"]
    assert log.entries[1].fua and not log.entries[0].fua
    wb = CrashModel(log, get_mode("writeback"))
    assert wb.durable(2) == [1] and wb.candidates(2) == [0]
    assert wb.durable(5) == [0, 1] and wb.candidates(5) == [3]
    wt = CrashModel(log, get_mode("writethrough"))
    assert wt.candidates(5) == [] and wt.durable(5) == [0, 1, 3]
    unsafe = CrashModel(log, get_mode("unsafe"))
    assert unsafe.durable(5) == [] and unsafe.candidates(5) == [0, 1, 3]
    assert wb.marks_before(5) == ["end"] and wb.marks_before(4) == []


def _good_log(tmp_path):
    rec = Recorder(MemoryDisk(4096), tmp_path / "good.log")
    rec.pwrite(b"x" * 100, 10)
    rec.flush()
    rec.close()
    return (tmp_path / "good.log").read_bytes()


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"garbage" + b[7:], "not a cachemode write log"),
        (lambda b: b[: 16 + 40 + 50], "truncated data"),
        (lambda b: b[:16] + b[16:60] + bytes([b[60] ^ 0xFF]) + b[61:], "checksum"),
        (lambda b: b[:16] + b"\x09" + b[17:], "unknown entry kind"),
        (lambda b: b + b"\x01\x00", "truncated header"),
    ],
)
def test_garbled_logs_are_clear_errors(tmp_path, mangle, message):
    bad = tmp_path / "bad.log"
    bad.write_bytes(mangle(_good_log(tmp_path)))
    with pytest.raises(LogError, match=message):
        read_log(bad)


def test_missing_log(tmp_path):
    with pytest.raises(LogError, match="no such write log"):
        read_log(tmp_path / "nope.log")
