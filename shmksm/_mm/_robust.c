/* The fast paths of shmksm in C: its robust mutexes' uncontended acquire and
 * release (see locks.py), and the bulk copies between guest pages and the
 * frame pool that run under them (see guest.py).
 *
 * Mutex(address) wraps a pthread_mutex_t that lives in shared memory at
 * ``address`` and was initialised (robust, process-shared) by its owner.
 * acquire()/release()/__enter__/__exit__ take the uncontended path entirely
 * here: pthread_mutex_trylock returning 0 is True, pthread_mutex_unlock
 * returning 0 is None.  Everything else calls back into the subclass's
 * Python methods:
 *
 *   trylock != 0   ->  self._contended(rc, block, timeout)  (its result)
 *   unlock  != 0   ->  self._release_failed(rc)                (raises)
 *
 * The slow path waits through _lock() and _clocklock(deadline), which
 * release the GIL for the whole wait.
 *
 * gather(), scatter() and scatter_pages() copy many pages at once, each run of 512 PTEs
 * under its page-table lock, taken once through the same fast path; what
 * needs a fault goes back to Python (see their doc strings).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    pthread_mutex_t *m;
} Mutex;

static PyObject *str_contended;
static PyObject *str_release_failed;

static int
Mutex_init(Mutex *self, PyObject *args, PyObject *kwds)
{
    unsigned long long address;
    static char *kwlist[] = {"address", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K:Mutex", kwlist, &address))
        return -1;
    if (address == 0 || address % _Alignof(pthread_mutex_t)) {
        PyErr_Format(PyExc_ValueError, "Mutex: bad address %llu", address);
        return -1;
    }
    self->m = (pthread_mutex_t *)(uintptr_t)address;
    return 0;
}

static PyObject *
slow(Mutex *self, int rc, PyObject *block, PyObject *timeout)
{
    PyObject *args[4] = {(PyObject *)self, NULL, block, timeout};
    PyObject *code = PyLong_FromLong(rc);
    if (code == NULL)
        return NULL;
    args[1] = code;
    PyObject *res = PyObject_VectorcallMethod(str_contended, args, 4, NULL);
    Py_DECREF(code);
    return res;
}

/* True, with RuntimeError set, if Mutex.__init__ never ran (a subclass that forgot it). */
static inline int
unset(Mutex *self)
{
    if (self->m != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "Mutex.__init__ was not called");
    return 1;
}

static inline PyObject *
take(Mutex *self, PyObject *block, PyObject *timeout)
{
    if (unset(self))
        return NULL;
    int rc = pthread_mutex_trylock(self->m);
    if (rc == 0)
        Py_RETURN_TRUE;
    return slow(self, rc, block, timeout);
}

static PyObject *
give(Mutex *self)
{
    if (unset(self))
        return NULL;
    int rc = pthread_mutex_unlock(self->m);
    if (rc == 0)
        Py_RETURN_NONE;
    PyObject *code = PyLong_FromLong(rc);
    if (code == NULL)
        return NULL;
    PyObject *args[2] = {(PyObject *)self, code};
    PyObject *res = PyObject_VectorcallMethod(str_release_failed, args, 2, NULL);
    Py_DECREF(code);
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

static PyObject *
Mutex_acquire(Mutex *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *block = Py_True, *timeout = Py_None;
    if (nargs == 0 && kwnames == NULL)
        return take(self, block, timeout);
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nargs > 0)
        block = args[0];
    if (nargs > 1)
        timeout = args[1];
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            PyObject *value = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(key, "block") == 0 && nargs < 1)
                block = value;
            else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0 && nargs < 2)
                timeout = value;
            else {
                PyErr_Format(PyExc_TypeError, "acquire() got an unexpected or repeated keyword argument '%U'", key);
                return NULL;
            }
        }
    }
    return take(self, block, timeout);
}

static PyObject *
Mutex_release(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    return give(self);
}

static PyObject *
Mutex_enter(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    return take(self, Py_True, Py_None);
}

static PyObject *
Mutex_exit(Mutex *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return give(self);
}

static PyObject *
Mutex_lock(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    if (unset(self))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_mutex_lock(self->m);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *
Mutex_clocklock(Mutex *self, PyObject *arg)
{
    if (unset(self))
        return NULL;
    double deadline = PyFloat_AsDouble(arg);
    if (deadline == -1.0 && PyErr_Occurred())
        return NULL;
    if (!isfinite(deadline) || deadline < 0) {
        PyErr_SetString(PyExc_ValueError, "_clocklock: bad deadline");
        return NULL;
    }
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L)
        ts.tv_nsec = 999999999L;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_mutex_clocklock(self->m, CLOCK_MONOTONIC, &ts);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *
Mutex_consistent(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    if (unset(self))
        return NULL;
    return PyLong_FromLong(pthread_mutex_consistent(self->m));
}

static PyMethodDef Mutex_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Mutex_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(block=True, timeout=None)\n--\n\n"
     "Take the lock; False if not had (``block`` False, or ``timeout`` passed).\n\n"
     "In the host, no timeout means the table's ``host_timeout``, and not\n"
     "having the lock by then raises LockTimeout."},
    {"release", (PyCFunction)Mutex_release, METH_NOARGS, "release() -> None: give the lock back."},
    {"__enter__", (PyCFunction)Mutex_enter, METH_NOARGS, "acquire()"},
    {"__exit__", (PyCFunction)(void (*)(void))Mutex_exit, METH_FASTCALL, "release()"},
    {"_lock", (PyCFunction)Mutex_lock, METH_NOARGS,
     "_lock() -> int: pthread_mutex_lock's result, waiting without the GIL."},
    {"_clocklock", (PyCFunction)Mutex_clocklock, METH_O,
     "_clocklock(deadline) -> int: pthread_mutex_clocklock's result against a CLOCK_MONOTONIC deadline "
     "in seconds, waiting without the GIL."},
    {"_consistent", (PyCFunction)Mutex_consistent, METH_NOARGS,
     "_consistent() -> int: pthread_mutex_consistent's result."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmksm._mm._robust.Mutex",
    .tp_basicsize = sizeof(Mutex),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Mutex(address): a robust, process-shared pthread mutex in shared memory, fast path in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Mutex_init,
    .tp_methods = Mutex_methods,
};

/* -- bulk copies between guest pages and the frame pool -------------------------------------------
 *
 * The layouts are pagetable.py's and frames.py's: a PTE is a uint64, the pfn
 * in bits 0-39 and the flags above; frame pfn is the 4 KiB at byte pfn << 12
 * of the pool.  A PTE is read, and the frame it maps copied, only with the
 * lock of its run of 512 PTEs held; the runs go in address order, one lock
 * at a time.  The copies of a run of 16 pages or more run without the GIL.
 */

#define PAGE_SHIFT 12
#define PAGE_BYTES ((size_t)1 << PAGE_SHIFT)
#define RUN_SHIFT 9
#define PTE_PFN_MASK ((1ULL << 40) - 1)
#define PTE_PRESENT (1ULL << 40)
#define PTE_WRITE (1ULL << 41)
#define PTE_DIRTY (1ULL << 42)
#define PTE_YOUNG (1ULL << 43)
#define PTE_UNMAPPED (1ULL << 46)
/* pagetable.py's HIGH_WRITABLE, HIGH_READABLE, HIGH_READ_MASK, HIGH_UNMAPPED: the same tests. */
#define HIGH_WRITABLE ((PTE_PRESENT | PTE_WRITE | PTE_DIRTY | PTE_YOUNG) >> 32)
#define HIGH_READABLE ((PTE_PRESENT | PTE_YOUNG) >> 32)
#define HIGH_READ_MASK (HIGH_READABLE | (PTE_PFN_MASK >> 32))
#define HIGH_UNMAPPED (PTE_UNMAPPED >> 32)
#define NOGIL_PAGES 16

static PyObject *str_acquire;
static PyObject *str_release;

/* Take a page-table lock: a Mutex through take() (its slow path included), anything else by acquire().
 * Once had, a reference to it is held until ptl_give (Python code may run meanwhile). */
static int
ptl_take(PyObject *lock)
{
    Py_INCREF(lock);
    PyObject *res = PyObject_TypeCheck(lock, &MutexType) ? take((Mutex *)lock, Py_True, Py_None)
                                                          : PyObject_CallMethodNoArgs(lock, str_acquire);
    int had = res == NULL ? -1 : PyObject_IsTrue(res);
    Py_XDECREF(res);
    if (had == 0)
        PyErr_SetString(PyExc_RuntimeError, "a page-table lock was not had");
    if (had != 1)
        Py_DECREF(lock);
    return had == 1 ? 0 : -1;
}

/* Give a page-table lock back; an exception already set stays the one raised. */
static int
ptl_give(PyObject *lock)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = PyObject_TypeCheck(lock, &MutexType) ? give((Mutex *)lock)
                                                          : PyObject_CallMethodNoArgs(lock, str_release);
    Py_XDECREF(res);
    Py_DECREF(lock);
    if (type != NULL) {
        if (res == NULL)
            PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return -1;
    }
    return res == NULL ? -1 : 0;
}

/* Copies of adjacent pieces made one memcpy. */
typedef struct {
    char *dst;
    const char *src;
    size_t len;
} Pending;

static inline void
copy_piece(Pending *p, char *dst, const char *src, size_t len)
{
    if (p->len && p->dst + p->len == dst && p->src + p->len == src) {
        p->len += len;
        return;
    }
    if (p->len)
        memcpy(p->dst, p->src, p->len);
    p->dst = dst;
    p->src = src;
    p->len = len;
}

static inline void
copy_flush(Pending *p)
{
    if (p->len)
        memcpy(p->dst, p->src, p->len);
    p->len = 0;
}

/* The run lock of ``run``, borrowed; NULL with an error set if ``locks`` has none. */
static PyObject *
run_lock(PyObject *locks, Py_ssize_t run)
{
    if (run >= PyList_GET_SIZE(locks)) {
        PyErr_Format(PyExc_ValueError, "no page-table lock for run %zd", run);
        return NULL;
    }
    return PyList_GET_ITEM(locks, run);
}

/* Copy guest bytes [s, end) between their frames in the pool and buf (which holds the bytes from
 * guest address addr on): into the pool if ``in``, else out of it.  Lock of their run held. */
static void
copy_range(const uint64_t *ptes, char *pool, char *buf, Py_ssize_t addr, Py_ssize_t s, Py_ssize_t end, int in)
{
    Pending p = {NULL, NULL, 0};
    while (s < end) {
        Py_ssize_t page = s >> PAGE_SHIFT;
        Py_ssize_t e = (page + 1) << PAGE_SHIFT;
        if (e > end)
            e = end;
        char *frame = pool + ((size_t)(ptes[page] & PTE_PFN_MASK) << PAGE_SHIFT | (size_t)(s & (PAGE_BYTES - 1)));
        if (in)
            copy_piece(&p, frame, buf + (s - addr), (size_t)(e - s));
        else
            copy_piece(&p, buf + (s - addr), frame, (size_t)(e - s));
        s = e;
    }
    copy_flush(&p);
}

/* copy_range of the bytes of pages [page, stop) within [addr, end), without the GIL if they are many. */
static void
copy_run(const uint64_t *ptes, char *pool, char *buf, Py_ssize_t addr, Py_ssize_t end, Py_ssize_t page,
         Py_ssize_t stop, int in)
{
    Py_ssize_t s = page << PAGE_SHIFT, e = stop << PAGE_SHIFT;
    if (s < addr)
        s = addr;
    if (e > end)
        e = end;
    if (stop - page >= NOGIL_PAGES) {
        Py_BEGIN_ALLOW_THREADS
        copy_range(ptes, pool, buf, addr, s, e, in);
        Py_END_ALLOW_THREADS
    } else {
        copy_range(ptes, pool, buf, addr, s, e, in);
    }
}

/* The end of the run of 512 PTEs that holds ``page``, or ``last + 1`` if that comes first. */
static inline Py_ssize_t
run_stop(Py_ssize_t page, Py_ssize_t last)
{
    Py_ssize_t stop = ((page >> RUN_SHIFT) + 1) << RUN_SHIFT;
    return stop > last + 1 ? last + 1 : stop;
}

/* Do pages [page, stop) all need no fault to write, and map frames of the pool? */
static int
writable(const uint64_t *ptes, Py_ssize_t page, Py_ssize_t stop, Py_ssize_t nframes)
{
    for (; page < stop; page++)
        if (ptes[page] >> 32 != HIGH_WRITABLE || (Py_ssize_t)(ptes[page] & PTE_PFN_MASK) >= nframes)
            return 0;
    return 1;
}

/* The arguments every bulk copy starts with, (ptes, pool, locks, ...), ``want`` in all: checked, and
 * the two buffers taken (released by the caller). */
static int
bulk_args(const char *usage, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_buffer *ptes,
          Py_buffer *pool, int pool_flags)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", usage, want);
        return -1;
    }
    if (!PyList_Check(args[2])) {
        PyErr_Format(PyExc_TypeError, "%s: locks must be a list", usage);
        return -1;
    }
    if (PyObject_GetBuffer(args[0], ptes, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(args[1], pool, pool_flags) < 0) {
        PyBuffer_Release(ptes);
        return -1;
    }
    return 0;
}

static PyObject *
bulk_gather(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer ptes_buf, pool_buf, out_buf = {0};
    PyObject *result = NULL, *bytes = NULL;
    if (bulk_args("gather(ptes, pool, locks, fault, addr, n, out)", args, nargs, 7, &ptes_buf, &pool_buf,
                  PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *locks = args[2], *fault = args[3], *dst = args[6];
    const uint64_t *ptes = (const uint64_t *)ptes_buf.buf;
    Py_ssize_t npages = ptes_buf.len / 8;
    char *out;
    Py_ssize_t addr = PyLong_AsSsize_t(args[4]), n = -1;
    if (addr == -1 && PyErr_Occurred())
        goto done;
    n = PyLong_AsSsize_t(args[5]);
    if (n == -1 && PyErr_Occurred())
        goto done;
    if (n <= 0 || addr < 0 || addr > (npages << PAGE_SHIFT) - n) {
        PyErr_Format(PyExc_ValueError, "gather: %zd bytes at %zd are outside the %zd pages", n, addr, npages);
        goto done;
    }
    Py_ssize_t first = addr >> PAGE_SHIFT, last = (addr + n - 1) >> PAGE_SHIFT, end = addr + n;
    for (Py_ssize_t page = first; page <= last; page++) {
        if ((ptes[page] >> 32) >= HIGH_UNMAPPED) {
            result = PyLong_FromSsize_t(page);  /* nothing read: the caller says which page */
            goto done;
        }
    }
    if (dst == Py_None) {
        bytes = PyBytes_FromStringAndSize(NULL, n);
        if (bytes == NULL)
            goto done;
        out = PyBytes_AS_STRING(bytes);
    } else {
        if (PyObject_GetBuffer(dst, &out_buf, PyBUF_WRITABLE) < 0)
            goto done;
        if (out_buf.len < n) {
            PyErr_Format(PyExc_ValueError, "gather: out holds %zd bytes, not %zd", out_buf.len, n);
            goto done;
        }
        out = (char *)out_buf.buf;
    }
    for (Py_ssize_t page = first; page <= last;) {
        Py_ssize_t stop = run_stop(page, last);
        PyObject *lock = run_lock(locks, page >> RUN_SHIFT);
        if (lock == NULL || ptl_take(lock) < 0)
            goto done;
        Py_ssize_t p = page;
        while (p < stop && ((ptes[p] >> 32) & HIGH_READ_MASK) == HIGH_READABLE)
            p++;
        if (p < stop) {  /* untouched, or not young: the fault handler marks the run young */
            PyObject *res = PyObject_CallFunction(fault, "nn", page, stop);
            if (res == NULL) {
                ptl_give(lock);
                goto done;
            }
            Py_DECREF(res);
        }
        for (p = page; p < stop; p++) {
            if ((size_t)(ptes[p] & PTE_PFN_MASK) >= (size_t)pool_buf.len >> PAGE_SHIFT) {
                PyErr_Format(PyExc_RuntimeError, "page %zd maps frame %llu, outside the pool", p,
                             (unsigned long long)(ptes[p] & PTE_PFN_MASK));
                ptl_give(lock);
                goto done;
            }
        }
        copy_run(ptes, (char *)pool_buf.buf, out, addr, end, page, stop, 0);
        if (ptl_give(lock) < 0)
            goto done;
        page = stop;
    }
    if (bytes != NULL) {
        result = bytes;
        bytes = NULL;
    } else {
        result = Py_NewRef(Py_None);
    }
done:
    Py_XDECREF(bytes);
    if (out_buf.obj != NULL)
        PyBuffer_Release(&out_buf);
    PyBuffer_Release(&pool_buf);
    PyBuffer_Release(&ptes_buf);
    return result;
}

/* The page numbers of a buffer of integers; 0 with nothing set if it is of a kind left to the caller. */
static int
page_numbers(Py_buffer *b, Py_ssize_t *pages, Py_ssize_t count)
{
    const char *f = b->format;
    if (f == NULL || b->ndim != 1)
        return 0;
    if (*f == '@')
        f++;
    if (f[0] == 0 || f[1] != 0)
        return 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *at = (const char *)b->buf + i * b->itemsize;  /* memcpy: maybe not aligned */
        long long v;
        int64_t i64;
        uint64_t u64;
        int32_t i32;
        uint32_t u32;
        switch (b->itemsize == 8 ? f[0] : b->itemsize == 4 ? f[0] | 0x100 : 0) {
        case 'l': case 'q': case 'n': memcpy(&i64, at, 8); v = i64; break;
        case 'L': case 'Q': case 'N':
            memcpy(&u64, at, 8);
            v = u64 > (uint64_t)PY_SSIZE_T_MAX ? -1 : (long long)u64;
            break;
        case 'i' | 0x100: memcpy(&i32, at, 4); v = i32; break;
        case 'I' | 0x100: memcpy(&u32, at, 4); v = u32; break;
        default: return 0;
        }
        pages[i] = (Py_ssize_t)v;
    }
    return 1;
}

/* The page numbers of a list or tuple of ints; 0 with nothing set if it holds anything else. */
static int
listed_page_numbers(PyObject *seq, Py_ssize_t *pages, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyLong_Check(item) || PyBool_Check(item))
            return 0;
        pages[i] = PyLong_AsSsize_t(item);
        if (pages[i] == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    }
    return 1;
}

/* A buffer format of one native item that is not a Python object (what memoryview.cast("B") takes). */
static int
plain_format(const char *f)
{
    if (f == NULL)
        return 1;
    if (*f == '@')
        f++;
    return f[0] != 0 && f[1] == 0 && f[0] != 'O';
}

/* Copy the rows of the pages of one run (``at[0..k)`` index pages and rows) into their frames.  Lock held. */
static void
scatter_run(const uint64_t *ptes, char *pool, const char *rows, const Py_ssize_t *pages, const Py_ssize_t *at,
            Py_ssize_t k)
{
    Pending p = {NULL, NULL, 0};
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t i = at[j];
        copy_piece(&p, pool + ((size_t)(ptes[pages[i]] & PTE_PFN_MASK) << PAGE_SHIFT),
                   rows + ((size_t)i << PAGE_SHIFT), PAGE_BYTES);
    }
    copy_flush(&p);
}

static PyObject *
bulk_scatter_pages(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer ptes_buf, pool_buf, pages_buf = {0}, rows_buf = {0};
    Py_ssize_t *pages = NULL, *at = NULL, *first = NULL;
    Py_ssize_t resume = -1;  /* the page from which the caller goes on: npages for none, -1 see below */
    int failed = 1;
    if (bulk_args("scatter_pages(ptes, pool, locks, pages, rows)", args, nargs, 5, &ptes_buf, &pool_buf,
                  PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *locks = args[2];
    const uint64_t *ptes = (const uint64_t *)ptes_buf.buf;
    char *pool = (char *)pool_buf.buf;
    Py_ssize_t npages = ptes_buf.len / 8, nframes = pool_buf.len >> PAGE_SHIFT;
    /* Arguments of any other kind, or wrong, are left to the caller, which says what is wrong. */
    PyObject *listed = PyList_Check(args[3]) || PyTuple_Check(args[3]) ? args[3] : NULL;
    if ((listed == NULL && PyObject_GetBuffer(args[3], &pages_buf, PyBUF_ND | PyBUF_FORMAT) < 0)
        || PyObject_GetBuffer(args[4], &rows_buf, PyBUF_ND | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        goto checked;
    }
    Py_ssize_t count = listed != NULL        ? PySequence_Fast_GET_SIZE(listed)
                       : pages_buf.ndim == 1 ? pages_buf.shape[0]
                                             : 0;
    if (count == 0 || rows_buf.len != count * (Py_ssize_t)PAGE_BYTES || !plain_format(rows_buf.format)
        || (rows_buf.ndim > 1 && rows_buf.shape[0] != count))
        goto checked;
    pages = PyMem_Malloc(count * sizeof(Py_ssize_t));
    at = PyMem_Malloc(count * sizeof(Py_ssize_t));
    if (pages == NULL || at == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(listed != NULL ? listed_page_numbers(listed, pages, count) : page_numbers(&pages_buf, pages, count)))
        goto checked;
    resume = 0;
    /* A look at every PTE without the locks: a page to fault in, or an unmapped one, and it is all
     * the caller's.  Under each lock the look is made again (ksmd may have write-protected a page). */
    int ascending = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t page = pages[i];
        if (page < 0 || page >= npages || !writable(ptes, page, page + 1, nframes))
            goto checked;
        if (i && page >> RUN_SHIFT < pages[i - 1] >> RUN_SHIFT)
            ascending = 0;
    }
    /* The pages grouped by run, in address order of the runs and in given order within one (a page
     * given twice gets its last row): a counting sort on the run. */
    Py_ssize_t nruns = (npages >> RUN_SHIFT) + 1;
    first = PyMem_Calloc(nruns + 1, sizeof(Py_ssize_t));
    if (first == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        first[(pages[i] >> RUN_SHIFT) + 1]++;
    for (Py_ssize_t r = 0; r < nruns; r++)
        first[r + 1] += first[r];
    if (ascending) {
        for (Py_ssize_t i = 0; i < count; i++)
            at[i] = i;
    } else {
        Py_ssize_t *next = PyMem_Malloc(nruns * sizeof(Py_ssize_t));
        if (next == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(next, first, nruns * sizeof(Py_ssize_t));
        for (Py_ssize_t i = 0; i < count; i++)
            at[next[pages[i] >> RUN_SHIFT]++] = i;
        PyMem_Free(next);
    }
    for (Py_ssize_t r = pages[at[0]] >> RUN_SHIFT; r < nruns; r++) {
        Py_ssize_t a = first[r], k = first[r + 1] - a;
        if (!k)
            continue;
        PyObject *lock = run_lock(locks, r);
        if (lock == NULL || ptl_take(lock) < 0)
            goto done;
        for (Py_ssize_t j = a; j < a + k; j++) {
            Py_ssize_t page = pages[at[j]];
            if (!writable(ptes, page, page + 1, nframes)) {
                resume = r << RUN_SHIFT;  /* changed since the look: this run on is the caller's */
                if (ptl_give(lock) < 0)
                    goto done;
                goto checked;
            }
        }
        if (k >= NOGIL_PAGES) {
            Py_BEGIN_ALLOW_THREADS
            scatter_run(ptes, pool, (const char *)rows_buf.buf, pages, at + a, k);
            Py_END_ALLOW_THREADS
        } else {
            scatter_run(ptes, pool, (const char *)rows_buf.buf, pages, at + a, k);
        }
        if (ptl_give(lock) < 0)
            goto done;
    }
    resume = npages;
checked:
    failed = 0;
done:
    PyMem_Free(first);
    PyMem_Free(at);
    PyMem_Free(pages);
    if (rows_buf.obj != NULL)
        PyBuffer_Release(&rows_buf);
    if (pages_buf.obj != NULL)
        PyBuffer_Release(&pages_buf);
    PyBuffer_Release(&pool_buf);
    PyBuffer_Release(&ptes_buf);
    return failed ? NULL : PyLong_FromSsize_t(resume);
}

static PyObject *
bulk_scatter(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer ptes_buf, pool_buf, src_buf = {0};
    Py_ssize_t resume = -1;  /* the address from which the caller goes on, -1 see below */
    int failed = 1;
    if (bulk_args("scatter(ptes, pool, locks, addr, src)", args, nargs, 5, &ptes_buf, &pool_buf,
                  PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *locks = args[2];
    const uint64_t *ptes = (const uint64_t *)ptes_buf.buf;
    Py_ssize_t npages = ptes_buf.len / 8, nframes = pool_buf.len >> PAGE_SHIFT;
    Py_ssize_t addr = PyLong_AsSsize_t(args[3]);
    if (addr == -1 && PyErr_Occurred())
        goto done;
    /* Bytes of another kind (a strided array), or a range outside the guest: the caller's. */
    if (PyObject_GetBuffer(args[4], &src_buf, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        goto checked;
    }
    Py_ssize_t n = src_buf.len, end = addr + n;
    if (n <= 0 || addr < 0 || addr > (npages << PAGE_SHIFT) - n)
        goto checked;
    Py_ssize_t first = addr >> PAGE_SHIFT, last = (end - 1) >> PAGE_SHIFT;
    resume = addr;
    /* A look at every PTE without the locks: a page to fault in, or unmapped, and it is all the
     * caller's; under each lock the look is made again (ksmd may have write-protected a page). */
    if (!writable(ptes, first, last + 1, nframes))
        goto checked;
    for (Py_ssize_t page = first; page <= last;) {
        Py_ssize_t stop = run_stop(page, last);
        PyObject *lock = run_lock(locks, page >> RUN_SHIFT);
        if (lock == NULL || ptl_take(lock) < 0)
            goto done;
        if (!writable(ptes, page, stop, nframes)) {
            resume = page == first ? addr : page << PAGE_SHIFT;  /* changed since the look */
            if (ptl_give(lock) < 0)
                goto done;
            goto checked;
        }
        copy_run(ptes, (char *)pool_buf.buf, (char *)src_buf.buf, addr, end, page, stop, 1);
        if (ptl_give(lock) < 0)
            goto done;
        page = stop;
    }
    resume = end;
checked:
    failed = 0;
done:
    if (src_buf.obj != NULL)
        PyBuffer_Release(&src_buf);
    PyBuffer_Release(&pool_buf);
    PyBuffer_Release(&ptes_buf);
    return failed ? NULL : PyLong_FromSsize_t(resume);
}

/* Take args[which[k]] as a buffer (flags[k]) into *bufs[k] for each k < n; when one cannot be
 * taken, give back those taken and return -1 (its exception set).  release_buffers gives back n. */
static void
release_buffers(Py_buffer *const *bufs, int n)
{
    while (n-- > 0)
        PyBuffer_Release(bufs[n]);
}

static int
take_buffers(PyObject *const *args, const int *which, const int *flags, Py_buffer *const *bufs, int n)
{
    for (int k = 0; k < n; k++)
        if (PyObject_GetBuffer(args[which[k]], bufs[k], flags[k]) < 0) {
            release_buffers(bufs, k);
            return -1;
        }
    return 0;
}

/* -- page checksums ------------------------------------------------------------------------------ */

/* The scanner's page checksum, xxh3-64 with seed 0: set_xxh3() is given the address of
 * XXH3_64bits(const void *, size_t) in the xxhash module's own library (already loaded), so
 * that checksums() gives exactly what xxhash.xxh3_64_intdigest gives. */
typedef uint64_t (*xxh3_fn)(const void *, size_t);
static xxh3_fn xxh3_64 = NULL;

#define PREFETCH_AHEAD 2

static PyObject *
set_xxh3(PyObject *Py_UNUSED(module), PyObject *arg)
{
    unsigned long long address = PyLong_AsUnsignedLongLong(arg);
    if (address == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (address == 0) {
        PyErr_SetString(PyExc_ValueError, "set_xxh3: a null address");
        return NULL;
    }
    xxh3_64 = (xxh3_fn)(uintptr_t)address;
    Py_RETURN_NONE;
}

/* Touch the frame's cache lines before they are hashed: frames are read in no particular order,
 * and a hardware prefetcher does not cross into the next 4 KiB. */
static inline void
prefetch_frame(const char *frame)
{
    for (size_t line = 0; line < PAGE_BYTES; line += 64)
        __builtin_prefetch(frame + line, 0, 2);
}

static PyObject *
bulk_checksums(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "checksums(pool, pfns, out) takes 3 arguments");
        return NULL;
    }
    if (xxh3_64 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "checksums: set_xxh3() was not called");
        return NULL;
    }
    Py_buffer pool_buf, pfn_buf, out_buf;
    Py_buffer *const bufs[] = {&pool_buf, &pfn_buf, &out_buf};
    if (take_buffers(args, (const int[]){0, 1, 2},
                     (const int[]){PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_WRITABLE}, bufs, 3) < 0)
        return NULL;
    PyObject *result = NULL;
    const char *pool = (const char *)pool_buf.buf;
    const int64_t *pfns = (const int64_t *)pfn_buf.buf;
    uint64_t *out = (uint64_t *)out_buf.buf;
    Py_ssize_t n = pfn_buf.len / 8, nframes = pool_buf.len >> PAGE_SHIFT;
    if (pfn_buf.len % 8 || out_buf.len != pfn_buf.len) {
        PyErr_SetString(PyExc_ValueError, "checksums: pfns (int64) and out (uint64) must be of one length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (pfns[i] < 0 || pfns[i] >= nframes) {
            PyErr_Format(PyExc_ValueError, "checksums: frame %lld is not in the pool", (long long)pfns[i]);
            goto done;
        }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && i < PREFETCH_AHEAD; i++)
        prefetch_frame(pool + ((size_t)pfns[i] << PAGE_SHIFT));
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n)
            prefetch_frame(pool + ((size_t)pfns[i + PREFETCH_AHEAD] << PAGE_SHIFT));
        out[i] = xxh3_64(pool + ((size_t)pfns[i] << PAGE_SHIFT), PAGE_BYTES);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release_buffers(bufs, 3);
    return result;
}

#define OWNERS_AHEAD 16  /* entries ahead that claim() and owners() prefetch */

/* claim(table, buckets, want, tag, out): the owner of each bucket of content claims,
 * claiming the unclaimed ones for ``want``; returns how many it claimed.  An entry is tag << 8 | (owner + 1), 0 never
 * claimed; one whose tag is not ``tag`` is stale and is claimed anew.  Compare and swap:
 * of two processes claiming one bucket at once, one wins and both see its owner. */
static PyObject *
bulk_claim(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "claim(table, buckets, want, tag, out) takes 5 arguments");
        return NULL;
    }
    long want = PyLong_AsLong(args[2]);
    long tag = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (want < 0 || want > 254 || tag < 1 || tag > 255) {
        PyErr_SetString(PyExc_ValueError, "claim: want must be in [0, 254] and tag in [1, 255]");
        return NULL;
    }
    Py_buffer table_buf, bucket_buf, out_buf;
    Py_buffer *const bufs[] = {&table_buf, &bucket_buf, &out_buf};
    if (take_buffers(args, (const int[]){0, 1, 4},
                     (const int[]){PyBUF_WRITABLE, PyBUF_SIMPLE, PyBUF_WRITABLE}, bufs, 3) < 0)
        return NULL;
    PyObject *result = NULL;
    uint16_t *table = (uint16_t *)table_buf.buf;
    const int64_t *buckets = (const int64_t *)bucket_buf.buf;
    int64_t *out = (int64_t *)out_buf.buf;
    Py_ssize_t n = bucket_buf.len / 8, size = table_buf.len / 2;
    if (bucket_buf.len % 8 || out_buf.len != bucket_buf.len) {
        PyErr_SetString(PyExc_ValueError, "claim: buckets and out (int64) must be of one length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (buckets[i] < 0 || buckets[i] >= size) {
            PyErr_Format(PyExc_ValueError, "claim: bucket %lld is not in the table", (long long)buckets[i]);
            goto done;
        }
    uint16_t mine = (uint16_t)(tag << 8 | (want + 1));
    Py_ssize_t claimed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + OWNERS_AHEAD < n)  /* as owners(): the entries lie at random in a large table */
            __builtin_prefetch(&table[buckets[i + OWNERS_AHEAD]], 1, 0);
        uint16_t *entry = &table[buckets[i]];
        uint16_t cur = __atomic_load_n(entry, __ATOMIC_ACQUIRE);
        for (;;) {
            if (cur >> 8 == tag && (cur & 0xff)) {
                out[i] = (cur & 0xff) - 1;
                break;
            }
            if (__atomic_compare_exchange_n(entry, &cur, mine, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                out[i] = want;
                claimed++;
                break;
            }
        }
    }
    result = PyLong_FromSsize_t(claimed);
done:
    release_buffers(bufs, 3);
    return result;
}

/* give(table, buckets, tag, giver, taker): hand each bucket that ``giver`` owns to ``taker``
 * (compare and swap); returns how many changed hands. */
static PyObject *
bulk_give(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "give(table, buckets, tag, giver, taker) takes 5 arguments");
        return NULL;
    }
    long tag = PyLong_AsLong(args[2]), giver = PyLong_AsLong(args[3]), taker = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (tag < 1 || tag > 255 || giver < 0 || giver > 254 || taker < 0 || taker > 254) {
        PyErr_SetString(PyExc_ValueError, "give: tag must be in [1, 255], giver and taker in [0, 254]");
        return NULL;
    }
    Py_buffer table_buf, bucket_buf;
    Py_buffer *const bufs[] = {&table_buf, &bucket_buf};
    if (take_buffers(args, (const int[]){0, 1},
                     (const int[]){PyBUF_WRITABLE, PyBUF_SIMPLE}, bufs, 2) < 0)
        return NULL;
    PyObject *result = NULL;
    uint16_t *table = (uint16_t *)table_buf.buf;
    const int64_t *buckets = (const int64_t *)bucket_buf.buf;
    Py_ssize_t n = bucket_buf.len / 8, size = table_buf.len / 2, given = 0;
    if (bucket_buf.len % 8) {
        PyErr_SetString(PyExc_ValueError, "give: buckets must be int64");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (buckets[i] < 0 || buckets[i] >= size) {
            PyErr_Format(PyExc_ValueError, "give: bucket %lld is not in the table", (long long)buckets[i]);
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t expected = (uint16_t)(tag << 8 | (giver + 1));
        if (__atomic_compare_exchange_n(&table[buckets[i]], &expected, (uint16_t)(tag << 8 | (taker + 1)), 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            given++;
    }
    result = PyLong_FromSsize_t(given);
done:
    release_buffers(bufs, 2);
    return result;
}

/* owners(table, shift, checksums, pages, count, out): out[i] = the scanner of ``count`` that owns
 * page pages[i], by the checksum it had at its last visit (checksums[pages[i]], uint32): the claimant
 * of the checksum's bucket (its top bits after a multiplicative hash: ``shift`` is 64 less the
 * table's bits), -1 where nobody claimed it for ``count``; a page never hashed (checksum 0) goes by
 * its run of 512 pages, spread over the scanners by the same hash.  Reads the table without
 * writing it: what the scanners walk on every page of every guest, in one pass. */
#define OWNER_MULT 0x9E3779B97F4A7C15ULL
#define RUN_SHIFT 9

static PyObject *
bulk_owners(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "owners(table, shift, checksums, pages, count, out) takes 6 arguments");
        return NULL;
    }
    long shift = PyLong_AsLong(args[1]), count = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (shift < 1 || shift > 63 || count < 1 || count > 254) {
        PyErr_SetString(PyExc_ValueError, "owners: shift must be in [1, 63] and count in [1, 254]");
        return NULL;
    }
    Py_buffer table_buf, sums_buf, page_buf, out_buf;
    Py_buffer *const bufs[] = {&table_buf, &sums_buf, &page_buf, &out_buf};
    if (take_buffers(args, (const int[]){0, 2, 3, 5},
                     (const int[]){PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_WRITABLE}, bufs, 4) < 0)
        return NULL;
    PyObject *result = NULL;
    const uint16_t *table = (const uint16_t *)table_buf.buf;
    const uint32_t *sums = (const uint32_t *)sums_buf.buf;
    const int64_t *pages = (const int64_t *)page_buf.buf;
    int64_t *out = (int64_t *)out_buf.buf;
    Py_ssize_t n = page_buf.len / 8, size = table_buf.len / 2, npages = sums_buf.len / 4;
    if (page_buf.len % 8 || out_buf.len != page_buf.len || sums_buf.len % 4) {
        PyErr_SetString(PyExc_ValueError, "owners: checksums uint32, pages and out int64 of one length");
        goto done;
    }
    if ((size >> (64 - shift)) != 1 || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "owners: the table's size is not 2 ** (64 - shift)");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (pages[i] < 0 || pages[i] >= npages) {
            PyErr_Format(PyExc_ValueError, "owners: page %lld is not in the guest", (long long)pages[i]);
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* The entries lie at random in a table larger than the caches: ask for the
         * one of a page further on while this one is read. */
        if (i + OWNERS_AHEAD < n) {
            uint64_t ahead = sums[pages[i + OWNERS_AHEAD]];
            __builtin_prefetch(&table[(ahead * OWNER_MULT) >> shift], 0, 0);
        }
        uint64_t sum = sums[pages[i]];
        if (sum == 0) {
            out[i] = (int64_t)((((uint64_t)pages[i] >> RUN_SHIFT) * OWNER_MULT >> 32) % (uint64_t)count);
            continue;
        }
        uint16_t entry = __atomic_load_n(&table[(sum * OWNER_MULT) >> shift], __ATOMIC_ACQUIRE);
        out[i] = (entry >> 8 == count && (entry & 0xff)) ? (entry & 0xff) - 1 : -1;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(bufs, 4);
    return result;
}

static PyMethodDef module_methods[] = {
    {"set_xxh3", (PyCFunction)set_xxh3, METH_O,
     "set_xxh3(address) -> None\n--\n\n"
     "The address of XXH3_64bits(data, len), the function checksums() calls (xxhash's own)."},
    {"checksums", (PyCFunction)(void (*)(void))bulk_checksums, METH_FASTCALL,
     "checksums(pool, pfns, out) -> None\n--\n\n"
     "out[i] = the xxh3-64 checksum of frame pfns[i] (4096 bytes) of the frame pool, for\n"
     "every i; ``pfns`` int64, ``out`` uint64, both contiguous, of one length.  A frame\n"
     "outside the pool raises ValueError and hashes nothing.  The GIL is released."},
    {"gather", (PyCFunction)(void (*)(void))bulk_gather, METH_FASTCALL,
     "gather(ptes, pool, locks, fault, addr, n, out) -> bytes | None | int\n--\n\n"
     "Copy the ``n`` bytes at guest address ``addr`` out of the frame pool: into a new bytes\n"
     "object (``out`` None, returned) or into the writable buffer ``out`` (None returned).\n"
     "``ptes``: the guest's PTEs (uint64); ``pool``: the frame pool; ``locks``: the\n"
     "page-table lock of each run of 512 PTEs.  Run by run in address order, each under\n"
     "its lock taken once; a run with a page that is not present and young has\n"
     "``fault(start, stop)`` called on it first, lock held.  An unmapped page in the\n"
     "range: nothing is copied and its page number is returned."},
    {"scatter", (PyCFunction)(void (*)(void))bulk_scatter, METH_FASTCALL,
     "scatter(ptes, pool, locks, addr, src) -> int\n--\n\n"
     "Copy the bytes of ``src`` (a contiguous buffer) to guest address ``addr``, run by\n"
     "run in address order, each run's lock taken once.  Only pages that are writable,\n"
     "dirty and young are written: returns the address from which the caller is to\n"
     "go on, ``addr + len(src)`` when every byte landed.  Nothing written: -1 when\n"
     "``src`` is of a kind left to the caller (not contiguous) or the range is not in\n"
     "the guest, ``addr`` when a page needs a fault.  A run whose PTEs changed since\n"
     "the look taken first is left to the caller with every run after it."},
    {"scatter_pages", (PyCFunction)(void (*)(void))bulk_scatter_pages, METH_FASTCALL,
     "scatter_pages(ptes, pool, locks, pages, rows) -> int\n--\n\n"
     "Copy row ``i`` of ``rows`` (4096 bytes each) into the frame of page ``pages[i]``\n"
     "(``pages``: a 1-D buffer of integers, or a list or tuple of ints),\n"
     "run by run in address order, each run's lock taken once; a page given twice\n"
     "gets its last row.  Only pages that are writable, dirty and young are written:\n"
     "returns the page from which the caller is to go on, the guest's page count when\n"
     "every row landed.  Nothing written: -1 when the arguments are of a kind (or\n"
     "wrong in a way) left to the caller, 0 when a page needs a fault, or is\n"
     "outside the guest.  A run whose PTEs changed since the look taken first is\n"
     "left to the caller with every run after it."},
    {"claim", (PyCFunction)(void (*)(void))bulk_claim, METH_FASTCALL,
     "claim(table, buckets, want, tag, out) -> int\n--\n\n"
     "out[i] = the owner of bucket buckets[i] of ``table`` (uint16 entries tag << 8 |\n"
     "(owner + 1)), claiming it for ``want`` by compare-and-swap where its entry is 0 or\n"
     "of another tag; the number of entries it claimed.  ``buckets`` and ``out`` int64, of\n"
     "one length."},
    {"owners", (PyCFunction)(void (*)(void))bulk_owners, METH_FASTCALL,
     "owners(table, shift, checksums, pages, count, out) -> None\n--\n\n"
     "out[i] = the owner among ``count`` scanners of page pages[i], by its checksum\n"
     "checksums[pages[i]] (uint32): the claimant of its bucket of ``table`` (the top\n"
     "64 - ``shift`` bits of checksum * 0x9E3779B97F4A7C15), -1 if none; checksum 0: by\n"
     "the page's run of 512 pages, (run * 0x9E3779B97F4A7C15 >> 32) % count.  ``pages``\n"
     "and ``out`` int64, of one length."},
    {"give", (PyCFunction)(void (*)(void))bulk_give, METH_FASTCALL,
     "give(table, buckets, tag, giver, taker) -> int\n--\n\n"
     "Hand each bucket of ``buckets`` (int64) that ``giver`` owns under ``tag`` to ``taker``,\n"
     "by compare-and-swap; the number that changed hands."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef robust_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmksm._mm._robust",
    .m_doc = "The uncontended acquire and release of shmksm's robust mutexes, and the bulk page copies "
             "under them, in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__robust(void)
{
    if (PyType_Ready(&MutexType) < 0)
        return NULL;
    str_contended = PyUnicode_InternFromString("_contended");
    str_release_failed = PyUnicode_InternFromString("_release_failed");
    str_acquire = PyUnicode_InternFromString("acquire");
    str_release = PyUnicode_InternFromString("release");
    if (str_contended == NULL || str_release_failed == NULL || str_acquire == NULL || str_release == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&robust_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&MutexType);
    if (PyModule_AddObject(m, "Mutex", (PyObject *)&MutexType) < 0) {
        Py_DECREF(&MutexType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
