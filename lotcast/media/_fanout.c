/* Native fan-out: one call per source packet protects it for every sink and sends it.
 *
 * Each sink's copy may carry its own sequence-number and timestamp shift (a viewer that moved
 * between simulcast layers numbers on from what it was sent before), added to the copy before
 * protect, so sinks with different shifts still share one set and one call.
 *
 * Sinks that share a UDP socket (consecutive in the set) go out in one sendmmsg per up to
 * BATCH of them; a sink on a socket of its own (aiortc binds one per peer connection) is one
 * sendto. Either way each sink's result (sent, EAGAIN, error) is reported on its own.
 *
 * libsrtp is not linked here: the caller passes the address of srtp_protect from the libsrtp
 * that pylibsrtp ships (through its cffi binding) and each sink's srtp_t, as integers, so this
 * module needs only libc and the Python headers. The Python side (lotcast/media/native.py and
 * aiortc_hooks.py) keeps every object those pointers belong to alive as long as a SinkSet is.
 *
 * ABI (libsrtp 2.x, as pylibsrtp 1.0.0 declares it):
 *     srtp_err_status_t srtp_protect(srtp_t ctx, void *rtp_hdr, int *len_ptr);
 * srtp_err_status_t is a C enum (int); 0 is success. The buffer must have room for the
 * SRTP trailer after the packet.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

typedef int (*srtp_protect_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

/* failure kinds reported per sink (mirrored in native.py) */
#define FAIL_OS 0   /* sendto failed: code is errno */
#define FAIL_SRTP 1 /* srtp_protect refused: code is its srtp_err_status_t */
#define FAIL_SIZE 2 /* packet longer than this sink's SRTP buffer allows: code is the limit */

#define MAX_TRAILER 144 /* SRTP_MAX_TRAILER_LEN in libsrtp 2.x (checked by native.py) */
#define BATCH 64        /* messages per sendmmsg */

typedef struct {
    void *srtp;
    int fd;
    int shifted;        /* seq_delta or ts_delta nonzero */
    uint16_t seq_delta; /* added to the copy's sequence number (mod 2^16) */
    uint32_t ts_delta;  /* added to its timestamp (mod 2^32) */
    dev_t dev; /* identity of the socket when the set was built: a closed fd whose number */
    ino_t ino; /* was reused by another socket must not be written to */
    Py_ssize_t limit;
    socklen_t addrlen;
    struct sockaddr_storage addr;
} sink_t;

typedef struct {
    int fd;
    int count;
    int index[BATCH];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
} batch_t;

typedef struct {
    PyObject_HEAD
    srtp_protect_fn protect;
    Py_ssize_t count;
    sink_t *sinks;
    unsigned char *arena; /* BATCH protected copies, grown to the packet size on demand */
    Py_ssize_t arena_size;
    int payload_type; /* rewritten into byte 1 (marker kept); -1: unchanged */
    PyObject *keep;   /* objects the pointers belong to (sessions, sockets) */
    unsigned long long sendto_calls, sendmmsg_calls;
    batch_t *batch; /* the sendmmsg vectors, reused by every call */
} SinkSet;

typedef struct {
    int index;
    int kind;
    long code;
} failure_t;

static int
build_addr(PyObject *host, int port, unsigned int scope_id, sink_t *sink)
{
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL)
        return -1;
    memset(&sink->addr, 0, sizeof(sink->addr));
    if (text[0] == '/') { /* AF_UNIX datagram path (tests exercise a full queue with it) */
        struct sockaddr_un *un = (struct sockaddr_un *)&sink->addr;
        size_t len = strlen(text);
        if (len >= sizeof(un->sun_path)) {
            PyErr_SetString(PyExc_ValueError, "unix socket path too long");
            return -1;
        }
        un->sun_family = AF_UNIX;
        memcpy(un->sun_path, text, len + 1);
        sink->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
        return 0;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return -1;
    }
    if (strchr(text, ':') != NULL) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&sink->addr;
        char bare[INET6_ADDRSTRLEN + 1];
        const char *percent = strchr(text, '%');
        size_t len = percent != NULL ? (size_t)(percent - text) : strlen(text);
        if (len >= sizeof(bare)) {
            PyErr_Format(PyExc_ValueError, "not an IPv6 address: %s", text);
            return -1;
        }
        memcpy(bare, text, len);
        bare[len] = '\0';
        if (inet_pton(AF_INET6, bare, &in6->sin6_addr) != 1) {
            PyErr_Format(PyExc_ValueError, "not an IPv6 address: %s", text);
            return -1;
        }
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        in6->sin6_scope_id = scope_id;
        sink->addrlen = sizeof(*in6);
        return 0;
    }
    struct sockaddr_in *in4 = (struct sockaddr_in *)&sink->addr;
    if (inet_pton(AF_INET, text, &in4->sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", text);
        return -1;
    }
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
    sink->addrlen = sizeof(*in4);
    return 0;
}

static void
SinkSet_dealloc(SinkSet *self)
{
    PyMem_Free(self->sinks);
    PyMem_Free(self->arena);
    PyMem_Free(self->batch);
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* SinkSet(protect, sinks, payload_type=-1, keep=None)
 * protect: address of srtp_protect; sinks: sequence of
 * (srtp_t address, fd, host, port, scope_id, limit[, seq_delta, ts_delta]) with limit the
 * largest RTP packet the sink's SRTP buffer takes (as the Python path computes it) and the
 * deltas added to each copy's sequence number and timestamp (default 0: sent as given). */
static int
SinkSet_init(SinkSet *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"protect", "sinks", "payload_type", "keep", NULL};
    unsigned long long protect;
    PyObject *sinks, *keep = Py_None;
    int payload_type = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KO|iO", kwlist, &protect, &sinks,
                                     &payload_type, &keep))
        return -1;
    if (protect == 0) {
        PyErr_SetString(PyExc_ValueError, "srtp_protect address is NULL");
        return -1;
    }
    if (payload_type < -1 || payload_type > 127) {
        PyErr_SetString(PyExc_ValueError, "payload_type must be -1 or 0..127");
        return -1;
    }
    PyObject *seq = PySequence_Fast(sinks, "sinks must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    sink_t *table = PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof(sink_t));
    if (table == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long srtp;
        int fd, port;
        unsigned int scope_id;
        Py_ssize_t limit;
        PyObject *host;
        unsigned long long seq_delta = 0, ts_delta = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KiUiIn|KK;sink", &srtp, &fd,
                              &host, &port, &scope_id, &limit, &seq_delta, &ts_delta))
            goto fail;
        if (seq_delta > 0xFFFF || ts_delta > 0xFFFFFFFFULL) {
            PyErr_SetString(PyExc_ValueError, "seq_delta must be 0..65535, ts_delta 0..2**32-1");
            goto fail;
        }
        if (srtp == 0 || limit < 12) {
            PyErr_SetString(PyExc_ValueError, "sink with a NULL srtp_t or no buffer");
            goto fail;
        }
        sink_t *sink = &table[i];
        sink->srtp = (void *)(uintptr_t)srtp;
        sink->fd = fd;
        sink->seq_delta = (uint16_t)seq_delta;
        sink->ts_delta = (uint32_t)ts_delta;
        sink->shifted = seq_delta != 0 || ts_delta != 0;
        sink->limit = limit;
        struct stat st;
        if (fstat(fd, &st) == 0) {
            sink->dev = st.st_dev;
            sink->ino = st.st_ino;
        } else { /* already closed: every send reports EBADF */
            sink->fd = -1;
        }
        if (build_addr(host, port, scope_id, sink) < 0)
            goto fail;
    }
    Py_DECREF(seq);
    if (self->batch == NULL && (self->batch = PyMem_Malloc(sizeof(batch_t))) == NULL) {
        PyMem_Free(table);
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(self->sinks);
    PyMem_Free(self->arena);
    self->arena = NULL;
    self->arena_size = 0;
    self->sinks = table;
    self->count = count;
    self->protect = (srtp_protect_fn)(uintptr_t)protect;
    self->payload_type = payload_type;
    Py_INCREF(keep);
    Py_XSETREF(self->keep, keep);
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free(table);
    return -1;
}

static int
same_socket(const sink_t *sink)
{
    struct stat st;
    if (sink->fd < 0 || fstat(sink->fd, &st) != 0)
        return 0;
    return st.st_ino == sink->ino && st.st_dev == sink->dev;
}


typedef struct {
    failure_t *failures;
    Py_ssize_t failed;
    Py_ssize_t drops;
} outcome_t;

static void
send_failed(outcome_t *out, int index, int err)
{
    if (err == EAGAIN || err == EWOULDBLOCK)
        out->drops++;
    else
        out->failures[out->failed++] = (failure_t){index, FAIL_OS, (long)err};
}

static void
flush(SinkSet *self, batch_t *batch, outcome_t *out)
{
    int n = batch->count;
    batch->count = 0;
    if (n == 1) {
        self->sendto_calls++;
        struct msghdr *hdr = &batch->msgs[0].msg_hdr;
        ssize_t sent;
        do {
            sent = sendto(batch->fd, batch->iov[0].iov_base, batch->iov[0].iov_len, MSG_DONTWAIT,
                          (struct sockaddr *)hdr->msg_name, hdr->msg_namelen);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0)
            send_failed(out, batch->index[0], errno);
        return;
    }
    int done = 0;
    while (done < n) {
        self->sendmmsg_calls++;
        int sent = sendmmsg(batch->fd, &batch->msgs[done], (unsigned int)(n - done), MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            /* the first unsent message failed: report it, go on with the next */
            send_failed(out, batch->index[done], errno);
            done++;
        } else {
            done += sent;
        }
    }
}

/* send(packet) -> None when every sink sent it, else (drops, ((index, kind, code), ...)):
 * drops are sinks whose socket buffer was full (EAGAIN), a loss as on the wire. */
static PyObject *
SinkSet_send(SinkSet *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len < 12) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "not an RTP packet");
        return NULL;
    }
    Py_ssize_t count = self->count;
    Py_ssize_t size = view.len;
    /* one slot per batched copy, each with room for the SRTP trailer */
    Py_ssize_t stride = (size + MAX_TRAILER + 15) & ~(Py_ssize_t)15;
    Py_ssize_t slots = count < BATCH ? (count > 0 ? count : 1) : BATCH;
    if (self->arena_size < stride * slots) {
        unsigned char *arena = PyMem_Realloc(self->arena, (size_t)(stride * slots));
        if (arena == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        self->arena = arena;
        self->arena_size = stride * slots;
    }
    failure_t small[16];
    outcome_t out = {small, 0, 0};
    if (count > 16) {
        /* worst case every sink fails; allocated only for large sets */
        out.failures = PyMem_Malloc((size_t)count * sizeof(failure_t));
        if (out.failures == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
    }
    batch_t *batch = self->batch;
    if (batch == NULL) {
        if (out.failures != small)
            PyMem_Free(out.failures);
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "SinkSet not initialised");
        return NULL;
    }
    batch->count = 0;
    batch->fd = -1;
    const unsigned char *data = view.buf;
    srtp_protect_fn protect = self->protect;
    int pt = self->payload_type;
    const sink_t *checked = NULL; /* the sink whose socket identity the batch was checked on */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        const sink_t *sink = &self->sinks[i];
        if (size > sink->limit) {
            out.failures[out.failed++] = (failure_t){(int)i, FAIL_SIZE, (long)sink->limit};
            continue;
        }
        if (batch->count > 0 && (sink->fd != batch->fd || batch->count == BATCH))
            flush(self, batch, &out);
        unsigned char *buf = self->arena + stride * batch->count;
        memcpy(buf, data, (size_t)size);
        if (pt >= 0)
            buf[1] = (unsigned char)((buf[1] & 0x80) | pt);
        if (sink->shifted) {
            uint16_t seq = (uint16_t)(((buf[2] << 8) | buf[3]) + sink->seq_delta);
            uint32_t ts = (((uint32_t)buf[4] << 24) | ((uint32_t)buf[5] << 16) |
                           ((uint32_t)buf[6] << 8) | buf[7]) + sink->ts_delta;
            buf[2] = (unsigned char)(seq >> 8);
            buf[3] = (unsigned char)seq;
            buf[4] = (unsigned char)(ts >> 24);
            buf[5] = (unsigned char)(ts >> 16);
            buf[6] = (unsigned char)(ts >> 8);
            buf[7] = (unsigned char)ts;
        }
        int len = (int)size;
        int status = protect(sink->srtp, buf, &len);
        if (status != 0) {
            out.failures[out.failed++] = (failure_t){(int)i, FAIL_SRTP, (long)status};
            continue;
        }
        /* one fstat per batch: sinks on one fd were recorded with one socket identity */
        int same;
        if (batch->count > 0)
            same = sink->ino == checked->ino && sink->dev == checked->dev;
        else if ((same = same_socket(sink)))
            checked = sink;
        if (!same) {
            out.failures[out.failed++] = (failure_t){(int)i, FAIL_OS, (long)EBADF};
            continue;
        }
        int k = batch->count++;
        batch->fd = sink->fd;
        batch->index[k] = (int)i;
        batch->iov[k] = (struct iovec){buf, (size_t)len};
        batch->msgs[k] = (struct mmsghdr){
            .msg_hdr = {.msg_name = (void *)&sink->addr, .msg_namelen = sink->addrlen,
                        .msg_iov = &batch->iov[k], .msg_iovlen = 1}};
    }
    if (batch->count > 0)
        flush(self, batch, &out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyObject *result = NULL;
    if (out.failed == 0 && out.drops == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *list = PyTuple_New(out.failed);
    if (list == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < out.failed; j++) {
        PyObject *item = Py_BuildValue("(iil)", out.failures[j].index, out.failures[j].kind,
                                       out.failures[j].code);
        if (item == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyTuple_SET_ITEM(list, j, item);
    }
    result = Py_BuildValue("(nN)", out.drops, list);
done:
    if (out.failures != small)
        PyMem_Free(out.failures);
    return result;
}

static PyObject *
SinkSet_syscalls(SinkSet *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KK)", self->sendto_calls, self->sendmmsg_calls);
}

static PyObject *
SinkSet_len(SinkSet *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->count);
}

static Py_ssize_t
SinkSet_length(PyObject *self)
{
    return ((SinkSet *)self)->count;
}

static PyMethodDef SinkSet_methods[] = {
    {"send", (PyCFunction)SinkSet_send, METH_O,
     "send(packet) -> None | (drops, ((index, kind, code), ...))"},
    {"size", (PyCFunction)SinkSet_len, METH_NOARGS, "number of sinks"},
    {"syscalls", (PyCFunction)SinkSet_syscalls, METH_NOARGS,
     "(sendto calls, sendmmsg calls) made so far"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods SinkSet_as_sequence = {
    .sq_length = SinkSet_length,
};

static PyTypeObject SinkSetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lotcast.media._fanout.SinkSet",
    .tp_doc = "Prepared sinks of one payload-type group: protect + send per sink in one call.",
    .tp_basicsize = sizeof(SinkSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SinkSet_init,
    .tp_dealloc = (destructor)SinkSet_dealloc,
    .tp_methods = SinkSet_methods,
    .tp_as_sequence = &SinkSet_as_sequence,
};

/* protect_send_loop(protect, srtp, fd, host, port, packets, rounds, first_seq=0) -> sent
 * The benchmark's floor: memcpy + srtp_protect + sendto per packet in a plain C loop, with no
 * per-sink bookkeeping. Sequence numbers are rewritten first_seq, first_seq + 1, ... (libsrtp
 * refuses to protect one index twice). */
static PyObject *
protect_send_loop(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long protect, srtp;
    int fd, port, rounds;
    unsigned int next_seq = 0;
    PyObject *host, *packets;
    if (!PyArg_ParseTuple(args, "KKiUiOi|I", &protect, &srtp, &fd, &host, &port, &packets,
                          &rounds, &next_seq))
        return NULL;
    sink_t sink = {.srtp = (void *)(uintptr_t)srtp, .fd = fd};
    if (build_addr(host, port, 0, &sink) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(packets, "packets must be a sequence");
    if (seq == NULL)
        return NULL;
    unsigned char buffer[65536];
    long sent = 0;
    srtp_protect_fn fn = (srtp_protect_fn)(uintptr_t)protect;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (int r = 0; r < rounds; r++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) > 65536 - MAX_TRAILER) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_ValueError, "packets must be bytes under 64 KiB");
                return NULL;
            }
            int len = (int)PyBytes_GET_SIZE(item);
            memcpy(buffer, PyBytes_AS_STRING(item), (size_t)len);
            if (len >= 4) { /* a fresh sequence number each time: libsrtp refuses replays */
                buffer[2] = (unsigned char)(next_seq >> 8);
                buffer[3] = (unsigned char)next_seq;
                next_seq++;
            }
            if (fn(sink.srtp, buffer, &len) != 0)
                continue;
            if (sendto(fd, buffer, (size_t)len, MSG_DONTWAIT, (struct sockaddr *)&sink.addr,
                       sink.addrlen) >= 0)
                sent++;
        }
    }
    Py_DECREF(seq);
    return PyLong_FromLong(sent);
}

static PyMethodDef module_methods[] = {
    {"protect_send_loop", protect_send_loop, METH_VARARGS,
     "benchmark floor: protect + sendto of each packet, rounds times"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fanout_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "lotcast.media._fanout",
    .m_doc = "Native SRTP protect + sendto fan-out (see lotcast/media/native.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fanout(void)
{
    if (PyType_Ready(&SinkSetType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fanout_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "SinkSet", (PyObject *)&SinkSetType) < 0 ||
        PyModule_AddIntConstant(module, "FAIL_OS", FAIL_OS) < 0 ||
        PyModule_AddIntConstant(module, "FAIL_SRTP", FAIL_SRTP) < 0 ||
        PyModule_AddIntConstant(module, "FAIL_SIZE", FAIL_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "MAX_TRAILER", MAX_TRAILER) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
