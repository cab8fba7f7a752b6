"""Cache and hierarchy descriptions: validation, --level specs and TOML."""

from __future__ import annotations

import pytest

from cachemode.cpu.config import (
    CacheConfig,
    ConfigError,
    Hierarchy,
    Level,
    hierarchy_from_specs,
    load_toml,
    parse_level_spec,
    parse_size,
)


def test_sizes_and_defaults():
    assert parse_size("8k") == 8192 and parse_size("1M") == 1 << 20 and parse_size("64KiB") == 65536
    c = CacheConfig("32k", 64, 8)
    assert (c.nsets, c.nblocks, c.repl, c.walloc, c.wback, c.ralloc) == (64, 512, "lru", "a", "a", "a")
    assert CacheConfig("1k", 16, "full").assoc == 64
    assert CacheConfig(1024, 16, 0).nsets == 1
    assert CacheConfig(1024, 16, 2, repl="f", wback="through", walloc="never", ralloc="through").params()[3:7] == (
        1,
        1,
        1,
        0,
    )


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"size": 1000, "block_size": 16}, "cache size 1000 is not a power of 2"),
        ({"size": 1024, "block_size": 24}, "block size 24 is not a power of 2"),
        ({"size": 16, "block_size": 32}, "larger than the cache"),
        ({"size": 1024, "block_size": 16, "assoc": 128}, "exceeds the 64 blocks"),
        ({"size": 1024, "block_size": 16, "assoc": 3, "repl": "plru"}, "power-of-2 associativity"),
        ({"size": 1024, "block_size": 16, "assoc": 2, "repl": "mru"}, "replacement policy 'mru'"),
        ({"size": 1024, "block_size": 16, "walloc": "x"}, "write-allocate policy 'x'"),
        ({"size": "8q", "block_size": 16}, "is not a number"),
    ],
)
def test_validation_errors(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        CacheConfig(**kw)


def test_associativity_that_does_not_divide_the_blocks_rounds_the_sets_down_as_dinero_does():
    cfg = CacheConfig("8k", 16, 3)  # Dinero IV: -l1-uassoc 3 gives 8192 / (16 * 3) = 170 sets
    assert (cfg.nsets, cfg.nblocks) == (170, 510)


def test_level_specs():
    lev, kind, cfg = parse_level_spec("l2-u:1m:64:16:repl=fifo:wback=n:ccc:seed=3")
    assert (lev, kind, cfg.size, cfg.assoc, cfg.repl, cfg.wback, cfg.ccc, cfg.seed) == (
        2, "u", 1 << 20, 16, "fifo", "n", True, 3,
    )  # fmt: skip
    h = hierarchy_from_specs(["i:32k:64:8", "d:32k:64:8", "u:1m:64:16"])
    assert [n for n, _ in h.caches()] == ["l1-icache", "l1-dcache", "l2-ucache"]
    with pytest.raises(ConfigError, match="not \\[lN-\\]T:SIZE"):
        parse_level_spec("32k:64:8")
    with pytest.raises(ConfigError, match="unknown option 'speed=1'"):
        parse_level_spec("u:32k:64:8:speed=1")
    with pytest.raises(ConfigError, match="no level 1 cache"):
        hierarchy_from_specs(["l2-u:1m:64:16"])


def test_hierarchy_rules():
    c = CacheConfig(1024, 16, 1)
    with pytest.raises(ConfigError, match="at most 5"):
        Hierarchy([Level(unified=c)] * 6)
    with pytest.raises(ConfigError, match="split levels must come first"):
        Hierarchy([Level(unified=c), Level(icache=c, dcache=c)])
    with pytest.raises(ConfigError, match="not both"):
        Level(unified=c, icache=c)


def test_toml(tmp_path):
    p = tmp_path / "h.toml"
    p.write_text(
        '[[level]]\ni = { size = "32k", block = 64, assoc = 8 }\n'
        'd = { size = "32k", block = 64, assoc = 8, wback = "n", walloc = "n" }\n'
        '[[level]]\nu = { size = "1m", block = 64, assoc = 16, repl = "plru", ccc = true }\n'
    )
    h = load_toml(str(p))
    assert h.caches()[1][1].wback == "n" and h.caches()[2][1].repl == "plru" and h.caches()[2][1].ccc
    p.write_text('[[level]]\nu = { size = "1k", block = 16, colour = "red" }\n')
    with pytest.raises(ConfigError, match="unknown option\\(s\\) colour"):
        load_toml(str(p))
    p.write_text("[[level]\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(str(p))
