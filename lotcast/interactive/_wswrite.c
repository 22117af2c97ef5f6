/* Native room-socket writer: the same pre-framed WebSocket frame to many TCP sockets, one call.
 *
 * send_many(frame, fds) sends `frame` to every fd with send(MSG_DONTWAIT | MSG_NOSIGNAL), the GIL
 * released for the whole loop, and returns only the sockets that did not take all of it, as
 * (index into fds, result) pairs in fds order: result >= 0 is how many bytes the kernel took
 * (0: EAGAIN), result < 0 is -errno of a hard error. The caller (lotcast/interactive/wswrite.py)
 * hands each one's remainder to its transport, which buffers it in order (or reports the error
 * as the connection's loss). The caller only passes sockets whose transport holds no buffered
 * bytes, so a direct write can never overtake bytes queued earlier.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

typedef struct {
    Py_ssize_t index;
    Py_ssize_t result;
} short_t;

static PyObject *send_many(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer frame;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "y*O:send_many", &frame, &seq)) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "fds must be a sequence of ints");
    if (fast == NULL) {
        PyBuffer_Release(&frame);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int *fds = PyMem_Malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    short_t *shorts = PyMem_Malloc(sizeof(short_t) * (size_t)(n > 0 ? n : 1));
    PyObject *out = NULL;
    if (fds == NULL || shorts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (fd == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (fd < 0 || fd > 0x7fffffffL) {
            PyErr_Format(PyExc_ValueError, "fd %ld out of range", fd);
            goto done;
        }
        fds[i] = (int)fd;
    }
    const char *data = frame.buf;
    Py_ssize_t len = frame.len;
    Py_ssize_t nshort = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t sent = 0;
        while (sent < len) {
            ssize_t r = send(fds[i], data + sent, (size_t)(len - sent), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (r > 0) {
                sent += r;
                continue;
            }
            if (r < 0 && errno == EINTR) {
                continue;
            }
            if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                sent = -(Py_ssize_t)errno;
            }
            break;
        }
        if (sent != len) {
            shorts[nshort].index = i;
            shorts[nshort].result = sent;
            nshort++;
        }
    }
    Py_END_ALLOW_THREADS
    out = PyList_New(nshort);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < nshort; k++) {
        PyObject *pair = Py_BuildValue("(nn)", shorts[k].index, shorts[k].result);
        if (pair == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, k, pair);
    }
done:
    PyMem_Free(fds);
    PyMem_Free(shorts);
    Py_DECREF(fast);
    PyBuffer_Release(&frame);
    return out;
}

/* send_ready(frame, fds): like send_many, but an fd < 0 means "not now" (that socket's frame goes
 * through its queue): it is skipped, and its index listed. Returns (shorts, skipped), both in fds
 * order. The hub passes every socket's eligibility answer as is, so nothing per socket is left
 * for Python but the answer itself. */
static PyObject *send_ready(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer frame;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "y*O:send_ready", &frame, &seq)) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "fds must be a sequence of ints");
    if (fast == NULL) {
        PyBuffer_Release(&frame);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int *fds = PyMem_Malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    short_t *shorts = PyMem_Malloc(sizeof(short_t) * (size_t)(n > 0 ? n : 1));
    PyObject *out = NULL, *short_list = NULL, *skip_list = NULL;
    Py_ssize_t nskip = 0;
    if (fds == NULL || shorts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (fd == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (fd > 0x7fffffffL) {
            PyErr_Format(PyExc_ValueError, "fd %ld out of range", fd);
            goto done;
        }
        if (fd < 0) {
            nskip++;
        }
        fds[i] = fd < 0 ? -1 : (int)fd;
    }
    const char *data = frame.buf;
    Py_ssize_t len = frame.len;
    Py_ssize_t nshort = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (fds[i] < 0) {
            continue;
        }
        Py_ssize_t sent = 0;
        while (sent < len) {
            ssize_t r = send(fds[i], data + sent, (size_t)(len - sent), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (r > 0) {
                sent += r;
                continue;
            }
            if (r < 0 && errno == EINTR) {
                continue;
            }
            if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                sent = -(Py_ssize_t)errno;
            }
            break;
        }
        if (sent != len) {
            shorts[nshort].index = i;
            shorts[nshort].result = sent;
            nshort++;
        }
    }
    Py_END_ALLOW_THREADS
    short_list = PyList_New(nshort);
    skip_list = PyList_New(nskip);
    if (short_list == NULL || skip_list == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < nshort; k++) {
        PyObject *pair = Py_BuildValue("(nn)", shorts[k].index, shorts[k].result);
        if (pair == NULL) {
            goto done;
        }
        PyList_SET_ITEM(short_list, k, pair);
    }
    for (Py_ssize_t i = 0, k = 0; i < n && k < nskip; i++) {
        if (fds[i] < 0) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) {
                goto done;
            }
            PyList_SET_ITEM(skip_list, k++, index);
        }
    }
    out = PyTuple_Pack(2, short_list, skip_list);
done:
    Py_XDECREF(short_list);
    Py_XDECREF(skip_list);
    PyMem_Free(fds);
    PyMem_Free(shorts);
    Py_DECREF(fast);
    PyBuffer_Release(&frame);
    return out;
}

static PyMethodDef methods[] = {
    {"send_many", send_many, METH_VARARGS,
     "send_many(frame, fds) -> [(index, sent or -errno)] for the sockets that did not take it all"},
    {"send_ready", send_ready, METH_VARARGS,
     "send_ready(frame, fds) -> (shorts, skipped): as send_many, fds < 0 skipped and listed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_wswrite",
    .m_doc = "Native room-socket writer (see lotcast/interactive/wswrite.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__wswrite(void) { return PyModule_Create(&module); }
