/* cachemode.cpu._core: the compiled core of the CPU cache simulator.
 *
 * Built from this file at install time (setuptools ext_modules), so a run pays neither a JIT compiler's import
 * nor its compilation: a 1,000-reference run starts in the time Python and NumPy take to import.
 *
 * Three entry points, each working on buffers the Python side owns (NumPy arrays):
 *   parse_text(data, fmt, types, addrs, sizes, line0)   text trace bytes -> records (din, xdin, lackey)
 *   run(general, stream, start, stop, k0, state, out)   one cache over an event stream (Dinero IV's rules)
 *   rehash(old, new)                                      grow the set of blocks seen (3C compulsory misses)
 *
 * The cache state is flat arrays: tags[set * assoc + way] holds the block number (-1 when invalid), stamp the
 * last use (LRU) or the insertion time (FIFO), dirty a byte, plru the tree bits (assoc - 1 per set). Caches with
 * many ways, and the fully associative shadow cache of 3C classification, also keep an open-addressing hash from
 * block number to slot. The kernels are resumable: they stop when an output buffer could overflow and the caller
 * drains it and calls again. The GIL is released while a kernel runs, so set-partitioned runs use every core.
 *
 * Downstream events follow Dinero IV's order: per piece of a reference (a reference crossing a block boundary is
 * split; the remainder is handled last as a separate demand fetch) the fill read, then the write-through, then
 * the victim write-back. Copy-back events (type 4) write dirty blocks back (the whole cache when the size is 0:
 * sets from last to first, least recently used first within a set) and are passed on; invalidates (type 5) drop
 * blocks without writing them back and are passed on.
 *
 * A set is (block % sets): a mask when the number of sets is a power of two, a division otherwise (Dinero IV
 * accepts any associativity, e.g. 3, and then has size / (block * assoc) sets, rounded down). Each kernel is
 * instantiated for both cases, so the common one pays nothing for the other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* counter layout (int64 array); the Python side reads these names from the module */
enum {
    FETCH = 0, MISS = 4, COMP = 8, CAP = 12, CONF = 16, MULTIBLOCK = 20, BYTES_READ = 21, BYTES_WRITTEN = 22,
    WRITEBACKS = 23, COPYBACK_BLOCKS = 24, COPYBACK_BYTES = 25, WRITETHROUGHS = 26, FILLS = 27,
    INVALIDATED_DIRTY = 28, NCOUNTERS = 32
};
#define HASH_MIN_ASSOC 33 /* caches with more ways than this use the block -> slot hash */
/* scalar state slots (int64 array st) */
enum { ST_CLK, ST_FCLK, ST_RNG, ST_FRNG, ST_NSEEN, ST_FHEAD, ST_FTAIL, ST_NFREE, NST };
/* parameter slots (int64 array prm) */
enum { P_LGB, P_NSETS, P_ASSOC, P_REPL, P_WALLOC, P_WBACK, P_RALLOC, P_CCC, P_EMIT, P_ORG0, P_PSHIFT, P_PMASK, P_PID,
       P_SIDE, NPRM };
/* P_SIDE: 0 every event; 1 instruction side (fetches and invalidates); 2 data side (all but fetches) */
#define OTHER_SIDE(side, t) ((side) && ((side) == 1 ? ((t) != 2 && (t) != 5) : (t) == 2))
/* why a kernel stopped */
enum { DONE = 0, OUT_FULL = 1, SEEN_FULL = 2, SPECIAL = 3 };

typedef struct {
    /* input stream */
    const int8_t *types;
    const uint64_t *addrs;
    const uint16_t *sz16; /* sizes are uint16 (trace records) or uint32 (events from a level above) */
    const uint32_t *sz32;
    const int64_t *origin; /* trace index of each event; NULL: the event index plus prm[P_ORG0] */
    Py_ssize_t n;
    /* state */
    int64_t *prm, *st, *tags, *stamp, *hkeys, *hvals, *flink, *ffree, *ftags, *fstamp, *fhkeys, *fhvals, *seen, *cnt;
    uint8_t *dirty, *plru, *fplru;
    Py_ssize_t nh, nf, nfh, nseen;
    /* output */
    int8_t *otypes;
    uint64_t *oaddrs;
    uint32_t *osizes;
    int64_t *oorig;
    Py_ssize_t cap;
} Kern;

static inline int64_t size_at(const Kern *K, Py_ssize_t e) { return K->sz16 ? K->sz16[e] : (int64_t)K->sz32[e]; }

static inline Py_ssize_t put(const Kern *K, Py_ssize_t k, int t, uint64_t addr, int64_t size, int64_t org) {
    K->otypes[k] = (int8_t)t;
    K->oaddrs[k] = addr;
    K->osizes[k] = (uint32_t)size;
    K->oorig[k] = org;
    return k + 1;
}

/* ---- open-addressing hash (keys -1 = empty) ---- */
static inline int64_t hslot(int64_t key, int64_t hmask) {
    uint64_t x = (uint64_t)key * 0x9E3779B97F4A7C15ULL;
    return (int64_t)((x >> 29) & (uint64_t)hmask);
}
static int64_t hfind(const int64_t *hk, const int64_t *hv, int64_t hmask, int64_t key) {
    int64_t i = hslot(key, hmask);
    for (;;) {
        int64_t k = hk[i];
        if (k == key) return hv[i];
        if (k == -1) return -1;
        i = (i + 1) & hmask;
    }
}
static void hput(int64_t *hk, int64_t *hv, int64_t hmask, int64_t key, int64_t val) {
    int64_t i = hslot(key, hmask);
    while (hk[i] != -1 && hk[i] != key) i = (i + 1) & hmask;
    hk[i] = key;
    hv[i] = val;
}
static void hdel(int64_t *hk, int64_t *hv, int64_t hmask, int64_t key) {
    int64_t i = hslot(key, hmask);
    for (;;) {
        int64_t k = hk[i];
        if (k == -1) return;
        if (k == key) break;
        i = (i + 1) & hmask;
    }
    int64_t j = i;
    for (;;) {
        j = (j + 1) & hmask;
        int64_t k = hk[j];
        if (k == -1) break;
        int64_t h = hslot(k, hmask);
        /* move k back into the hole at i unless its home lies cyclically in (i, j] */
        int stay = i <= j ? (i < h && h <= j) : (h > i || h <= j);
        if (!stay) {
            hk[i] = k;
            hv[i] = hv[j];
            i = j;
        }
    }
    hk[i] = -1;
}

static inline void plru_touch(uint8_t *plru, int64_t pbase, int64_t assoc, int64_t w) {
    int64_t node = w + assoc - 1;
    while (node > 0) {
        int64_t parent = (node - 1) >> 1;
        plru[pbase + parent] = node == 2 * parent + 1; /* used the left half: next victim on the right */
        node = parent;
    }
}

static inline uint64_t xorshift(uint64_t r) {
    r ^= r << 13;
    r ^= r >> 7;
    r ^= r << 17;
    return r;
}

/* the way to fill: an invalid way if any, else by policy */
static int64_t victim(const int64_t *tags, const int64_t *stamp, const uint8_t *plru, int64_t base, int64_t pbase,
                      int64_t assoc, int64_t repl, uint64_t *rng) {
    for (int64_t w = 0; w < assoc; w++)
        if (tags[base + w] < 0) return w;
    if (repl == 2) {
        *rng = xorshift(*rng);
        return (int64_t)(*rng % (uint64_t)assoc);
    }
    if (repl == 3) {
        int64_t node = 0;
        while (node < assoc - 1) node = 2 * node + 1 + plru[pbase + node];
        return node - (assoc - 1);
    }
    int64_t best = 0, bs = stamp[base];
    for (int64_t w = 1; w < assoc; w++)
        if (stamp[base + w] < bs) {
            bs = stamp[base + w];
            best = w;
        }
    return best;
}

static inline void unlink_slot(int64_t *flink, int64_t w, int64_t *head, int64_t *tail) {
    int64_t prv = flink[2 * w], nxt = flink[2 * w + 1];
    if (prv >= 0) flink[2 * prv + 1] = nxt; else *head = nxt;
    if (nxt >= 0) flink[2 * nxt] = prv; else *tail = prv;
}
static inline void push_front(int64_t *flink, int64_t w, int64_t *head, int64_t *tail) {
    flink[2 * w] = -1;
    flink[2 * w + 1] = *head;
    if (*head >= 0) flink[2 * *head] = w; else *tail = w;
    *head = w;
}

typedef struct {
    int64_t stamp, way;
} StampWay;
static int by_stamp(const void *a, const void *b) {
    const StampWay *x = a, *y = b;
    if (x->stamp != y->stamp) return x->stamp < y->stamp ? -1 : 1;
    return x->way < y->way ? -1 : (x->way > y->way);
}

#define SET_OF(blk) (pow2 ? ((blk) & smask) : (int64_t)((uint64_t)(blk) % (uint64_t)nsets))

/* The general kernel: every policy, 3C shadow, hashed lookups, copy-back and invalidate events.
 * Processes events from start until stop or until an output/seen buffer could overflow; writes the next event
 * index to *next and the output count to *kout, and returns the reason it stopped. */
static inline int run_general(Kern *K, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t k0, Py_ssize_t *next,
                              Py_ssize_t *kout, const int pow2) {
    const int64_t *prm = K->prm;
    int64_t *st = K->st, *tags = K->tags, *stamp = K->stamp, *cnt = K->cnt;
    uint8_t *dirty = K->dirty, *plru = K->plru;
    const int64_t lgb = prm[P_LGB], nsets = prm[P_NSETS], assoc = prm[P_ASSOC], repl = prm[P_REPL];
    const int64_t walloc = prm[P_WALLOC], wback = prm[P_WBACK], ralloc = prm[P_RALLOC], ccc = prm[P_CCC];
    const int emit = prm[P_EMIT] != 0;
    const int64_t bsize = (int64_t)1 << lgb;
    const uint64_t boff = (uint64_t)(bsize - 1);
    const uint64_t upshift = (uint64_t)prm[P_PSHIFT], upmask = (uint64_t)prm[P_PMASK], upid = (uint64_t)prm[P_PID];
    const int64_t smask = nsets - 1, nb = nsets * assoc;
    const Py_ssize_t cap = K->cap;
    const int use_hash = assoc >= HASH_MIN_ASSOC;
    int64_t *hkeys = K->hkeys, *hvals = K->hvals;
    const int64_t hmask = K->nh - 1;
    int64_t *flink = K->flink, *ffree = K->ffree, *ftags = K->ftags, *fstamp = K->fstamp, *fhkeys = K->fhkeys,
            *fhvals = K->fhvals, *seen = K->seen;
    uint8_t *fplru = K->fplru;
    const int64_t fn = K->nf, fhmask = K->nfh - 1, smask2 = K->nseen - 1, seen_cap = K->nseen / 2;
    int64_t clk = st[ST_CLK], fclk = st[ST_FCLK], nseen = st[ST_NSEEN];
    uint64_t rng = (uint64_t)st[ST_RNG], frng = (uint64_t)st[ST_FRNG];
    const int listed = repl < 2; /* the LRU/FIFO shadow is a linked list, most recent first */
    int64_t fhead = st[ST_FHEAD], ftail = st[ST_FTAIL], nfree = st[ST_NFREE];
    StampWay *order = NULL;
    Py_ssize_t k = k0, e = start;
    int reason = DONE;

    const int64_t side = prm[P_SIDE];
    for (; e < stop; e++) {
        const int t = K->types[e];
        if (OTHER_SIDE(side, t)) continue;
        const uint64_t a = K->addrs[e];
        const int64_t sz = size_at(K, e);
        const int64_t org = K->origin ? K->origin[e] : prm[P_ORG0] + e;
        int64_t need;
        if (t == 4 || t == 5)
            need = (t == 4 && sz == 0) ? nb + 1 : 2;
        else
            need = 3 * ((int64_t)((a + (uint64_t)(sz - 1)) >> lgb) - (int64_t)(a >> lgb) + 1);
        if (emit && k + need > cap) {
            reason = OUT_FULL;
            break;
        }
        if (ccc && t < 4 && nseen + need > seen_cap) {
            reason = SEEN_FULL;
            break;
        }
        if (t >= 4 && sz > 0 && ((a >> upshift) & upmask) != upid) continue; /* another partition's block */
        if (t == 4) {
            if (sz == 0) {
                if (order == NULL) {
                    order = malloc(sizeof(StampWay) * (size_t)assoc);
                    if (order == NULL) {
                        reason = -1;
                        break;
                    }
                }
                for (int64_t s = nsets - 1; s >= 0; s--) {
                    int64_t base = s * assoc, nd = 0;
                    for (int64_t w = 0; w < assoc; w++)
                        if (tags[base + w] >= 0 && dirty[base + w]) {
                            order[nd].stamp = stamp[base + w];
                            order[nd].way = w;
                            nd++;
                        }
                    if (nd == 0) continue;
                    qsort(order, (size_t)nd, sizeof(StampWay), by_stamp); /* least recent first */
                    for (int64_t j = 0; j < nd; j++) {
                        int64_t best = order[j].way;
                        dirty[base + best] = 0;
                        cnt[COPYBACK_BLOCKS]++;
                        cnt[COPYBACK_BYTES] += bsize;
                        cnt[BYTES_WRITTEN] += bsize;
                        if (emit) k = put(K, k, 1, (uint64_t)tags[base + best] << lgb, bsize, org);
                    }
                }
            } else {
                int64_t blk = (int64_t)(a >> lgb), base = SET_OF(blk) * assoc, w = -1;
                if (use_hash) {
                    int64_t slot = hfind(hkeys, hvals, hmask, blk);
                    w = slot < 0 ? -1 : slot - base;
                } else
                    for (int64_t j = 0; j < assoc; j++)
                        if (tags[base + j] == blk) { w = j; break; }
                if (w >= 0 && dirty[base + w]) {
                    dirty[base + w] = 0;
                    cnt[COPYBACK_BLOCKS]++;
                    cnt[COPYBACK_BYTES] += bsize;
                    cnt[BYTES_WRITTEN] += bsize;
                    if (emit) k = put(K, k, 1, (uint64_t)blk << lgb, bsize, org);
                }
            }
            if (emit) k = put(K, k, 4, a, sz, org);
            continue;
        }
        if (t == 5) {
            if (sz == 0) {
                for (int64_t i = 0; i < nb; i++) {
                    if (tags[i] >= 0 && dirty[i]) cnt[INVALIDATED_DIRTY]++;
                    tags[i] = -1;
                    dirty[i] = 0;
                    stamp[i] = 0;
                }
                memset(plru, 0, nsets * (assoc - 1) > 0 ? (size_t)(nsets * (assoc - 1)) : 1);
                for (int64_t i = 0; i <= hmask; i++) hkeys[i] = -1;
                if (ccc) {
                    for (int64_t i = 0; i < fn; i++) {
                        ftags[i] = -1;
                        fstamp[i] = 0;
                        ffree[i] = fn - 1 - i;
                    }
                    memset(fplru, 0, fn > 1 ? (size_t)(fn - 1) : 1);
                    for (int64_t i = 0; i <= fhmask; i++) fhkeys[i] = -1;
                    for (int64_t i = 0; i <= smask2; i++) seen[i] = -1;
                    nseen = 0;
                    fhead = ftail = -1;
                    nfree = fn;
                }
            } else {
                int64_t blk = (int64_t)(a >> lgb), base = SET_OF(blk) * assoc, w = -1;
                if (use_hash) {
                    int64_t slot = hfind(hkeys, hvals, hmask, blk);
                    w = slot < 0 ? -1 : slot - base;
                } else
                    for (int64_t j = 0; j < assoc; j++)
                        if (tags[base + j] == blk) { w = j; break; }
                if (w >= 0) {
                    if (dirty[base + w]) cnt[INVALIDATED_DIRTY]++;
                    tags[base + w] = -1;
                    dirty[base + w] = 0;
                    stamp[base + w] = 0;
                    if (use_hash) hdel(hkeys, hvals, hmask, blk);
                }
                if (ccc) {
                    int64_t fw = hfind(fhkeys, fhvals, fhmask, blk);
                    if (fw >= 0) {
                        ftags[fw] = -1;
                        fstamp[fw] = 0;
                        hdel(fhkeys, fhvals, fhmask, blk);
                        if (listed) {
                            unlink_slot(flink, fw, &fhead, &ftail);
                            ffree[nfree++] = fw;
                        }
                    }
                }
            }
            if (emit) k = put(K, k, 5, a, sz, org);
            continue;
        }
        /* demand reference: split at block boundaries, pieces in address order */
        uint64_t pa = a;
        int64_t remaining = sz;
        const int is_write = t == 1;
        for (;;) {
            int64_t blk = (int64_t)(pa >> lgb);
            int64_t last = (int64_t)((pa + (uint64_t)(remaining - 1)) >> lgb);
            int mine = ((pa >> upshift) & upmask) == upid;
            int64_t psz;
            if (last != blk) {
                psz = bsize - (int64_t)(pa & boff);
                if (mine) cnt[MULTIBLOCK]++;
            } else
                psz = remaining;
            if (mine) {
                int64_t set = SET_OF(blk), base = set * assoc, pbase = set * (assoc - 1), w = -1;
                if (use_hash) {
                    int64_t slot = hfind(hkeys, hvals, hmask, blk);
                    w = slot < 0 ? -1 : slot - base;
                } else
                    for (int64_t j = 0; j < assoc; j++)
                        if (tags[base + j] == blk) { w = j; break; }
                int hit = w >= 0;
                int walloc_ok = is_write && (walloc == 0 || (walloc == 2 && psz == bsize));
                cnt[FETCH + t]++;
                if (!hit) cnt[MISS + t]++;
                int update = is_write ? (hit || walloc_ok) : (hit || ralloc != 0);
                int wb = 0;
                int64_t vic = -1;
                if (update) {
                    clk++;
                    if (hit) {
                        if (repl != 1) stamp[base + w] = clk;
                        if (repl == 3) plru_touch(plru, pbase, assoc, w);
                    } else {
                        w = victim(tags, stamp, plru, base, pbase, assoc, repl, &rng);
                        int64_t old = tags[base + w];
                        if (old >= 0) {
                            if (dirty[base + w]) vic = old;
                            if (use_hash) hdel(hkeys, hvals, hmask, old);
                        }
                        tags[base + w] = blk;
                        dirty[base + w] = 0;
                        stamp[base + w] = clk;
                        if (use_hash) hput(hkeys, hvals, hmask, blk, base + w);
                        if (repl == 3) plru_touch(plru, pbase, assoc, w);
                    }
                    if (is_write) {
                        /* wback f (nofetch): the affected block is valid once updated, so it always holds */
                        wb = wback != 1;
                        if (wb) dirty[base + w] = 1;
                    }
                }
                if (ccc) {
                    int64_t fw = hfind(fhkeys, fhvals, fhmask, blk);
                    int fhit = fw >= 0;
                    int fupdate = is_write ? (fhit || walloc_ok) : (fhit || ralloc != 0);
                    if (fupdate && listed) {
                        if (fhit) {
                            if (repl == 0 && fw != fhead) {
                                unlink_slot(flink, fw, &fhead, &ftail);
                                push_front(flink, fw, &fhead, &ftail);
                            }
                        } else {
                            if (nfree > 0)
                                fw = ffree[--nfree];
                            else {
                                fw = ftail;
                                unlink_slot(flink, fw, &fhead, &ftail);
                                hdel(fhkeys, fhvals, fhmask, ftags[fw]);
                            }
                            ftags[fw] = blk;
                            push_front(flink, fw, &fhead, &ftail);
                            hput(fhkeys, fhvals, fhmask, blk, fw);
                        }
                    } else if (fupdate) {
                        fclk++;
                        if (fhit) {
                            if (repl != 1) fstamp[fw] = fclk;
                            if (repl == 3) plru_touch(fplru, 0, fn, fw);
                        } else {
                            fw = victim(ftags, fstamp, fplru, 0, 0, fn, repl, &frng);
                            int64_t old = ftags[fw];
                            if (old >= 0) hdel(fhkeys, fhvals, fhmask, old);
                            ftags[fw] = blk;
                            fstamp[fw] = fclk;
                            hput(fhkeys, fhvals, fhmask, blk, fw);
                            if (repl == 3) plru_touch(fplru, 0, fn, fw);
                        }
                    }
                    if (!hit) {
                        if (fhit)
                            cnt[CONF + t]++;
                        else if (hfind(seen, seen, smask2, blk) != -1)
                            cnt[CAP + t]++;
                        else {
                            cnt[COMP + t]++;
                            hput(seen, seen, smask2, blk, blk);
                            nseen++;
                        }
                    }
                }
                /* downstream, in Dinero's order: fill read, write-through, victim write-back */
                if (!hit && (!is_write || (walloc_ok && psz != bsize))) {
                    cnt[FILLS]++;
                    cnt[BYTES_READ] += bsize;
                    if (emit) k = put(K, k, is_write ? 0 : t, (uint64_t)blk << lgb, bsize, org);
                }
                if (is_write && !wb) {
                    cnt[WRITETHROUGHS]++;
                    cnt[BYTES_WRITTEN] += psz;
                    if (emit) k = put(K, k, 1, pa, psz, org);
                }
                if (vic >= 0) {
                    cnt[WRITEBACKS]++;
                    cnt[BYTES_WRITTEN] += bsize;
                    if (emit) k = put(K, k, 1, (uint64_t)vic << lgb, bsize, org);
                }
            }
            if (last == blk) break;
            pa = (uint64_t)(blk + 1) << lgb;
            remaining -= psz;
        }
    }
    free(order);
    st[ST_CLK] = clk;
    st[ST_FCLK] = fclk;
    st[ST_RNG] = (int64_t)rng;
    st[ST_FRNG] = (int64_t)frng;
    st[ST_NSEEN] = nseen;
    st[ST_FHEAD] = fhead;
    st[ST_FTAIL] = ftail;
    st[ST_NFREE] = nfree;
    *next = e;
    *kout = k;
    return reason;
}

/* Four 64-bit lanes (GCC vector extensions), used only by the kernels compiled for AVX2 (see FAST_FNS), where the
 * 8- and 16-way searches below take a handful of vector instructions; the portable kernels stay scalar. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_AVX2_KERNELS 1
#define AVX2_TARGET __attribute__((target("avx2")))
#else
#define HAVE_AVX2_KERNELS 0
#define AVX2_TARGET
#endif
typedef int64_t v4i64 __attribute__((vector_size(32), aligned(8)));
typedef double v4f64 __attribute__((vector_size(32), aligned(8)));

/* find_way over A ways (a multiple of 4) with AVX2: compare four at a time, one bit per way, the lowest set bit.
 * (Not always_inline: the portable kernels must not inline it; the AVX2 ones do.) */
#if HAVE_AVX2_KERNELS
static inline AVX2_TARGET int64_t find_way_avx2(const int64_t *tags, int64_t blk, const int64_t A) {
    const v4i64 *t = (const v4i64 *)tags;
    int64_t m = 0;
    for (int64_t j = 0; j < A / 4; j++) m |= (int64_t)__builtin_ia32_movmskpd256((v4f64)(t[j] == blk)) << (4 * j);
    return m ? __builtin_ctzll((uint64_t)m) : -1;
}
#else
static inline int64_t find_way_avx2(const int64_t *tags, int64_t blk, const int64_t A) { /* never called */
    for (int64_t j = 0; j < A; j++)
        if (tags[j] == blk) return j;
    return -1;
}
#endif

/* The way of blk in the set at base, or -1. With a constant number of ways the search is branch-free (a block is in
 * at most one way), which a miss-heavy level prefers to an early exit that mispredicts. */
static inline __attribute__((always_inline)) int64_t find_way(const int64_t *tags, int64_t base, int64_t assoc,
                                                              int64_t blk, const int64_t A, const int V) {
    if (A && V) return find_way_avx2(tags + base, blk, A);
    if (A) {
        int64_t w = -1;
        for (int64_t j = A - 1; j >= 0; j--) w = tags[base + j] == blk ? j : w;
        return w;
    }
    for (int64_t j = 0; j < assoc; j++)
        if (tags[base + j] == blk) return j;
    return -1;
}

/* The way with the smallest stamp (least recently used, or oldest; invalid ways have stamp 0 and the lowest of them
 * wins), over A ways (a multiple of 4): keys stamp << 5 | way, minimum by a reduction tree (a short dependency
 * chain), over vectors of 4 when V. */
static inline __attribute__((always_inline)) int64_t oldest_way(const int64_t *stamp, int64_t base, const int64_t A,
                                                                const int V) {
    if (!V) {
        uint64_t key[32];
        for (int64_t j = 0; j < A; j++) key[j] = (uint64_t)stamp[base + j] << 5 | (uint64_t)j;
        for (int64_t width = A / 2; width >= 1; width /= 2)
            for (int64_t j = 0; j < width; j++) key[j] = key[j + width] < key[j] ? key[j + width] : key[j];
        return (int64_t)(key[0] & 31);
    }
    const v4i64 *s = (const v4i64 *)(stamp + base);
    v4i64 key[4];
    for (int64_t j = 0; j < A / 4; j++) key[j] = (s[j] << 5) | ((v4i64){0, 1, 2, 3} + 4 * j);
    for (int64_t width = A / 8; width >= 1; width /= 2)
        for (int64_t j = 0; j < width; j++) {
            v4i64 less = key[j + width] < key[j];
            key[j] = (key[j + width] & less) | (key[j] & ~less);
        }
    int64_t a = key[0][0] < key[0][1] ? key[0][0] : key[0][1], b = key[0][2] < key[0][3] ? key[0][2] : key[0][3];
    return (a < b ? a : b) & 31;
}

/* The common case, kept small so it stays fast: no 3C shadow, up to 32 ways, demand references. Same rules and
 * output as run_general; stops with SPECIAL at a copy-back or invalidate event, which the caller hands to the
 * general kernel. Shares the state arrays with it. */
static inline __attribute__((always_inline)) int run_fast(Kern *K, Py_ssize_t start, Py_ssize_t k0,
                                                          Py_ssize_t *next, Py_ssize_t *kout, const int pow2,
                                                          const int64_t repl, const int emit, const int64_t A,
                                                          const int plain, const int V, const int D) {
    const int64_t *prm = K->prm;
    /* restrict: the arrays never overlap, and the byte arrays (dirty, output types) would otherwise oblige the
     * compiler to reload everything after each store through them */
    int64_t *restrict st = K->st, *restrict tags = K->tags, *restrict stamp = K->stamp, *restrict cnt = K->cnt;
    uint8_t *restrict dirty = K->dirty, *restrict plru = K->plru;
    int8_t *restrict otypes = K->otypes;
    uint64_t *restrict oaddrs = K->oaddrs;
    uint32_t *restrict osizes = K->osizes;
    int64_t *restrict oorig = K->oorig;
    const int64_t *restrict origin = K->origin;
    const uint16_t *restrict sz16 = K->sz16;
    const uint32_t *restrict sz32 = K->sz32;
    const int64_t lgb = prm[P_LGB], nsets = prm[P_NSETS], assoc = A ? A : prm[P_ASSOC];
    /* D: Dinero's default policies (write-allocate, write-back, and read-allocate), as constants */
    const int64_t walloc = D ? 0 : prm[P_WALLOC], wback = D ? 0 : prm[P_WBACK], ralloc = D ? 1 : prm[P_RALLOC];
    const Py_ssize_t n = K->n, cap = K->cap;
    const int64_t bsize = (int64_t)1 << lgb;
    const uint64_t boff = (uint64_t)(bsize - 1);
    /* plain: every event is this cache's (no side of a split level to pick, no partition of the sets) */
    const uint64_t upshift = plain ? 0 : (uint64_t)prm[P_PSHIFT], upmask = plain ? 0 : (uint64_t)prm[P_PMASK];
    const uint64_t upid = plain ? 0 : (uint64_t)prm[P_PID];
    const int64_t smask = nsets - 1;
    const int lru = repl == 0, stamped = repl != 1, tree = repl == 3, wt = wback == 1;
    uint64_t rng = (uint64_t)st[ST_RNG];
    int64_t nfills = 0, nwbacks = 0, clk = st[ST_CLK];
    int64_t lastblk = -1, lastslot = 0; /* the block of the previous access and its slot */
    Py_ssize_t k = k0, e = start;
    int reason = DONE;
    const int8_t *restrict types = K->types;
    const uint64_t *restrict addrs = K->addrs;
#define PUT(t_, a_, s_, o_)            \
    do {                               \
        otypes[k] = (int8_t)(t_);      \
        oaddrs[k] = (a_);              \
        osizes[k] = (uint32_t)(s_);    \
        oorig[k] = (o_);               \
        k++;                           \
    } while (0)

    const int64_t side = plain ? 0 : prm[P_SIDE], org0 = prm[P_ORG0];
    for (; e < n; e++) {
        const int t = types[e];
        if (OTHER_SIDE(side, t)) continue;
        if (t >= 4) {
            reason = SPECIAL;
            break;
        }
        const uint64_t a = addrs[e];
        const int64_t sz = sz16 ? sz16[e] : (int64_t)sz32[e];
        int single = (int64_t)(a & boff) + sz <= bsize;
        const int is_write = t == 1;
        if (single && ((a >> upshift) & upmask) != upid) continue; /* another partition's block */
        int known_miss = 0;
        if (single && !(wt && is_write)) { /* hot path: a hit needs no downstream traffic */
            int64_t blk = (int64_t)(a >> lgb), slot = -1, base = 0;
            if (blk == lastblk)
                slot = lastslot;
            else {
                base = SET_OF(blk) * assoc;
                int64_t w = find_way(tags, base, assoc, blk, A, V);
                slot = w < 0 ? -1 : base + w;
            }
            if (slot >= 0) {
                cnt[FETCH + t]++;
                clk++;
                if (stamped) stamp[slot] = clk;
                if (tree) {
                    int64_t s_ = SET_OF(blk);
                    plru_touch(plru, s_ * (assoc - 1), assoc, slot - s_ * assoc);
                }
                dirty[slot] |= (uint8_t)is_write;
                lastblk = blk;
                lastslot = slot;
                continue;
            }
            if (emit && k + 3 > cap) { /* (a hit writes nothing downstream: only a miss needs the room) */
                reason = OUT_FULL;
                break;
            }
            if (A && (is_write ? walloc == 0 : ralloc != 0)) { /* the common miss: allocate over the oldest way */
                const int64_t v = base + oldest_way(stamp, base, A, V), old = tags[v];
                const int was_dirty = dirty[v]; /* (invalid ways are never dirty) */
                cnt[FETCH + t]++;
                cnt[MISS + t]++;
                tags[v] = blk;
                stamp[v] = ++clk;
                dirty[v] = (uint8_t)is_write; /* held dirty: write-through writes never come here */
                lastblk = blk;
                lastslot = v;
                const int64_t org = origin ? origin[e] : org0 + e;
                if (!is_write || sz != bsize) { /* downstream: the fill, then the victim's write-back */
                    nfills++;
                    if (emit) PUT(is_write ? 0 : t, (uint64_t)blk << lgb, bsize, org);
                }
                if (was_dirty) {
                    nwbacks++;
                    if (emit) PUT(1, (uint64_t)old << lgb, bsize, org);
                }
                continue;
            }
            known_miss = 1; /* searched just now: the piece loop need not search again */
        }
        if (emit) { /* at most a fill, a write-through and a write-back per piece */
            int64_t need = single ? 3 : 3 * ((int64_t)((a + (uint64_t)(sz - 1)) >> lgb) - (int64_t)(a >> lgb) + 1);
            if (k + need > cap) {
                reason = OUT_FULL;
                break;
            }
        }
        const int64_t org = origin ? origin[e] : org0 + e;
        uint64_t pa = a;
        int64_t remaining = sz;
        for (;;) {
            int64_t blk = (int64_t)(pa >> lgb), psz;
            int mine = ((pa >> upshift) & upmask) == upid;
            if (single)
                psz = remaining;
            else {
                int64_t last = (int64_t)((pa + (uint64_t)(remaining - 1)) >> lgb);
                if (last != blk) {
                    psz = bsize - (int64_t)(pa & boff);
                    if (mine) cnt[MULTIBLOCK]++;
                } else {
                    psz = remaining;
                    single = 1;
                }
            }
            if (mine) {
                int64_t set = SET_OF(blk), base = set * assoc, w = -1;
                if (blk == lastblk) /* same block as the previous access: it is still where we left it */
                    w = lastslot - base;
                else if (!known_miss)
                    w = find_way(tags, base, assoc, blk, A, V);
                cnt[FETCH + t]++;
                int64_t vic = -1;
                int wb = 0, walloc_ok = 0;
                if (w >= 0) {
                    clk++;
                    if (stamped) stamp[base + w] = clk;
                    if (tree) plru_touch(plru, set * (assoc - 1), assoc, w);
                    if (is_write) {
                        wb = wback != 1;
                        if (wb) dirty[base + w] = 1;
                    }
                    lastblk = blk;
                    lastslot = base + w;
                } else {
                    cnt[MISS + t]++;
                    lastblk = -1;
                    walloc_ok = is_write && (walloc == 0 || (walloc == 2 && psz == bsize));
                    if (is_write ? walloc_ok : ralloc != 0) {
                        clk++;
                        /* least recent (LRU) or oldest (FIFO); invalid ways have stamp 0, so they go first */
                        int64_t v = 0, bs = stamp[base];
                        if (A) {
                            v = oldest_way(stamp, base, A, V);
                            bs = stamp[base + v];
                        } else
                            for (int64_t j = 1; j < assoc; j++) { /* branch-free minimum */
                                int64_t sj = stamp[base + j];
                                int less = sj < bs;
                                bs = less ? sj : bs;
                                v = less ? j : v;
                            }
                        if (bs != 0 && !lru && stamped) { /* set full: random or tree pseudo-LRU */
                            if (tree) {
                                int64_t pb = set * (assoc - 1), node = 0;
                                while (node < assoc - 1) node = 2 * node + 1 + plru[pb + node];
                                v = node - (assoc - 1);
                            } else {
                                rng = xorshift(rng);
                                v = (int64_t)(rng % (uint64_t)assoc);
                            }
                        }
                        if (dirty[base + v]) vic = tags[base + v]; /* (invalid ways are never dirty) */
                        tags[base + v] = blk;
                        stamp[base + v] = clk;
                        if (tree) plru_touch(plru, set * (assoc - 1), assoc, v);
                        lastblk = blk;
                        lastslot = base + v;
                        wb = is_write && !wt;
                        dirty[base + v] = (uint8_t)wb;
                    }
                    if (!is_write || (walloc_ok && psz != bsize)) {
                        nfills++;
                        if (emit) PUT(is_write ? 0 : t, (uint64_t)blk << lgb, bsize, org);
                    }
                }
                if (is_write && !wb) {
                    cnt[WRITETHROUGHS]++;
                    cnt[BYTES_WRITTEN] += psz;
                    if (emit) PUT(1, pa, psz, org);
                }
                if (vic >= 0) {
                    nwbacks++;
                    if (emit) PUT(1, (uint64_t)vic << lgb, bsize, org);
                }
            }
            if (single) break;
            pa = (uint64_t)(blk + 1) << lgb;
            remaining -= psz;
        }
    }
    st[ST_CLK] = clk;
    st[ST_RNG] = (int64_t)rng;
    cnt[FILLS] += nfills;
    cnt[BYTES_READ] += nfills * bsize;
    cnt[WRITEBACKS] += nwbacks;
    cnt[BYTES_WRITTEN] += nwbacks * bsize;
    *next = e;
    *kout = k;
    return reason;
#undef PUT
}

static int run_general_pow2(Kern *K, Py_ssize_t s, Py_ssize_t stop, Py_ssize_t k0, Py_ssize_t *nx, Py_ssize_t *ko) {
    return run_general(K, s, stop, k0, nx, ko, 1);
}
static int run_general_any(Kern *K, Py_ssize_t s, Py_ssize_t stop, Py_ssize_t k0, Py_ssize_t *nx, Py_ssize_t *ko) {
    return run_general(K, s, stop, k0, nx, ko, 0);
}
/* the fast kernel, compiled once per (sets a power of 2 or not, output or not, replacement policy, and for LRU
 * and FIFO 8 or 16 ways), in two forms: plain (every event is this cache's) or picking its side of a split level
 * or its partition of the sets. The policy tests in the loop become constants. The 8- and 16-way forms are compiled
 * twice more for AVX2 (vector way search and victim choice), used when the processor has it (x86-64 only): for
 * any write/read policies and with Dinero's defaults (write-allocate, write-back, read-allocate) as constants,
 * which frees the registers those tests held. */
#define FAST(P, E, R, A, L)                                                                                     \
    static int run_fast_##P##_##E##_##R##_##A##_##L(Kern *K, Py_ssize_t s, Py_ssize_t k0, Py_ssize_t *nx,     \
                                                    Py_ssize_t *ko) {                                          \
        return run_fast(K, s, k0, nx, ko, P, R, E, A, L, 0, 0);                                                \
    }
#define FASTV(P, E, R, A, L, D)                                                                                 \
    static AVX2_TARGET int run_fastv##D##_##P##_##E##_##R##_##A##_##L(Kern *K, Py_ssize_t s, Py_ssize_t k0,    \
                                                                      Py_ssize_t *nx, Py_ssize_t *ko) {        \
        return run_fast(K, s, k0, nx, ko, P, R, E, A, L, HAVE_AVX2_KERNELS, D);                                \
    }
#define FAST_A(P, E, L) FAST(P, E, 0, 0, L) FAST(P, E, 1, 0, L) FAST(P, E, 2, 0, L) FAST(P, E, 3, 0, L) \
    FAST(P, E, 0, 8, L) FAST(P, E, 1, 8, L) FAST(P, E, 0, 16, L) FAST(P, E, 1, 16, L)                    \
    FASTV(P, E, 0, 8, L, 0) FASTV(P, E, 1, 8, L, 0) FASTV(P, E, 0, 16, L, 0) FASTV(P, E, 1, 16, L, 0)    \
    FASTV(P, E, 0, 8, L, 1) FASTV(P, E, 1, 8, L, 1) FASTV(P, E, 0, 16, L, 1) FASTV(P, E, 1, 16, L, 1)
#define FAST_L(P, E) FAST_A(P, E, 0) FAST_A(P, E, 1)
FAST_L(0, 0)
FAST_L(0, 1)
FAST_L(1, 0)
FAST_L(1, 1)
typedef int (*FastFn)(Kern *, Py_ssize_t, Py_ssize_t, Py_ssize_t *, Py_ssize_t *);
#define FAST_ROW(P, E, L)                                                                                      \
    {{run_fast_##P##_##E##_0_0_##L, run_fast_##P##_##E##_1_0_##L, run_fast_##P##_##E##_2_0_##L,                 \
      run_fast_##P##_##E##_3_0_##L},                                                                           \
     {run_fast_##P##_##E##_0_8_##L, run_fast_##P##_##E##_1_8_##L, NULL, NULL},                                  \
     {run_fast_##P##_##E##_0_16_##L, run_fast_##P##_##E##_1_16_##L, NULL, NULL},                                \
     {run_fastv0_##P##_##E##_0_8_##L, run_fastv0_##P##_##E##_1_8_##L, NULL, NULL},                              \
     {run_fastv0_##P##_##E##_0_16_##L, run_fastv0_##P##_##E##_1_16_##L, NULL, NULL},                            \
     {run_fastv1_##P##_##E##_0_8_##L, run_fastv1_##P##_##E##_1_8_##L, NULL, NULL},                              \
     {run_fastv1_##P##_##E##_0_16_##L, run_fastv1_##P##_##E##_1_16_##L, NULL, NULL}}
#define FAST_PE(P, E) {FAST_ROW(P, E, 0), FAST_ROW(P, E, 1)}
static const FastFn FAST_FNS[2][2][2][7][4] = {{FAST_PE(0, 0), FAST_PE(0, 1)}, {FAST_PE(1, 0), FAST_PE(1, 1)}};
static int use_avx2; /* set at import: the processor has AVX2 and CACHEMODE_PORTABLE is not set */

static FastFn fast_fn(const int64_t *prm, int pow2) {
    int64_t repl = prm[P_REPL] & 3, assoc = prm[P_ASSOC];
    int a = repl < 2 ? (assoc == 8 ? 1 : assoc == 16 ? 2 : 0) : 0;
    if (a && use_avx2) /* the AVX2 forms, with Dinero's default policies as constants where they apply */
        a += prm[P_WALLOC] == 0 && prm[P_WBACK] == 0 && prm[P_RALLOC] == 1 ? 4 : 2;
    int plain = prm[P_SIDE] == 0 && prm[P_PMASK] == 0;
    return FAST_FNS[pow2][prm[P_EMIT] != 0][plain][a][repl];
}

/* ---- buffers ---- */
#define MAXBUF 32
typedef struct {
    Py_buffer v[MAXBUF];
    int n;
} Bufs;

static void release(Bufs *b) {
    for (int i = 0; i < b->n; i++) PyBuffer_Release(&b->v[i]);
    b->n = 0;
}

/* Acquire a C-contiguous buffer of items of `itemsize` bytes (0: 2 or 4); returns its base or NULL. */
static void *acquire(Bufs *b, PyObject *obj, int writable, Py_ssize_t itemsize, Py_ssize_t *len, const char *what) {
    Py_buffer *v = &b->v[b->n];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, v, flags) < 0) return NULL;
    b->n++;
    if (itemsize ? v->itemsize != itemsize : (v->itemsize != 2 && v->itemsize != 4)) {
        PyErr_Format(PyExc_TypeError, "%s: items of %zd bytes, expected %zd", what, v->itemsize, itemsize);
        return NULL;
    }
    *len = v->len / v->itemsize;
    return v->buf;
}

#define GET(dst, obj, wr, isz, lenp, what)                                \
    do {                                                                  \
        dst = acquire(&b, obj, wr, isz, lenp, what);                      \
        if (dst == NULL && PyErr_Occurred()) goto fail;                   \
    } while (0)

static PyObject *py_run(PyObject *self, PyObject *args) {
    int general;
    PyObject *stream, *state, *out;
    Py_ssize_t start, stop, k0, len = 0;
    if (!PyArg_ParseTuple(args, "pO!nnnO!O!", &general, &PyTuple_Type, &stream, &start, &stop, &k0, &PyTuple_Type,
                          &state, &PyTuple_Type, &out))
        return NULL;
    if (PyTuple_GET_SIZE(stream) != 4 || PyTuple_GET_SIZE(state) != 17 || PyTuple_GET_SIZE(out) != 4) {
        PyErr_SetString(PyExc_ValueError, "run: stream takes 4 arrays, state 17, out 4");
        return NULL;
    }
    Bufs b = {.n = 0};
    Kern K;
    memset(&K, 0, sizeof K);
    Py_ssize_t n = 0, nsz = 0, norg = 0, x = 0;
    void *sizes;
    GET(K.types, PyTuple_GET_ITEM(stream, 0), 0, 1, &n, "types");
    GET(K.addrs, PyTuple_GET_ITEM(stream, 1), 0, 8, &x, "addrs");
    if (x != n) goto short_arrays;
    GET(sizes, PyTuple_GET_ITEM(stream, 2), 0, 0, &nsz, "sizes");
    if (nsz != n) goto short_arrays;
    if (b.v[2].itemsize == 2) K.sz16 = sizes; else K.sz32 = sizes;
    GET(K.origin, PyTuple_GET_ITEM(stream, 3), 0, 8, &norg, "origin");
    if (norg == 0) K.origin = NULL; else if (norg != n) goto short_arrays;
    K.n = n;
    PyObject *const *s = &PyTuple_GET_ITEM(state, 0);
    GET(K.prm, s[0], 1, 8, &len, "prm");
    if (len < NPRM) goto short_arrays;
    GET(K.st, s[1], 1, 8, &len, "st");
    if (len < NST) goto short_arrays;
    Py_ssize_t nb = 0, ntags = 0;
    GET(K.tags, s[2], 1, 8, &ntags, "tags");
    GET(K.stamp, s[3], 1, 8, &nb, "stamp");
    if (nb != ntags) goto short_arrays;
    GET(K.dirty, s[4], 1, 1, &nb, "dirty");
    if (nb != ntags) goto short_arrays;
    GET(K.plru, s[5], 1, 1, &len, "plru");
    GET(K.hkeys, s[6], 1, 8, &K.nh, "hkeys");
    GET(K.hvals, s[7], 1, 8, &len, "hvals");
    if (len != K.nh) goto short_arrays;
    GET(K.flink, s[8], 1, 8, &len, "flink");
    GET(K.ffree, s[9], 1, 8, &len, "ffree");
    GET(K.ftags, s[10], 1, 8, &K.nf, "ftags");
    GET(K.fstamp, s[11], 1, 8, &len, "fstamp");
    GET(K.fplru, s[12], 1, 1, &len, "fplru");
    GET(K.fhkeys, s[13], 1, 8, &K.nfh, "fhkeys");
    GET(K.fhvals, s[14], 1, 8, &len, "fhvals");
    GET(K.seen, s[15], 1, 8, &K.nseen, "seen");
    GET(K.cnt, s[16], 1, 8, &len, "cnt");
    if (len < NCOUNTERS) goto short_arrays;
    if (K.prm[P_NSETS] * K.prm[P_ASSOC] > ntags || K.prm[P_LGB] < 0 || K.prm[P_LGB] > 40) goto short_arrays;
    GET(K.otypes, PyTuple_GET_ITEM(out, 0), 1, 1, &K.cap, "otypes");
    GET(K.oaddrs, PyTuple_GET_ITEM(out, 1), 1, 8, &len, "oaddrs");
    if (len < K.cap) goto short_arrays;
    GET(K.osizes, PyTuple_GET_ITEM(out, 2), 1, 4, &len, "osizes");
    if (len < K.cap) goto short_arrays;
    GET(K.oorig, PyTuple_GET_ITEM(out, 3), 1, 8, &len, "oorig");
    if (len < K.cap) goto short_arrays;
    if (start < 0 || stop > n || k0 < 0 || k0 > K.cap) goto short_arrays;

    Py_ssize_t next = start, kout = k0;
    int reason;
    int pow2 = (K.prm[P_NSETS] & (K.prm[P_NSETS] - 1)) == 0;
    Py_BEGIN_ALLOW_THREADS
    if (general)
        reason = pow2 ? run_general_pow2(&K, start, stop, k0, &next, &kout)
                      : run_general_any(&K, start, stop, k0, &next, &kout);
    else
        reason = fast_fn(K.prm, pow2)(&K, start, k0, &next, &kout);
    Py_END_ALLOW_THREADS
    release(&b);
    if (reason < 0) return PyErr_NoMemory();
    return Py_BuildValue("nni", next, kout, reason);

short_arrays:
    PyErr_SetString(PyExc_ValueError, "run: arrays too short or inconsistent with the parameters");
fail:
    release(&b);
    return NULL;
}

static PyObject *py_vector_kernels(PyObject *self, PyObject *args) {
    int enable = -1, was = use_avx2;
    if (!PyArg_ParseTuple(args, "|i", &enable)) return NULL;
#if HAVE_AVX2_KERNELS
    if (enable >= 0) use_avx2 = enable && __builtin_cpu_supports("avx2");
#endif
    return PyBool_FromLong(was);
}

static PyObject *py_rehash(PyObject *self, PyObject *args) {
    PyObject *old_obj, *new_obj;
    if (!PyArg_ParseTuple(args, "OO", &old_obj, &new_obj)) return NULL;
    Bufs b = {.n = 0};
    int64_t *old, *nw;
    Py_ssize_t nold = 0, nnew = 0;
    GET(old, old_obj, 0, 8, &nold, "old");
    GET(nw, new_obj, 1, 8, &nnew, "new");
    if (nnew & (nnew - 1)) {
        PyErr_SetString(PyExc_ValueError, "rehash: the new table's size must be a power of 2");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nold; i++)
        if (old[i] != -1) hput(nw, nw, nnew - 1, old[i], old[i]);
    release(&b);
    Py_RETURN_NONE;
fail:
    release(&b);
    return NULL;
}

/* ---- text trace parser ---- */
static int8_t HEX[256];

enum {
    E_LABEL = 1, E_ADDR = 2, E_SHORT = 3, E_SIZE = 4, E_NOSIZE = 5, E_LABELVAL = 6, E_TYPE = 7, E_LONGADDR = 8,
    E_SIZERANGE = 9, E_LACKEY = 10, E_COMMA = 11, E_DECSIZE = 12, E_EMPTY = 13
};

static inline int blank(uint8_t c) { return c == 32 || c == 9 || c == 13; }

/* Parse whole lines of buf (fmt 0 din, 1 xdin, 2 lackey) into the record arrays, stopping early when fewer than
 * two record slots are left. Returns 0 or an error code, with the position to resume from in *consumed. */
static int parse(const uint8_t *buf, Py_ssize_t n, int fmt, int8_t *types, uint64_t *addrs, uint16_t *sizes,
                 Py_ssize_t cap, Py_ssize_t *nrec, Py_ssize_t *consumed, int64_t *line, int64_t *ech, int64_t *eval) {
    Py_ssize_t k = 0, i = 0;
    int64_t ln = *line;
#define FAIL(code, ch, val) do { *ech = (ch); *eval = (val); err = (code); goto out; } while (0)
    int err = 0;
    /* the fast paths read up to a line end without bounds checks: only when the data ends with one */
    const int sentinel = n > 0 && buf[n - 1] == '\n';
    while (i < n) {
        if (k + 2 > cap) break;
        if (sentinel && fmt != 2) { /* the common shapes: "L ADDR" (din) and "t ADDR SIZE" (xdin) */
            const uint8_t *p = buf + i;
            int t = -1;
            if (fmt == 0) {
                int v = HEX[p[0]];
                if (v >= 0 && v <= 5) t = v;
            } else {
                switch (p[0] | 0x20) {
                case 'r': t = 0; break;
                case 'w': t = 1; break;
                case 'i': t = 2; break;
                case 'm': t = 3; break;
                }
            }
            if (t >= 0 && p[1] == ' ' && HEX[p[2]] >= 0 && p[2] != '0') {
                const uint8_t *q = p + 2;
                uint64_t addr = 0;
                int d;
                while ((d = HEX[*q]) >= 0) {
                    addr = addr * 16 + (uint64_t)d;
                    q++;
                }
                if (q - (p + 2) <= 16) {
                    if (fmt == 0 && (*q == '\n' || *q == ' ' || *q == '\t' || *q == '\r')) {
                        q = *q == '\n' ? q : memchr(q, '\n', (size_t)(buf + n - q));
                        types[k] = (int8_t)t;
                        addrs[k] = addr & ~(uint64_t)3;
                        sizes[k] = 4;
                        k++;
                        ln++;
                        i = (q - buf) + 1;
                        continue;
                    }
                    if (fmt == 1 && *q == ' ' && HEX[q[1]] >= 0 && q[1] != '0') {
                        int64_t size = 0;
                        q++;
                        while ((d = HEX[*q]) >= 0 && size <= 65535) {
                            size = size * 16 + d;
                            q++;
                        }
                        if (*q == '\n' && size <= 65535) {
                            types[k] = (int8_t)t;
                            addrs[k] = addr;
                            sizes[k] = (uint16_t)size;
                            k++;
                            ln++;
                            i = (q - buf) + 1;
                            continue;
                        }
                    }
                }
            }
        } /* anything else: the general parser below, which also names what is wrong */
        ln++;
        while (i < n && blank(buf[i])) i++;
        if (i >= n) { /* trailing blanks: not a line */
            ln--;
            break;
        }
        uint8_t c = buf[i];
        if (c == 10) {
            if (fmt == 2) {
                i++;
                continue;
            }
            FAIL(E_EMPTY, 0, 0);
        }
        int atype = 0;
        if (fmt == 0) {
            int v = HEX[c];
            if (v < 0) FAIL(E_LABEL, c, 0);
            atype = v;
            i++;
            if (i < n && (buf[i] == 'x' || buf[i] == 'X') && atype == 0) i++;
            while (i < n && HEX[buf[i]] >= 0) {
                atype = atype * 16 + HEX[buf[i]];
                if (atype > 255) atype = 255;
                i++;
            }
            if (i >= n || buf[i] == 10) FAIL(E_SHORT, 0, 0);
            if (!blank(buf[i])) FAIL(E_LABEL, buf[i], 0);
            if (atype > 5) FAIL(E_LABELVAL, 0, atype);
        } else if (fmt == 1) {
            switch (c | 0x20) {
            case 'r': atype = 0; break;
            case 'w': atype = 1; break;
            case 'i': atype = 2; break;
            case 'm': atype = 3; break;
            case 'c': atype = 4; break;
            case 'v': atype = 5; break;
            default: FAIL(E_TYPE, c, 0);
            }
            i++;
            if (i >= n || buf[i] == 10) FAIL(E_SHORT, 0, 0);
            if (!blank(buf[i])) FAIL(E_TYPE, c, 0);
        } else {
            if (c == '=') { /* valgrind's own ==pid== lines */
                while (i < n && buf[i] != 10) i++;
                i++;
                continue;
            }
            if (c == 'I') atype = 2;
            else if (c == 'L') atype = 0;
            else if (c == 'S') atype = 1;
            else if (c == 'M') atype = 6; /* modify: read then write */
            else FAIL(E_LACKEY, c, 0);
            i++;
            if (i >= n || buf[i] == 10) FAIL(E_SHORT, 0, 0);
            if (!blank(buf[i])) FAIL(E_LACKEY, c, 0);
        }
        while (i < n && blank(buf[i])) i++;
        if (i >= n || buf[i] == 10) FAIL(E_SHORT, 0, 0);
        if (HEX[buf[i]] < 0) FAIL(E_ADDR, buf[i], 0);
        uint64_t addr = 0;
        int ndig = 0;
        int first = HEX[buf[i]];
        i++;
        if (i < n && (buf[i] == 'x' || buf[i] == 'X') && first == 0)
            i++;
        else {
            addr = (uint64_t)first;
            if (first) ndig = 1;
        }
        while (i < n && HEX[buf[i]] >= 0) {
            int d = HEX[buf[i]];
            if (ndig > 0 || d != 0) ndig++;
            addr = addr * 16 + (uint64_t)d;
            i++;
        }
        if (ndig > 16) FAIL(E_LONGADDR, 0, 0);
        int64_t size = 4;
        if (fmt == 0) {
            if (i < n && !(blank(buf[i]) || buf[i] == 10)) FAIL(E_ADDR, buf[i], 0);
            addr &= ~(uint64_t)3;
        } else if (fmt == 1) {
            if (i < n && !(blank(buf[i]) || buf[i] == 10)) FAIL(E_ADDR, buf[i], 0);
            while (i < n && blank(buf[i])) i++;
            if (i >= n || buf[i] == 10) FAIL(E_NOSIZE, 0, 0);
            if (HEX[buf[i]] < 0) FAIL(E_SIZE, buf[i], 0);
            size = HEX[buf[i]];
            i++;
            if (i < n && (buf[i] == 'x' || buf[i] == 'X') && size == 0) i++;
            while (i < n && HEX[buf[i]] >= 0) {
                size = size * 16 + HEX[buf[i]];
                if (size > 1 << 20) size = 1 << 20;
                i++;
            }
            if (i < n && !(blank(buf[i]) || buf[i] == 10)) FAIL(E_SIZE, buf[i], 0);
            if (size > 65535 || (size == 0 && atype < 4)) FAIL(E_SIZERANGE, 0, size);
        } else {
            if (i >= n || buf[i] != ',') FAIL(E_COMMA, 0, 0);
            i++;
            if (i >= n || !(buf[i] >= '0' && buf[i] <= '9')) {
                if (i >= n || buf[i] == 10) FAIL(E_NOSIZE, 0, 0);
                FAIL(E_DECSIZE, buf[i], 0);
            }
            size = 0;
            while (i < n && buf[i] >= '0' && buf[i] <= '9') {
                size = size * 10 + (buf[i] - '0');
                if (size > 1 << 20) size = 1 << 20;
                i++;
            }
            if (i < n && !(blank(buf[i]) || buf[i] == 10)) FAIL(E_DECSIZE, buf[i], 0);
            if (size > 65535 || size == 0) FAIL(E_SIZERANGE, 0, size);
        }
        /* the rest of the line is ignored */
        const uint8_t *nl = memchr(buf + i, '\n', (size_t)(n - i));
        i = nl ? (nl - buf) + 1 : n;
        if (atype == 6) {
            types[k] = 0;
            addrs[k] = addr;
            sizes[k] = (uint16_t)size;
            k++;
            atype = 1;
        }
        types[k] = (int8_t)atype;
        addrs[k] = addr;
        sizes[k] = (uint16_t)size;
        k++;
    }
out:
#undef FAIL
    if (i > n) i = n;
    *nrec = k;
    *consumed = i;
    *line = ln;
    return err;
}

static PyObject *py_parse_text(PyObject *self, PyObject *args) {
    PyObject *data_obj, *t_obj, *a_obj, *s_obj;
    int fmt;
    long long line0;
    if (!PyArg_ParseTuple(args, "OiOOOL", &data_obj, &fmt, &t_obj, &a_obj, &s_obj, &line0)) return NULL;
    if (fmt < 0 || fmt > 2) {
        PyErr_SetString(PyExc_ValueError, "parse_text: fmt is 0 (din), 1 (xdin) or 2 (lackey)");
        return NULL;
    }
    Bufs b = {.n = 0};
    const uint8_t *data;
    int8_t *types;
    uint64_t *addrs;
    uint16_t *sizes;
    Py_ssize_t n = 0, cap = 0, len = 0;
    GET(data, data_obj, 0, 1, &n, "data");
    GET(types, t_obj, 1, 1, &cap, "types");
    GET(addrs, a_obj, 1, 8, &len, "addrs");
    if (len < cap) goto short_arrays;
    GET(sizes, s_obj, 1, 2, &len, "sizes");
    if (len < cap) goto short_arrays;
    Py_ssize_t nrec = 0, consumed = 0;
    int64_t line = line0, ech = 0, eval = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = parse(data, n, fmt, types, addrs, sizes, cap, &nrec, &consumed, &line, &ech, &eval);
    Py_END_ALLOW_THREADS
    release(&b);
    return Py_BuildValue("nnLiLL", nrec, consumed, (long long)line, err, (long long)ech, (long long)eval);
short_arrays:
    PyErr_SetString(PyExc_ValueError, "parse_text: output arrays differ in length");
fail:
    release(&b);
    return NULL;
}

/* ---- text trace writer ---- */
static char *put_hex(char *o, uint64_t v) {
    char tmp[16];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    while (n) *o++ = tmp[--n];
    return o;
}

static PyObject *py_format_text(PyObject *self, PyObject *args) {
    PyObject *t_obj, *a_obj, *s_obj;
    int din;
    if (!PyArg_ParseTuple(args, "OOOp", &t_obj, &a_obj, &s_obj, &din)) return NULL;
    Bufs b = {.n = 0};
    const int8_t *types;
    const uint64_t *addrs;
    const uint16_t *sizes;
    Py_ssize_t n = 0, len = 0;
    GET(types, t_obj, 0, 1, &n, "types");
    GET(addrs, a_obj, 0, 8, &len, "addrs");
    if (len != n) goto short_arrays;
    GET(sizes, s_obj, 0, 2, &len, "sizes");
    if (len != n) goto short_arrays;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 24 + 1); /* "t " + 16 digits + " " + 4 digits + "\n" */
    if (out == NULL) goto fail;
    char *o = PyBytes_AS_STRING(out), *start = o;
    for (Py_ssize_t i = 0; i < n; i++) {
        int t = types[i] < 0 || types[i] > 5 ? 0 : types[i];
        *o++ = din ? (char)('0' + t) : "rwimcv"[t];
        *o++ = ' ';
        o = put_hex(o, addrs[i]);
        if (!din) {
            *o++ = ' ';
            o = put_hex(o, sizes[i]);
        }
        *o++ = '\n';
    }
    release(&b);
    if (_PyBytes_Resize(&out, o - start) < 0) return NULL;
    return out;
short_arrays:
    PyErr_SetString(PyExc_ValueError, "format_text: arrays differ in length");
fail:
    release(&b);
    return NULL;
}

static PyMethodDef methods[] = {
    {"format_text", py_format_text, METH_VARARGS,
     "format_text(types, addrs, sizes, din) -> bytes: one din (label addr) or extended din (t addr size) line each"},
    {"run", py_run, METH_VARARGS,
     "run(general, (types, addrs, sizes, origin), start, stop, k0, state, (otypes, oaddrs, osizes, oorig))"
     " -> (next event, events written, reason)"},
    {"vector_kernels", py_vector_kernels, METH_VARARGS,
     "vector_kernels([enable]) -> bool: whether the AVX2 kernels run (before this call); enable 0 picks the portable"
     " ones, 1 the AVX2 ones where the processor has AVX2 (CACHEMODE_PORTABLE=1 starts with the portable ones)"},
    {"rehash", py_rehash, METH_VARARGS, "rehash(old, new): insert every key of old into the empty table new"},
    {"parse_text", py_parse_text, METH_VARARGS,
     "parse_text(data, fmt, types, addrs, sizes, line0) -> (records, bytes consumed, last line, error, char, value)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_core", "The compiled core of cachemode's CPU cache simulator.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__core(void) {
    memset(HEX, -1, sizeof HEX);
#if HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    const char *portable = getenv("CACHEMODE_PORTABLE");
    use_avx2 = __builtin_cpu_supports("avx2") && !(portable && *portable && strcmp(portable, "0") != 0);
#endif
    for (int i = 0; i < 10; i++) HEX['0' + i] = (int8_t)i;
    for (int i = 0; i < 6; i++) HEX['a' + i] = HEX['A' + i] = (int8_t)(10 + i);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    struct {
        const char *name;
        long value;
    } consts[] = {
        {"FETCH", FETCH}, {"MISS", MISS}, {"COMP", COMP}, {"CAP", CAP}, {"CONF", CONF}, {"MULTIBLOCK", MULTIBLOCK},
        {"BYTES_READ", BYTES_READ}, {"BYTES_WRITTEN", BYTES_WRITTEN}, {"WRITEBACKS", WRITEBACKS},
        {"COPYBACK_BLOCKS", COPYBACK_BLOCKS}, {"COPYBACK_BYTES", COPYBACK_BYTES}, {"WRITETHROUGHS", WRITETHROUGHS},
        {"FILLS", FILLS}, {"INVALIDATED_DIRTY", INVALIDATED_DIRTY}, {"NCOUNTERS", NCOUNTERS},
        {"HASH_MIN_ASSOC", HASH_MIN_ASSOC}, {"NPRM", NPRM}, {"NST", NST}, {"DONE", DONE}, {"OUT_FULL", OUT_FULL},
        {"SEEN_FULL", SEEN_FULL}, {"SPECIAL", SPECIAL},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    return m;
}
