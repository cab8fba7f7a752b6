/* The NBD server's hot loop for runs of small READs and WRITEs, in C: on a 2-core machine the interpreter's
 * work per 4 KiB page-cache READ (parse, admit, read, reply header) cost more than the read itself.
 *
 * Pairs of functions, one per side of the sans-IO line:
 *
 *   scan_reads(src, pos, size, max_block, unaligned, max_length) -> (entries, pos)
 *       for the protocol core (cachemode.nbd.requests): from ``pos``, the run of complete request headers that
 *       are plain READs (no flags) the core's own fast path would accept -- good magic, 0 < length <=
 *       max_block, length < max_length, offset + length <= size, offset and length multiples of the minimum
 *       block -- packed as native uint64 triples (cookie, offset, length), and where the run stopped. It
 *       decides nothing else: the first header it does not take is parsed by the core in Python.
 *
 *   read_batch(fd, entries, index, stop, arena, at, structured, room, small_reply[, known])
 *       -> (index, at, charged, misses)
 *       for the transport (cachemode.nbd.connection): from entry ``index`` to ``stop`` at most,
 *       preadv2(RWF_NOWAIT) each READ's data into ``arena`` behind the room for its reply header, and write that header (a simple reply, or
 *       one structured OFFSET_DATA chunk with DONE: the layouts of cachemode.nbd.replies.read_header, checked
 *       byte for byte by the tests). Stops before an entry whose charge (length + small_reply) would take
 *       ``charged`` past ``room`` (the memory budget left) or whose reply does not fit in the arena. Entries
 *       the page cache could not serve at once are listed in ``misses`` (charged, nothing written for them:
 *       the caller reads them asynchronously). The first ``known`` entries from ``index`` (default 0) are
 *       such misses already -- serve_reads stopped at one -- and are listed without a second probe: a
 *       RWF_NOWAIT miss starts the page's read, so a second probe soon after may hit, and the READ meant for
 *       the asynchronous path would be served inline after an extra system call.
 *
 *   serve_reads(src, pos, end, size, max_block, unaligned, max_length, fd, arena, at, structured, room,
 *               small_reply, most) -> (pos, at, count, missed)
 *       the two above fused, for the transport, on bytes just received at a request boundary: from ``pos``
 *       to ``end`` of ``src``, each complete header scan_reads would take is served as read_batch would
 *       serve it, its reply written into ``arena`` from ``at``. Stops, the header left for the core to parse,
 *       at the first header scan_reads would not take, a READ the page cache cannot serve at once, the
 *       ``room`` or arena limits of read_batch, or after ``most`` requests; ``missed`` says it stopped at a
 *       miss (read_batch's ``known``). Why: most wakes of a connection reading at random bring only such
 *       READs, and per wake the interpreter's work around the two calls (parse, events, admission,
 *       dispatch) cost more than the reads themselves; a fused call leaves the Python around it at a handful
 *       of lines.
 *
 *   scan_writes(src, pos, size, max_block, unaligned, max_length) -> (entries, pos)
 *       the same for plain WRITEs (no flags) whose payload is complete in ``src``: quadruples (cookie, offset,
 *       length, where the payload starts counted from the first header), for a writable export only.
 *
 *   write_batch(fd, entries, payload, index, arena, at, room, small_reply[, mapping]) -> (index, at, charged, errors)
 *       pwrite each WRITE's payload (``payload`` is ``src`` from the first header on) to ``fd`` and write its
 *       simple reply into ``arena``; the same stops as read_batch. ``errors`` lists (index, errno) of writes
 *       that failed (charged, no reply written: the caller answers them). With ``mapping`` (a shared,
 *       writable mapping of ``fd`` from offset 0, e.g. an mmap.mmap; None: none) a payload whose pages are
 *       all in the page cache (mincore) is copied into the mapping instead (mapped_copy), else pwritten.
 *       Why: the kernel's buffered write walks every block of the folio it writes into, and a page cache
 *       filled by sequential I/O holds large folios (ext4 on this machine's Linux 6.18) -- a 4 KiB pwrite
 *       into one cost ~18 us of CPU here, the same bytes stored through a mapping ~1 us (the folio is made
 *       writable once, at the first write fault after it was cleaned). The page-cache check keeps a cold
 *       page from being read in on the caller's thread (a full-block pwrite needs no read).
 *
 *   mapped_copy(mapping, offset, data) -> bool
 *       copy ``data`` into ``mapping`` at ``offset``, guarded: a SIGBUS while copying (the file was
 *       truncated under the mapping, a page could not be read or its block not allocated -- ENOSPC on a
 *       hole) makes it return False, with part of the range possibly written, instead of killing the
 *       process. The guard is a SIGBUS handler installed at the first call, which passes any fault outside
 *       a guarded copy on to the handler that was there before.
 *
 *   splice_writes(sock, pipe_r, pipe_w, pipe2_r, pipe2_w, fd, arena, at, size, max_block, unaligned,
 *                 min_length, max_length, room, small_reply, most, wait[, mapping])
 *       -> (count, at, charged, errors, partial, need, mapped)
 *       for the transport, at a request boundary of a connection that owns its socket (never TLS): while the
 *       socket holds (MSG_PEEK) another whole header of a plain WRITE the core would hand out as
 *       PayloadFollows (its fast path's checks, min_length <= length <= max_length, no flags), take it,
 *       splice its payload socket -> pipe without blocking (into the second pipe, if any (-1: none), once the
 *       first one's slots are full) and, once all of it is in the pipes, pipes -> ``fd``
 *       at its offset (nothing is written before the payload is whole), and write its simple reply into
 *       ``arena``. Stops, the header left unread, at anything else: fewer than 28 bytes, a header it does not
 *       take, ``most`` requests, ``room`` (charges as read_batch) or a full arena. ``errors`` lists (cookie,
 *       errno) of payloads consumed but not written. ``partial``: None, or (cookie, offset, length, in_first,
 *       in_second) of a request taken (and charged) whose payload had not all arrived or did not fit in the
 *       pipes: its first bytes are in them, so many in each, and the caller's splicer goes on from there.
 *       With ``wait`` set, a header is taken only once its whole payload is in the socket (FIONREAD), so
 *       ``partial`` stays None: the call stops there instead, the header left unread, with ``need`` the bytes
 *       (header and payload) the socket must hold for it. ``need`` is REQUEST_SIZE where the socket holds
 *       less than a header (and is not at its end), with or without ``wait``, else 0. The caller may then
 *       sleep until the socket holds that much (SO_RCVLOWAT) and be woken once per request, not once per
 *       segment that arrives.
 *       With ``wait`` and ``mapping`` (a shared, writable mapping of ``fd`` from offset 0; None: none), a
 *       payload whose pages are all in the page cache and all dirty (cachestat(2)) is received straight into
 *       the mapping instead (``mapped`` counts them): its whole payload is in the socket already, so this
 *       too writes nothing before the payload is whole. Why: the copy out of the socket is the one copy a
 *       splice makes too, and it skips the buffered write's walk over the folio's blocks (write_begin and
 *       write_end: a quarter of a 1 MiB WRITE's CPU on ext4, Linux 6.18). Why only dirty pages: writeback
 *       write-protects a page in the mapping as it cleans it, and faulting a page writable again costs about
 *       twice what the walk saves (its 4 KiB pages are faulted one by one), so a clean range is spliced. A
 *       dirty page written through the mapping since it was last cleaned takes the copy without a fault; one
 *       dirtied by a splice or a pwrite faults once, at the first such copy. A fault the kernel cannot
 *       resolve (EFAULT) leaves the rest of the payload to be received into memory and pwritten, which
 *       reports the error. Without ``wait``, a payload that is all in the pipes over such pages is read
 *       from the pipes into the mapping instead of spliced into ``fd`` (drain_pipes; counted in ``mapped``
 *       too): whole by then, so nothing is written before it is.
 *
 *   fill_pipes(sock, pipe_w, pipe2_w, length, in_first, in_second) -> (in_first, in_second, state)
 *   drain_pipes(pipe_r, pipe2_r, in_first, in_second, fd, offset, discard[, mapping]) -> (errno or 0, mapped)
 *       the two halves of a payload's splice that splice_writes runs inline, for the splicer
 *       (cachemode.nbd.splice) that goes on with a payload splice_writes left ``partial``: splice what the
 *       socket holds into the pipes until they hold ``length`` bytes, and say why it stopped short (0 filled,
 *       1 the socket holds nothing more, 2 both pipes full, 3 end of stream; OSError where the socket or a
 *       pipe failed); then move the pipes' bytes into ``fd`` at ``offset`` -- read into ``mapping`` (as
 *       splice_writes' own) where their pages are all dirty, ``mapped`` then True -- or read them out and drop
 *       them (``discard``, or after a failed write, whose errno it returns). Why in C: a payload that trickles in
 *       (a Unix socket never holds a whole one) wakes the splicer a few times per MiB, and per wake the
 *       interpreter's loop -- several splice calls, the BlockingIOError that ends them, the FIONREAD --
 *       cost more than the splices.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define REQUEST_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define CMD_READ 0
#define CMD_WRITE 1
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_OFFSET_DATA 1
#define SIMPLE_HEADER 16
#define DATA_CHUNK_HEADER 28

static inline uint16_t get16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t get64(const unsigned char *p) { return ((uint64_t)get32(p) << 32) | get32(p + 4); }
static inline void put16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = (unsigned char)v; }
static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}
static inline void put64(unsigned char *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

/* A simple reply without error (cachemode.nbd.replies.simple) for ``cookie`` at h: SIMPLE_HEADER bytes. */
static inline void put_simple_reply(unsigned char *h, uint64_t cookie) {
    put32(h, SIMPLE_REPLY_MAGIC);
    put32(h + 4, 0);
    put64(h + 8, cookie);
}

/* Append ``item``, a new reference (NULL when building it failed), to ``list`` and drop the reference:
 * 0, or -1 with the exception set. */
static int append_new(PyObject *list, PyObject *item) {
    if (item == NULL)
        return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

/* What the protocol core's own fast path accepts without error, for one command: the export's size, its
 * maximum block, the minimum block's alignment mask, and the lengths this run takes (shortest..longest). */
struct bounds {
    uint64_t size, max_block, unaligned, shortest, longest;
};

/* Whether the request header at h is a plain ``command`` (no flags) within ``b``; its fields in the rest. */
static inline int plain_request(const unsigned char *h, uint16_t command, const struct bounds *b, uint64_t *cookie,
                                uint64_t *offset, uint32_t *length) {
    *cookie = get64(h + 8);
    *offset = get64(h + 16);
    *length = get32(h + 24);
    return get32(h) == REQUEST_MAGIC && get16(h + 6) == command && get16(h + 4) == 0 && *length != 0 &&
           *length >= b->shortest && *length <= b->longest && *length <= b->max_block && *offset <= b->size &&
           *length <= b->size - *offset && ((*offset | *length) & b->unaligned) == 0;
}

/* scan_reads and scan_writes: READ entries are (cookie, offset, length); WRITE entries add where the payload
 * starts, counted from the first header, and a WRITE is taken only with its whole payload in ``src``. */
static PyObject *scan(PyObject *args, uint16_t command) {
    Py_buffer src;
    Py_ssize_t pos;
    unsigned long long size, max_block, unaligned, max_length;
    if (!PyArg_ParseTuple(args, "y*nKKKK", &src, &pos, &size, &max_block, &unaligned, &max_length))
        return NULL;
    const struct bounds b = {size, max_block, unaligned, 1, max_length ? max_length - 1 : 0}; /* length < max_length */
    const int width = command == CMD_WRITE ? 4 : 3;
    const unsigned char *p = src.buf;
    Py_ssize_t end = src.len, start = pos;
    if (pos < 0 || pos > end) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    Py_ssize_t most = (end - pos) / REQUEST_SIZE;
    PyObject *entries = PyBytes_FromStringAndSize(NULL, most * width * (Py_ssize_t)sizeof(uint64_t));
    if (entries == NULL) {
        PyBuffer_Release(&src);
        return NULL;
    }
    uint64_t *out = (uint64_t *)PyBytes_AS_STRING(entries);
    Py_ssize_t n = 0;
    while (end - pos >= REQUEST_SIZE) {
        uint64_t cookie, offset;
        uint32_t length;
        if (!plain_request(p + pos, command, &b, &cookie, &offset, &length))
            break;
        Py_ssize_t payload = command == CMD_WRITE ? (Py_ssize_t)length : 0;
        if (end - pos - REQUEST_SIZE < payload)
            break;
        uint64_t *e = out + width * n;
        e[0] = cookie;
        e[1] = offset;
        e[2] = length;
        if (command == CMD_WRITE)
            e[3] = (uint64_t)(pos + REQUEST_SIZE - start);
        n++;
        pos += REQUEST_SIZE + payload;
    }
    PyBuffer_Release(&src);
    if (_PyBytes_Resize(&entries, n * width * (Py_ssize_t)sizeof(uint64_t)) < 0)
        return NULL;
    return Py_BuildValue("Nn", entries, pos);
}

static PyObject *scan_reads(PyObject *self, PyObject *args) { return scan(args, CMD_READ); }

/* One READ from the page cache into its reply at h: the header (a simple reply, or one structured OFFSET_DATA
 * chunk with DONE: the layouts of cachemode.nbd.replies.read_header), then the data. 0, with the data
 * possibly part written and no header, where preadv2(RWF_NOWAIT) could not serve it all at once. */
static int serve_read(int fd, unsigned char *h, int structured, uint64_t cookie, uint64_t offset, uint64_t length) {
    struct iovec iov = {h + (structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER), (size_t)length};
    if (preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT) != (ssize_t)length)
        return 0;
    if (structured) {
        put32(h, STRUCTURED_REPLY_MAGIC);
        put16(h + 4, REPLY_FLAG_DONE);
        put16(h + 6, REPLY_TYPE_OFFSET_DATA);
        put64(h + 8, cookie);
        put32(h + 16, (uint32_t)(8 + length));
        put64(h + 20, offset);
    } else {
        put_simple_reply(h, cookie);
    }
    return 1;
}

static PyObject *read_batch(PyObject *self, PyObject *args) {
    int fd, structured;
    Py_buffer entries, arena;
    Py_ssize_t index, stop, at, known = 0;
    unsigned long long room, small_reply;
    if (!PyArg_ParseTuple(args, "iy*nnw*npKK|n", &fd, &entries, &index, &stop, &arena, &at, &structured, &room,
                          &small_reply, &known))
        return NULL;
    PyObject *misses = PyList_New(0);
    if (misses == NULL)
        goto fail;
    const uint64_t *e = entries.buf;
    Py_ssize_t count = entries.len / (Py_ssize_t)(3 * sizeof(uint64_t));
    if (stop < count)
        count = stop;
    if (index < 0 || at < 0 || at > arena.len) {
        PyErr_SetString(PyExc_ValueError, "index or at out of range");
        goto fail;
    }
    unsigned char *a = arena.buf;
    Py_ssize_t header = structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER;
    unsigned long long charged = 0;
    const Py_ssize_t probe_from = known > 0 ? index + known : index;
    for (; index < count; index++) {
        uint64_t cookie = e[3 * index], offset = e[3 * index + 1], length = e[3 * index + 2];
        if (charged + length + small_reply > room || at + header + (Py_ssize_t)length > arena.len)
            break;
        charged += length + small_reply;
        if (index < probe_from || !serve_read(fd, a + at, structured, cookie, offset, length)) {
            if (append_new(misses, PyLong_FromSsize_t(index)) < 0)
                goto fail;
            continue;
        }
        at += header + (Py_ssize_t)length;
    }
    PyBuffer_Release(&entries);
    PyBuffer_Release(&arena);
    return Py_BuildValue("nnKN", index, at, charged, misses);
fail:
    Py_XDECREF(misses);
    PyBuffer_Release(&entries);
    PyBuffer_Release(&arena);
    return NULL;
}

static PyObject *serve_reads(PyObject *self, PyObject *args) {
    Py_buffer src, arena;
    Py_ssize_t pos, end, at, most;
    unsigned long long size, max_block, unaligned, max_length, small_reply;
    long long signed_room; /* the ledger's room is negative once a budget is overdrawn: then none */
    int fd, structured;
    if (!PyArg_ParseTuple(args, "y*nnKKKKiw*npLKn", &src, &pos, &end, &size, &max_block, &unaligned, &max_length,
                          &fd, &arena, &at, &structured, &signed_room, &small_reply, &most))
        return NULL;
    const unsigned long long room = signed_room > 0 ? (unsigned long long)signed_room : 0;
    if (pos < 0 || end < pos || end > src.len || at < 0 || at > arena.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&arena);
        PyErr_SetString(PyExc_ValueError, "pos, end or at out of range");
        return NULL;
    }
    const struct bounds b = {size, max_block, unaligned, 1, max_length ? max_length - 1 : 0};
    const unsigned char *p = src.buf;
    unsigned char *a = arena.buf;
    const Py_ssize_t header = structured ? DATA_CHUNK_HEADER : SIMPLE_HEADER;
    unsigned long long charged = 0;
    Py_ssize_t count = 0;
    int missed = 0;
    while (count < most && end - pos >= REQUEST_SIZE) {
        uint64_t cookie, offset;
        uint32_t length;
        if (!plain_request(p + pos, CMD_READ, &b, &cookie, &offset, &length))
            break;
        if (charged + length + small_reply > room || at + header + (Py_ssize_t)length > arena.len)
            break;
        if (!serve_read(fd, a + at, structured, cookie, offset, length)) {
            missed = 1;
            break;
        }
        charged += length + small_reply;
        at += header + (Py_ssize_t)length;
        pos += REQUEST_SIZE;
        count++;
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&arena);
    return Py_BuildValue("nnnO", pos, at, count, missed ? Py_True : Py_False);
}

static PyObject *scan_writes(PyObject *self, PyObject *args) { return scan(args, CMD_WRITE); }

/* The guard of mapped_copy: the copy in progress on this thread (NULL: none) and the handler found before. */
static __thread sigjmp_buf *volatile copy_guard; /* volatile: its stores around memcpy are not dropped */
static struct sigaction previous_sigbus;
static volatile sig_atomic_t sigbus_guarded;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *guard = copy_guard;
    if (guard != NULL) {
        copy_guard = NULL;
        siglongjmp(*guard, 1);
    }
    /* Not a guarded copy: put the previous handler back and return; the fault recurs and reaches it (should
     * the process live on, the next guarded copy installs this handler again). */
    sigaction(SIGBUS, &previous_sigbus, NULL);
    sigbus_guarded = 0;
}

/* Install on_sigbus once (SA_NODEFER: SIGBUS is not left blocked after the jump out). 0, or -1 with errno. */
static int guard_sigbus(void) {
    if (sigbus_guarded)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous_sigbus) < 0)
        return -1;
    sigbus_guarded = 1;
    return 0;
}

/* Copy n bytes to dst, a shared file mapping: 0, or -1 if a SIGBUS stopped the copy. */
static int guarded_copy(unsigned char *dst, const unsigned char *src, size_t n) {
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) /* no mask saved: that would be a system call per copy (SA_NODEFER instead) */
        return -1;
    copy_guard = &env;
    __asm__ volatile("" ::: "memory"); /* the copy starts after the guard is set, and ends before it is unset */
    memcpy(dst, src, n);
    __asm__ volatile("" ::: "memory");
    copy_guard = NULL;
    return 0;
}

/* The system's page size, asked once. */
static uint64_t page_size(void) {
    static uint64_t page;
    if (!page)
        page = (uint64_t)sysconf(_SC_PAGESIZE);
    return page;
}

/* Whether every page of [at, at + n) of the mapping base is in the page cache and up to date. */
static int resident(unsigned char *base, uint64_t at, uint64_t n) {
    const uint64_t page = page_size();
    uint64_t first = at - at % page, end = at + n;
    unsigned char vec[128];
    while (first < end) {
        uint64_t span = end - first, most = page * sizeof vec;
        if (span > most)
            span = most;
        if (mincore(base + first, (size_t)span, vec) < 0)
            return 0;
        uint64_t pages = (span + page - 1) / page;
        for (uint64_t i = 0; i < pages; i++)
            if (!(vec[i] & 1))
                return 0;
        first += pages * page;
    }
    return 1;
}

static PyObject *mapped_copy(PyObject *self, PyObject *args) {
    Py_buffer mapping, data;
    unsigned long long offset;
    if (!PyArg_ParseTuple(args, "w*Ky*", &mapping, &offset, &data))
        return NULL;
    PyObject *result = NULL;
    if (offset > (unsigned long long)mapping.len || (unsigned long long)data.len > mapping.len - offset)
        PyErr_SetString(PyExc_ValueError, "range outside the mapping");
    else if (guard_sigbus() < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    else
        result = PyBool_FromLong(guarded_copy((unsigned char *)mapping.buf + offset, data.buf, (size_t)data.len) == 0);
    PyBuffer_Release(&mapping);
    PyBuffer_Release(&data);
    return result;
}

/* pwrite all ``n`` bytes of ``buf`` to fd at ``offset``: 0, or the errno of the write that failed. */
static int pwrite_all(int fd, const unsigned char *buf, uint64_t n, uint64_t offset) {
    uint64_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(fd, buf + done, (size_t)(n - done), (off_t)(offset + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? errno : EIO;
        done += (uint64_t)w;
    }
    return 0;
}

static PyObject *write_batch(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer entries, payload, arena, mapping = {0};
    Py_ssize_t index, at;
    unsigned long long room, small_reply;
    PyObject *map_object = Py_None;
    if (!PyArg_ParseTuple(args, "iy*y*nw*nKK|O", &fd, &entries, &payload, &index, &arena, &at, &room, &small_reply,
                          &map_object))
        return NULL;
    PyObject *errors = PyList_New(0);
    if (errors == NULL)
        goto fail;
    if (index < 0 || at < 0 || at > arena.len) {
        PyErr_SetString(PyExc_ValueError, "index or at out of range");
        goto fail;
    }
    if (map_object != Py_None) {
        if (PyObject_GetBuffer(map_object, &mapping, PyBUF_WRITABLE) < 0)
            goto fail;
        if (guard_sigbus() < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
    }
    unsigned char *map = mapping.buf;
    uint64_t map_len = map != NULL ? (uint64_t)mapping.len : 0;
    const uint64_t *e = entries.buf;
    Py_ssize_t count = entries.len / (Py_ssize_t)(4 * sizeof(uint64_t));
    const unsigned char *data = payload.buf;
    unsigned char *a = arena.buf;
    unsigned long long charged = 0;
    for (; index < count; index++) {
        uint64_t cookie = e[4 * index], offset = e[4 * index + 1], length = e[4 * index + 2], from = e[4 * index + 3];
        if (charged + length + small_reply > room || at + SIMPLE_HEADER > arena.len)
            break;
        if (from > (uint64_t)payload.len || length > (uint64_t)payload.len - from) {
            PyErr_SetString(PyExc_ValueError, "entry outside the payload");
            goto fail;
        }
        charged += length + small_reply;
        int err = 0;
        if (map == NULL || offset > map_len || length > map_len - offset || !resident(map, offset, length) ||
            guarded_copy(map + offset, data + from, (size_t)length) != 0)
            err = pwrite_all(fd, data + from, length, offset); /* after a SIGBUS too: it reports the error */
        if (err) {
            if (append_new(errors, Py_BuildValue("ni", index, err)) < 0)
                goto fail;
            continue;
        }
        put_simple_reply(a + at, cookie);
        at += SIMPLE_HEADER;
    }
    PyBuffer_Release(&entries);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&arena);
    if (mapping.obj != NULL)
        PyBuffer_Release(&mapping);
    return Py_BuildValue("nnKN", index, at, charged, errors);
fail:
    Py_XDECREF(errors);
    PyBuffer_Release(&entries);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&arena);
    if (mapping.obj != NULL)
        PyBuffer_Release(&mapping);
    return NULL;
}

#ifndef __NR_cachestat
#define __NR_cachestat 451 /* the same number on every architecture but alpha (Linux 6.5) */
#endif

/* Whether every page of [offset, offset + length) of fd is in the page cache and dirty, none under writeback
 * (cachestat(2), Linux 6.5; 0 where the kernel lacks it). */
static int all_dirty(int fd, uint64_t offset, uint64_t length) {
    static int missing;
    if (missing)
        return 0;
    struct { uint64_t off, len; } range = {offset, length};
    struct { uint64_t cache, dirty, writeback, evicted, recently_evicted; } cs;
    if (syscall(__NR_cachestat, fd, &range, &cs, 0) != 0) {
        if (errno == ENOSYS)
            missing = 1;
        return 0;
    }
    const uint64_t p = page_size(), pages = (offset + length + p - 1) / p - offset / p;
    return cs.cache == pages && cs.dirty == pages && cs.writeback == 0;
}

/* One read(2) of up to ``n`` bytes out of a pipe that holds some, retried on EINTR: how many, or -1 with errno
 * set (EIO where the pipe turned out empty). */
static ssize_t read_pipe(int pipe, unsigned char *dst, size_t n) {
    ssize_t got;
    do
        got = read(pipe, dst, n);
    while (got < 0 && errno == EINTR);
    if (got == 0) {
        errno = EIO;
        return -1;
    }
    return got;
}

/* Moves the bytes in pipes[0] then pipes[1] (in[] each) into ``fd`` at ``offset``; on a write error -- or
 * from the start, where ``err`` is already set -- the rest is read out and dropped (the payload is consumed all
 * the same). With ``map`` (fd's shared mapping, ``map_len`` long; NULL: none), a range whose pages are all
 * dirty in the page cache is read from the pipes straight into the mapping instead (``*mapped`` set): one
 * copy, as the splice makes, without the filesystem's write path (see splice_writes); a fault the kernel
 * cannot resolve (EFAULT) sends the rest through the splice. Returns ``err``, or the write's errno; -1 with
 * errno set when a pipe itself failed. */
static int drain_pipes(const int pipes[2], const uint64_t in[2], int fd, uint64_t offset, int err,
                       unsigned char *map, uint64_t map_len, int *mapped) {
    const uint64_t total = in[0] + in[1];
    int by_map = !err && map != NULL && offset <= map_len && total <= map_len - offset && all_dirty(fd, offset, total);
    *mapped = by_map;
    for (int p = 0; p < 2; p++) {
        uint64_t left = in[p];
        while (left) {
            ssize_t n;
            if (by_map) {
                n = read_pipe(pipes[p], map + offset, (size_t)left);
                if (n < 0 && errno == EFAULT) {
                    by_map = 0;
                    continue;
                }
                if (n < 0)
                    return -1;
            } else if (!err) {
                loff_t pos = (loff_t)offset;
                n = splice(pipes[p], NULL, fd, &pos, (size_t)left, SPLICE_F_MOVE);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0) {
                    err = n < 0 ? errno : EIO;
                    continue;
                }
            } else {
                unsigned char sink[65536];
                n = read_pipe(pipes[p], sink, left < sizeof sink ? (size_t)left : sizeof sink);
                if (n < 0)
                    return -1;
            }
            left -= (uint64_t)n;
            offset += (uint64_t)n;
        }
    }
    return err;
}

/* Receive ``n`` bytes, all queued in the socket already, into ``buf``: how many landed (all of them, unless a
 * fault in ``buf`` stopped the copy: EFAULT), or -1 with errno set when the socket itself failed. */
static ssize_t recv_queued(int sock, unsigned char *buf, uint64_t n) {
    uint64_t done = 0;
    while (done < n) {
        ssize_t got = recv(sock, buf + done, (size_t)(n - done), MSG_DONTWAIT | MSG_WAITALL);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && errno == EFAULT)
            break;
        if (got <= 0) {
            if (got == 0)
                errno = ECONNRESET;
            return -1;
        }
        done += (uint64_t)got;
    }
    return (ssize_t)done;
}

/* Receive ``length`` bytes, all queued in the socket already, into ``dst`` (the image's mapping), then
 * pwrite to fd at ``offset`` whatever a fault kept from landing there: 0, the pwrite's errno, or -1 with
 * errno set when the socket itself failed. */
static int recv_mapped(int sock, unsigned char *dst, int fd, uint64_t offset, uint64_t length) {
    ssize_t done = recv_queued(sock, dst, length);
    if (done < 0)
        return -1;
    uint64_t left = length - (uint64_t)done;
    if (!left)
        return 0;
    unsigned char *bounce = malloc((size_t)left);
    if (bounce == NULL) {
        errno = ENOMEM;
        return -1;
    }
    if (recv_queued(sock, bounce, left) != (ssize_t)left) { /* memory of our own does not fault */
        free(bounce);
        return -1;
    }
    int err = pwrite_all(fd, bounce, left, offset + (uint64_t)done);
    free(bounce);
    return err;
}

/* Why fill_pipes stopped (its Python twin's codes: cachemode.nbd.splice). */
enum { PIPES_FILLED, PIPES_DRY, PIPES_FULL, PIPES_ENDED, PIPES_FAILED = -1 };

/* Splice what the socket holds of a payload into the pipes without blocking, until they hold ``length`` bytes
 * of it: the first pipe until its slots are full, then the next of ``pipes`` (the second one at once where it
 * holds some already); ``in`` counts the bytes in each. Returns PIPES_FILLED, or where it stopped short: the
 * socket holds nothing more (PIPES_DRY), both pipes' slots are full (PIPES_FULL: read them out and call again),
 * the stream ended (PIPES_ENDED), or the socket or a pipe failed (PIPES_FAILED, errno set). */
static int fill_pipes(int sock, const int writers[2], int pipes, uint64_t length, uint64_t in[2]) {
    int cur = in[1] ? 1 : 0, retried = 0;
    while (in[0] + in[1] < length) {
        ssize_t n = splice(sock, NULL, writers[cur], NULL, (size_t)(length - in[0] - in[1]),
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            int queued = 0;
            if (ioctl(sock, FIONREAD, &queued) != 0 || queued <= 0)
                return PIPES_DRY;
            if (!retried) { /* the bytes may have come after the splice found none: once more first */
                retried = 1;
                continue;
            }
            retried = 0;
            if (cur + 1 < pipes) { /* this pipe's slots are full */
                cur++;
                continue;
            }
            return PIPES_FULL;
        }
        if (n < 0)
            return PIPES_FAILED;
        if (n == 0)
            return PIPES_ENDED;
        retried = 0;
        in[cur] += (uint64_t)n;
    }
    return PIPES_FILLED;
}

static PyObject *py_fill_pipes(PyObject *self, PyObject *args) {
    int sock, writers[2];
    unsigned long long length, first, second;
    if (!PyArg_ParseTuple(args, "iiiKKK", &sock, &writers[0], &writers[1], &length, &first, &second))
        return NULL;
    if (writers[0] < 0) {
        PyErr_SetString(PyExc_ValueError, "no pipe");
        return NULL;
    }
    uint64_t in[2] = {first, second};
    int state = fill_pipes(sock, writers, writers[1] >= 0 ? 2 : 1, length, in);
    if (state == PIPES_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("KKi", (unsigned long long)in[0], (unsigned long long)in[1], state);
}

static PyObject *py_drain_pipes(PyObject *self, PyObject *args) {
    int readers[2], fd, discard, mapped;
    unsigned long long first, second, offset;
    PyObject *map_object = Py_None;
    Py_buffer mapping = {0};
    if (!PyArg_ParseTuple(args, "iiKKiKp|O", &readers[0], &readers[1], &first, &second, &fd, &offset, &discard,
                          &map_object))
        return NULL;
    if (readers[0] < 0 || (readers[1] < 0 && second)) {
        PyErr_SetString(PyExc_ValueError, "bytes in a missing pipe");
        return NULL;
    }
    if (map_object != Py_None && PyObject_GetBuffer(map_object, &mapping, PyBUF_WRITABLE) < 0)
        return NULL;
    const uint64_t in[2] = {first, second};
    int err = drain_pipes(readers, in, fd, offset, discard ? EIO : 0, mapping.buf,
                          mapping.obj != NULL ? (uint64_t)mapping.len : 0, &mapped);
    if (mapping.obj != NULL)
        PyBuffer_Release(&mapping);
    if (err < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("iO", discard ? 0 : err, mapped ? Py_True : Py_False);
}

static PyObject *splice_writes(PyObject *self, PyObject *args) {
    int sock, fd, ends[4];
    Py_buffer arena;
    Py_ssize_t at, most;
    unsigned long long size, max_block, unaligned, min_length, max_length, room, small_reply;
    int wait;
    Py_buffer mapping = {0};
    PyObject *map_object = Py_None;
    if (!PyArg_ParseTuple(args, "iiiiiiw*nKKKKKKKnp|O", &sock, &ends[0], &ends[1], &ends[2], &ends[3], &fd, &arena,
                          &at, &size, &max_block, &unaligned, &min_length, &max_length, &room, &small_reply, &most,
                          &wait, &map_object))
        return NULL;
    if (map_object != Py_None && PyObject_GetBuffer(map_object, &mapping, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&arena);
        return NULL;
    }
    unsigned char *map = mapping.buf;
    uint64_t map_len = map != NULL ? (uint64_t)mapping.len : 0;
    const struct bounds b = {size, max_block, unaligned, min_length, max_length};
    PyObject *errors = PyList_New(0), *partial = NULL;
    if (errors == NULL)
        goto fail;
    if (at < 0 || at > arena.len || ends[0] < 0 || ends[1] < 0) {
        PyErr_SetString(PyExc_ValueError, "at out of range or no pipe");
        goto fail;
    }
    int readers[2] = {ends[0], ends[2]}, writers[2] = {ends[1], ends[3]};
    int pipes = ends[3] >= 0 ? 2 : 1;
    unsigned char *a = arena.buf;
    unsigned long long charged = 0;
    Py_ssize_t count = 0, mapped = 0;
    unsigned long long need = 0;
    unsigned char h[REQUEST_SIZE];
    while (count < most && at + SIMPLE_HEADER <= arena.len) {
        ssize_t got = recv(sock, h, REQUEST_SIZE, MSG_PEEK | MSG_DONTWAIT);
        if (got != REQUEST_SIZE) {
            if (got > 0 || (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
                need = REQUEST_SIZE;
            break;
        }
        uint64_t cookie, offset;
        uint32_t length;
        if (!plain_request(h, CMD_WRITE, &b, &cookie, &offset, &length) || charged + length + small_reply > room)
            break;
        if (wait) {
            int queued = 0;
            if (ioctl(sock, FIONREAD, &queued) != 0 || (uint64_t)queued < REQUEST_SIZE + (uint64_t)length) {
                need = REQUEST_SIZE + (unsigned long long)length;
                break;
            }
        }
        do
            got = recv(sock, h, REQUEST_SIZE, MSG_DONTWAIT);
        while (got < 0 && errno == EINTR);
        if (got != REQUEST_SIZE) { /* a peeked header cannot vanish; should it, the caller sees the socket */
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        charged += length + small_reply;
        count++;
        uint64_t in[2] = {0, 0};
        int by_map = wait && map != NULL && offset <= map_len && length <= map_len - offset &&
                     all_dirty(fd, offset, length);
        if (!by_map) {
            if (fill_pipes(sock, writers, pipes, length, in) != PIPES_FILLED) {
                partial = Py_BuildValue("KKKKK", (unsigned long long)cookie, (unsigned long long)offset,
                                        (unsigned long long)length, (unsigned long long)in[0],
                                        (unsigned long long)in[1]);
                if (partial == NULL)
                    goto fail;
                break;
            }
        }
        int piped_to_map = 0; /* with wait, all_dirty said no already */
        int err = by_map ? recv_mapped(sock, map + offset, fd, offset, length)
                         : drain_pipes(readers, in, fd, offset, 0, wait ? NULL : map, map_len, &piped_to_map);
        if (err < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        if (err) {
            if (append_new(errors, Py_BuildValue("Ki", (unsigned long long)cookie, err)) < 0)
                goto fail;
            continue;
        }
        mapped += by_map || piped_to_map;
        put_simple_reply(a + at, cookie);
        at += SIMPLE_HEADER;
    }
    PyBuffer_Release(&arena);
    if (mapping.obj != NULL)
        PyBuffer_Release(&mapping);
    if (partial == NULL)
        partial = Py_NewRef(Py_None);
    return Py_BuildValue("nnKNNKn", count, at, charged, errors, partial, need, mapped);
fail:
    Py_XDECREF(errors);
    Py_XDECREF(partial);
    PyBuffer_Release(&arena);
    if (mapping.obj != NULL)
        PyBuffer_Release(&mapping);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan_reads", scan_reads, METH_VARARGS, "The run of plain READ headers at pos: (entries, pos)."},
    {"read_batch", read_batch, METH_VARARGS, "Serve a run of READs from the page cache into a reply arena."},
    {"serve_reads", serve_reads, METH_VARARGS, "Serve the leading run of plain READs in received bytes: (pos, at, count, missed)."},
    {"scan_writes", scan_writes, METH_VARARGS, "The run of plain WRITEs with their payloads at pos: (entries, pos)."},
    {"write_batch", write_batch, METH_VARARGS, "Write a run of WRITEs to a file, replies into a reply arena."},
    {"mapped_copy", mapped_copy, METH_VARARGS, "Copy bytes into a file mapping; False if a SIGBUS stopped it."},
    {"splice_writes", splice_writes, METH_VARARGS, "Splice a run of large plain WRITEs from a socket into a file."},
    {"fill_pipes", py_fill_pipes, METH_VARARGS, "Splice what a socket holds of a payload into pipes: (in, in2, state)."},
    {"drain_pipes", py_drain_pipes, METH_VARARGS, "Move a payload out of pipes into a file or its mapping: (0 or the write's errno, mapped)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_batch", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__batch(void) { return PyModule_Create(&module); }
