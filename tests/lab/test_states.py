"""Crash states as sector runs: exact de-duplication, and scratch images that come back to the base."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cachemode.lab.checking import BaseImage, CheckContext, CommandChecker, ScratchImage, check_batch, release
from cachemode.lab.explore import CrashState
from cachemode.lab.record import WRITE, ZERO, LogEntry, WriteLog
from cachemode.lab.states import StateBuilder

SIZE = 8192


def materialise(log: WriteLog, base: bytes, state: CrashState, sector: int) -> bytes:
    """Plain forward replay of the state's writes (the definition the builder must match)."""
    torn = dict(state.torn)
    img = bytearray(base)
    for i in sorted({*state.durable, *state.kept, *torn}):
        e = log.entries[i]
        data = e.data if e.kind == WRITE else bytes(e.length)
        for s in range(e.offset // sector, (e.offset + e.length + sector - 1) // sector):
            if i in torn and s not in torn[i]:
                continue
            lo, hi = max(e.offset, s * sector), min(e.offset + e.length, (s + 1) * sector)
            img[lo:hi] = data[lo - e.offset : hi - e.offset]
    return bytes(img)


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(
        # few offsets and contents, so that different write sets often make the same image
        st.tuples(st.sampled_from([0, 512, 700, 1024, 4096]), st.sampled_from([300, 512, 1024]), st.integers(0, 2)),
        min_size=2,
        max_size=7,
    ),
    seed=st.integers(0, 1000),
)
def test_states_are_merged_exactly_when_their_images_are_equal(writes, seed):
    base = bytes(SIZE)  # zeros: a write of zeros leaves the base as it was, like a ZERO entry
    entries = []
    for i, (off, length, byte) in enumerate(writes):
        if byte == 2:
            entries.append(LogEntry(i, ZERO, off, length))
        else:
            entries.append(LogEntry(i, WRITE, off, length, data=bytes([byte]) * length))
    log = WriteLog(SIZE, entries)
    rng = random.Random(seed)
    builder = StateBuilder(log, 512, lambda n, o: base[o : o + n])
    kept_images: list[bytes] = []
    for _ in range(30):
        chosen = tuple(i for i in range(len(entries)) if rng.random() < 0.5)
        torn = ()
        if chosen and rng.random() < 0.3:
            e = entries[chosen[0]]
            secs = range(e.offset // 512, (e.offset + e.length + 511) // 512)
            torn = ((chosen[0], tuple(s for s in secs if rng.random() < 0.5)),)
            chosen = chosen[1:]
        state = CrashState(len(entries), "torn", (), chosen, torn)
        image = materialise(log, base, state, 512)
        overlay = builder.build(state.durable, state.kept, state.torn)
        if overlay is None:
            assert image in kept_images  # merged: the same image was built before
            continue
        assert image not in kept_images  # kept: no earlier state made this image
        kept_images.append(image)
        got = bytearray(base)
        for offset, data in overlay.pieces(builder.pool, SIZE):
            got[offset : offset + len(data)] = data
        assert bytes(got) == image


def test_scratch_image_restores_what_a_fast_writing_checker_changed(tmp_path):
    """A checker that writes at once (within the same clock tick as our own writes) is still undone."""
    base = tmp_path / "base.img"
    content = os.urandom(SIZE)
    base.write_bytes(content)
    log = WriteLog(SIZE, [LogEntry(0, WRITE, 0, 512, data=b"\x11" * 512)])
    builder = StateBuilder(log, 512, lambda n, o: content[o : o + n])
    overlay = builder.build((0,), (), ())
    scratch = ScratchImage(str(base), str(tmp_path))
    try:
        for scribble in (False, True):
            scratch.prepare(overlay, builder.pool)
            assert Path(scratch.path).read_bytes()[:512] == b"\x11" * 512
            if scribble:
                with open(scratch.path, "r+b") as f:
                    f.seek(6000)
                    f.write(b"Z" * 100)
            scratch.restore(overlay)
            assert Path(scratch.path).read_bytes() == content
    finally:
        scratch.remove()


def test_a_checker_that_grows_the_image_is_undone_and_the_states_stay_independent(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(bytes(SIZE))
    script = tmp_path / "grow.py"
    script.write_text(
        "import sys\n"
        "d = open(sys.argv[1], 'rb').read()\n"
        "ok = len(d) == 8192 and d[4096:4104] == bytes(8)\n"  # nothing left over from an earlier state
        "open(sys.argv[1], 'ab').write(b'junk' * 100)\n"
        "open(sys.argv[1], 'r+b').write(b'x' * 5000)\n"
        "sys.exit(0 if ok else 1)\n"
    )
    log = WriteLog(SIZE, [LogEntry(0, WRITE, 0, 512, data=b"\x11" * 512)])
    builder = StateBuilder(log, 512, lambda n, o: bytes(n))
    states = [CrashState(1, "subset", (), kept) for kept in ((), (0,))]
    overlays = [builder.build(s.durable, s.kept, s.torn) for s in states]
    ctx = CheckContext(
        CommandChecker(f"{sys.executable} {script} {{image}}"), BaseImage(SIZE, path=str(base)), builder.pool, 512
    )
    try:
        results, how = check_batch(
            [(i, s, o.runs) for i, (s, o) in enumerate(zip(states, overlays, strict=True))] * 2, ctx
        )
    finally:
        release(ctx.token)
    assert [o.ok for _, o in results] == [True] * 4, results
    assert how in ("reflink", "copy-once+restore")
    assert base.read_bytes() == bytes(SIZE)
