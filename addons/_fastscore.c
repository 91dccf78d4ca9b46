/* addons._fastscore: the n-gram part of addons.fieldmodel.FieldModel.window_logits, in one call.
 *
 * Optional: `pip install -e .` builds it where a C compiler is present; without it, fieldmodel uses its numpy
 * path (fieldmodel.ngram_keys and np.bincount), which stays the reference: tests/test_fastscore.py compares
 * the two on random texts, classes and models.
 *
 * window_sums(texts, classes, weights, bits, class_scale, salts, class_salts) -> list[float]: for each window
 * (one UTF-8 text, one class), the sum over its byte n-grams (lengths 1 to len(salts) - 1, none across two
 * windows) of
 *
 *     weights[shared column] * v  +  weights[class column] * (v * class_scale),   v = 1/sqrt(n-grams of the window)
 *
 * with the hash of fieldmodel.ngram_keys: h = h * P + byte over the n-gram's bytes, hk = h + salts[k],
 * shared column (hk * MIX) >> (64 - bits), class column ((hk + class_salts[c]) * MIX >> (64 - bits)) + 2**bits.
 * Products in float32, sums in double, added in the order np.bincount adds them (per window: for each length,
 * the shared block's n-grams, then the class block's), so the result is numpy's to the last bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define P_HASH 0x100000001B3ULL
#define MIX 0x9E3779B97F4A7C15ULL
#define MAX_K 16

typedef struct {
    const unsigned char *data;
    Py_ssize_t len;
    uint64_t class_salt;
} window_t;

/* The float32 weights buffer of 2 * 2**bits columns, or an exception. */
static int get_weights(PyObject *obj, Py_buffer *view, int bits) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || (*f == '<' && PY_LITTLE_ENDIAN) || (*f == '>' && PY_BIG_ENDIAN))
        f++;
    if (strcmp(f, "f") != 0 || view->itemsize != 4 || view->len != ((Py_ssize_t)2 << bits) * 4) {
        PyErr_Format(PyExc_ValueError, "weights must be a contiguous float32 buffer of 2 * 2**%d values", bits);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The items of a sequence of ints (numpy integers too) as uint64, min_n to max_n of them, or an exception. */
static int get_u64s(PyObject *seq, uint64_t *out, Py_ssize_t min_n, Py_ssize_t max_n, const char *what,
                    Py_ssize_t *n_out) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < min_n || n > max_n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd values, want %zd to %zd", what, n, min_n, max_n);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *idx = PyNumber_Index(PySequence_Fast_GET_ITEM(fast, i));
        if (idx == NULL) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
        if (PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    *n_out = n;
    return 0;
}

/* The n-gram sum of one window; h and col are scratch space of at least len and 2 * len entries. */
static double window_sum(const window_t *w, const float *weights, int bits, float class_scale, const uint64_t *salts,
                         int kmax, uint64_t *h, uint32_t *col) {
    const Py_ssize_t len = w->len;
    const unsigned char *b = w->data;
    const unsigned shift = 64 - (unsigned)bits;
    const uint32_t class_base = (uint32_t)1 << bits;
    Py_ssize_t count = 0;
    for (int k = 1; k <= kmax && k <= len; k++)
        count += len - k + 1;
    if (count == 0)
        return 0.0;
    const float v = (float)(1.0 / sqrt((double)count)); /* numpy: float64 1/sqrt(n), then float32 */
    const float vc = v * class_scale;                  /* numpy: val[class block] *= CLASS_SCALE, in float32 */

    /* Pass 1: every column, in numpy's order, each weight's cache line fetched ahead of the sums. */
    uint32_t *c = col;
    for (Py_ssize_t i = 0; i < len; i++)
        h[i] = 0;
    for (int k = 1; k <= kmax && k <= len; k++) {
        const Py_ssize_t m = len - k + 1;
        for (Py_ssize_t i = 0; i < m; i++) {
            h[i] = h[i] * P_HASH + b[i + k - 1];
            uint64_t hk = h[i] + salts[k];
            c[i] = (uint32_t)((hk * MIX) >> shift);
            c[m + i] = (uint32_t)(((hk + w->class_salt) * MIX) >> shift) + class_base;
            __builtin_prefetch(weights + c[i]);
            __builtin_prefetch(weights + c[m + i]);
        }
        c += 2 * m;
    }
    /* Pass 2: the sums, as np.bincount adds float32 products in double. */
    double z = 0.0;
    c = col;
    for (int k = 1; k <= kmax && k <= len; k++) {
        const Py_ssize_t m = len - k + 1;
        for (Py_ssize_t i = 0; i < m; i++)
            z += (double)(weights[c[i]] * v);
        for (Py_ssize_t i = 0; i < m; i++)
            z += (double)(weights[c[m + i]] * vc);
        c += 2 * m;
    }
    return z;
}

static PyObject *window_sums(PyObject *self, PyObject *args) {
    PyObject *texts_obj, *classes_obj, *weights_obj, *salts_obj, *class_salts_obj;
    int bits;
    double class_scale;
    if (!PyArg_ParseTuple(args, "OOOidOO", &texts_obj, &classes_obj, &weights_obj, &bits, &class_scale, &salts_obj,
                          &class_salts_obj))
        return NULL;
    if (bits < 1 || bits > 30) {
        PyErr_SetString(PyExc_ValueError, "bits must be 1 to 30");
        return NULL;
    }
    uint64_t salts[MAX_K + 1];
    Py_ssize_t n_salts, n_classes;
    if (get_u64s(salts_obj, salts, 1, MAX_K + 1, "salts", &n_salts) < 0)
        return NULL;
    const int kmax = (int)n_salts - 1; /* salts[k] for k = 1..kmax; salts[0] unused */

    /* A tuple of its own: nobody can change the texts while the loop runs without the GIL. */
    PyObject *texts = PySequence_Tuple(texts_obj);
    if (texts == NULL)
        return NULL;
    PyObject *classes = PySequence_Fast(classes_obj, "classes must be a sequence of ints");
    if (classes == NULL) {
        Py_DECREF(texts);
        return NULL;
    }
    const Py_ssize_t n = PyTuple_GET_SIZE(texts);
    PyObject *result = NULL;
    window_t *ws = NULL;
    uint64_t *class_salts = NULL, *h = NULL;
    uint32_t *col = NULL;
    double *z = NULL;
    Py_buffer weights = {0};
    if (PySequence_Fast_GET_SIZE(classes) != n) {
        PyErr_Format(PyExc_ValueError, "%zd texts but %zd classes", n, PySequence_Fast_GET_SIZE(classes));
        goto done;
    }
    Py_ssize_t max_classes = PySequence_Size(class_salts_obj);
    if (max_classes < 0)
        goto done;
    class_salts = PyMem_Malloc((max_classes + 1) * sizeof(uint64_t));
    ws = PyMem_Malloc((n + 1) * sizeof(window_t));
    z = PyMem_Malloc((n + 1) * sizeof(double));
    if (class_salts == NULL || ws == NULL || z == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_u64s(class_salts_obj, class_salts, 1, max_classes, "class_salts", &n_classes) < 0)
        goto done;
    Py_ssize_t max_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(texts, i);
        if (!PyBytes_Check(t)) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] must be bytes, not %.100s", i, Py_TYPE(t)->tp_name);
            goto done;
        }
        long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(classes, i));
        if (c == -1 && PyErr_Occurred())
            goto done;
        if (c < 0 || c >= n_classes) {
            PyErr_Format(PyExc_ValueError, "classes[%zd] = %ld: not a class (0 to %zd)", i, c, n_classes - 1);
            goto done;
        }
        ws[i].data = (const unsigned char *)PyBytes_AS_STRING(t);
        ws[i].len = PyBytes_GET_SIZE(t);
        ws[i].class_salt = class_salts[c];
        if (ws[i].len > max_len)
            max_len = ws[i].len;
    }
    if (max_len > PY_SSIZE_T_MAX / (Py_ssize_t)(2 * (MAX_K + 1) * sizeof(uint64_t))) {
        PyErr_NoMemory();
        goto done;
    }
    h = PyMem_Malloc((max_len + 1) * sizeof(uint64_t));
    col = PyMem_Malloc((2 * kmax * max_len + 1) * sizeof(uint32_t));
    if (h == NULL || col == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_weights(weights_obj, &weights, bits) < 0)
        goto done;

    const float *wts = weights.buf;
    const float cs = (float)class_scale;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        z[i] = window_sum(&ws[i], wts, bits, cs, salts, kmax, h, col);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&weights);

    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyFloat_FromDouble(z[i]);
        if (f == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, f);
    }
done:
    PyMem_Free(class_salts);
    PyMem_Free(ws);
    PyMem_Free(z);
    PyMem_Free(h);
    PyMem_Free(col);
    Py_DECREF(texts);
    Py_DECREF(classes);
    return result;
}

static PyMethodDef methods[] = {
    {"window_sums", window_sums, METH_VARARGS,
     "window_sums(texts: list[bytes], classes: list[int], weights, bits: int, class_scale: float,\n"
     "            salts: tuple[int, ...], class_salts: tuple[int, ...]) -> list[float]\n\n"
     "Per window, the sum of weights[column] * value over its hashed byte n-grams (both blocks), as\n"
     "np.bincount sums fieldmodel.ngram_keys' triples. weights: contiguous float32, 2 * 2**bits values;\n"
     "salts[k] for n-grams of k bytes (salts[0] unused); class_salts[c] for class c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscore", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastscore(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* (P, MIX): fieldmodel uses this module only if they are its own. */
    PyObject *c = Py_BuildValue("(KK)", (unsigned long long)P_HASH, (unsigned long long)MIX);
    if (c == NULL || PyModule_AddObject(m, "CONSTANTS", c) < 0) {
        Py_XDECREF(c);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
