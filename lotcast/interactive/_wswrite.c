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
#include <time.h>
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

/* send_slots(frame, slots, fds, ready, transports): the hub's ready set (wswrite.ReadySet).
 *
 * `slots` lists the sockets of one slice as slot numbers; per slot, fds[slot] is its fd (-1: the
 * slot is free), ready[slot] is 1 while the socket's own side (its outbox) is idle, kept up to
 * date by the socket's notifications, and transports[slot] its asyncio transport. A slot takes
 * the raw write only if it is ready and its transport, asked here (get_write_buffer_size() == 0
 * and not is_closing(): the standard asyncio WriteTransport API, answered in C by uvloop), holds
 * nothing and is open: what uvicorn wrote on its own (pings, pongs, closes) is in that buffer,
 * and a lost connection is closing before its fd is reused. Returns (shorts, pushes, gone):
 * shorts as send_many's (index into slots, result); pushes: indices whose frame must go through
 * the socket's queue; gone: indices of free slots (left the hub after the batch was queued);
 * and the thread CPU seconds of the checks (the per-socket part, counted in the hub's stats). */
static PyObject *name_size, *name_closing;

static int transport_idle(PyObject *transport) {
    PyObject *size = PyObject_CallMethodNoArgs(transport, name_size);
    if (size == NULL) {
        return -1;
    }
    int busy = PyObject_IsTrue(size);
    Py_DECREF(size);
    if (busy != 0) {
        return busy < 0 ? -1 : 0;
    }
    PyObject *closing = PyObject_CallMethodNoArgs(transport, name_closing);
    if (closing == NULL) {
        return -1;
    }
    int shut = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    return shut < 0 ? -1 : !shut;
}

static PyObject *send_slots(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer frame, slots, fds, ready;
    PyObject *transports;
    if (!PyArg_ParseTuple(args, "y*y*y*y*O!:send_slots", &frame, &slots, &fds, &ready,
                          &PyList_Type, &transports)) {
        return NULL;
    }
    PyObject *out = NULL, *short_list = NULL, *push_list = NULL, *gone_list = NULL;
    int *go = NULL;
    short_t *shorts = NULL;
    Py_ssize_t n = slots.len / (Py_ssize_t)sizeof(int);
    Py_ssize_t nslots = fds.len / (Py_ssize_t)sizeof(int);
    const int *slot = slots.buf, *fd = fds.buf;
    const unsigned char *ok = ready.buf;
    if (slots.itemsize != sizeof(int) || fds.itemsize != sizeof(int) || ready.len < nslots
            || PyList_GET_SIZE(transports) < nslots) {
        PyErr_SetString(PyExc_ValueError, "slots/fds must be int arrays; ready, transports "
                        "must cover every slot");
        goto done;
    }
    struct timespec began, checked;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &began);
    go = PyMem_Malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    shorts = PyMem_Malloc(sizeof(short_t) * (size_t)(n > 0 ? n : 1));
    push_list = PyList_New(0);
    gone_list = PyList_New(0);
    if (go == NULL || shorts == NULL || push_list == NULL || gone_list == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int s = slot[i];
        go[i] = -1;
        if (s < 0 || s >= nslots) {
            PyErr_Format(PyExc_ValueError, "slot %d out of range", s);
            goto done;
        }
        PyObject *list = NULL;
        if (fd[s] < 0) {
            list = gone_list;
        } else if (!ok[s]) {
            list = push_list;
        } else {
            int idle = transport_idle(PyList_GET_ITEM(transports, s));
            if (idle < 0) {
                goto done;
            }
            if (idle) {
                go[i] = fd[s];
            } else {
                list = push_list;
            }
        }
        if (list != NULL) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(list, index) < 0) {
                Py_XDECREF(index);
                goto done;
            }
            Py_DECREF(index);
        }
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &checked);
    double check_s = (double)(checked.tv_sec - began.tv_sec)
                     + (double)(checked.tv_nsec - began.tv_nsec) / 1e9;
    const char *data = frame.buf;
    Py_ssize_t len = frame.len;
    Py_ssize_t nshort = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (go[i] < 0) {
            continue;
        }
        Py_ssize_t sent = 0;
        while (sent < len) {
            ssize_t r = send(go[i], data + sent, (size_t)(len - sent), MSG_DONTWAIT | MSG_NOSIGNAL);
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
    if (short_list == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < nshort; k++) {
        PyObject *pair = Py_BuildValue("(nn)", shorts[k].index, shorts[k].result);
        if (pair == NULL) {
            goto done;
        }
        PyList_SET_ITEM(short_list, k, pair);
    }
    out = Py_BuildValue("(OOOd)", short_list, push_list, gone_list, check_s);
done:
    Py_XDECREF(short_list);
    Py_XDECREF(push_list);
    Py_XDECREF(gone_list);
    PyMem_Free(go);
    PyMem_Free(shorts);
    PyBuffer_Release(&frame);
    PyBuffer_Release(&slots);
    PyBuffer_Release(&fds);
    PyBuffer_Release(&ready);
    return out;
}

static PyMethodDef methods[] = {
    {"send_slots", send_slots, METH_VARARGS,
     "send_slots(frame, slots, fds, ready, transports) -> (shorts, pushes, gone, check_s)"},
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

PyMODINIT_FUNC PyInit__wswrite(void) {
    name_size = PyUnicode_InternFromString("get_write_buffer_size");
    name_closing = PyUnicode_InternFromString("is_closing");
    if (name_size == NULL || name_closing == NULL) {
        return NULL;
    }
    return PyModule_Create(&module);
}
