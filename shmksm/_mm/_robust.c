/* The fast path of shmksm's robust, process-shared mutexes (see locks.py).
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
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

static struct PyModuleDef robust_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmksm._mm._robust",
    .m_doc = "The uncontended acquire and release of shmksm's robust mutexes, in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__robust(void)
{
    if (PyType_Ready(&MutexType) < 0)
        return NULL;
    str_contended = PyUnicode_InternFromString("_contended");
    str_release_failed = PyUnicode_InternFromString("_release_failed");
    if (str_contended == NULL || str_release_failed == NULL)
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
