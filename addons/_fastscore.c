/* addons._fastscore: the supervised part of addons.detector.Detector for one request, in one call.
 *
 * Optional: `pip install -e .` builds it where a C compiler is present; without it, Detector uses its numpy
 * path, which computes the same value (tests/test_detector.py compares the two on random text, the probes and
 * the shipped model).
 *
 * z(request, headers, weights, bits, header_scale) = block(request) + header_scale * block(headers), where
 * block(text) = (v . coef[idx]) / |v|, v = (1 + log count) * idf[idx] (weights[idx] = (idf, coef)) over the distinct hashed byte 1..5-grams
 * of the text (request n-grams with the request salts, header n-grams with the header salts; none across
 * the seam). The hashing is detector.block_keys'; the constants are in CONSTANTS for the Python side to check.
 *
 * Distinct n-grams are counted in an open-addressing table instead of a sort: the sums then run in another
 * order than numpy's, so z differs from the numpy path by rounding only (about 1e-15).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define K_MIN 1
#define K_MAX 5
#define P_HASH 0x100000001B3ULL
#define MIX 0x9E3779B97F4A7C15ULL
#define SALT_STEP 0x2545F4914F6CDD1DULL
#define HEADER_SALT_OFFSET 16
#define STACK_SLOTS 4096

typedef struct {
    uint32_t key; /* bucket + 1 (0: empty slot); bits <= MAX_BITS */
    uint32_t count;
} slot_t; /* 8 bytes: a short request's table (16 KiB) leaves most of the L1 cache to mitmproxy */

#define MAX_BITS 31

/* 1 + log(c) for the small counts most n-grams have (the same libm log as for larger ones). */
#define LOG_TABLE 256
static double one_plus_log[LOG_TABLE];

/* Count key; a new key's slot is appended to used (so the sums visit only used slots). */
static void insert(slot_t *table, uint64_t mask, uint32_t key, const float *weights, uint32_t *used,
                   Py_ssize_t *n_used) {
    uint64_t i = ((uint64_t)key * MIX) >> 20 & mask;
    for (;;) {
        if (table[i].key == key) {
            table[i].count++;
            return;
        }
        if (table[i].key == 0) {
            table[i].key = key;
            table[i].count = 1;
            used[(*n_used)++] = (uint32_t)i;
            __builtin_prefetch(weights + 2 * (key - 1)); /* the weights table is far larger than the caches */
            return;
        }
        i = (i + 1) & mask;
    }
}

/* Count the distinct buckets of the k-grams (K_MIN..K_MAX) of one text into table. */
static void count_ngrams(const unsigned char *b, Py_ssize_t n, uint64_t salt_base, int bits, slot_t *table,
                         uint64_t mask, const float *weights, uint32_t *used, Py_ssize_t *n_used) {
    const int shift = 64 - bits;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = 0;
        for (int k = 1; k <= K_MAX && i + k <= n; k++) {
            h = h * P_HASH + b[i + k - 1];
            if (k >= K_MIN) {
                uint64_t salt = (uint64_t)(k + salt_base) * SALT_STEP;
                insert(table, mask, (uint32_t)((h + salt) * MIX >> shift) + 1, weights, used, n_used);
            }
        }
    }
}

/* The normalised block of one text: (v . w) / |v|, 0 for no n-gram with a known idf. */
static double block(const unsigned char *b, Py_ssize_t n, uint64_t salt_base, int bits, const float *weights,
                    int *failed) {
    if (n <= 0)
        return 0.0;
    Py_ssize_t grams = n * (K_MAX - K_MIN + 1);
    uint64_t slots = 16;
    while (slots < (uint64_t)grams * 2)
        slots <<= 1;
    slot_t stack[STACK_SLOTS];
    uint32_t stack_used[STACK_SLOTS / 2];
    slot_t *table = stack;
    uint32_t *used = stack_used;
    if (slots > STACK_SLOTS) {
        table = calloc(slots, sizeof(slot_t));
        used = malloc(grams * sizeof(uint32_t));
        if (table == NULL || used == NULL) {
            free(table);
            free(used);
            *failed = 1;
            return 0.0;
        }
    } else {
        memset(stack, 0, slots * sizeof(slot_t));
    }
    Py_ssize_t n_used = 0;
    count_ngrams(b, n, salt_base, bits, table, slots - 1, weights, used, &n_used);
    double vv = 0.0, vw = 0.0;
    for (Py_ssize_t j = 0; j < n_used; j++) {
        const slot_t *t = &table[used[j]];
        uint64_t idx = t->key - 1;
        double v = (t->count < LOG_TABLE ? one_plus_log[t->count] : 1.0 + log((double)t->count)) * (double)weights[2 * idx];
        vv += v * v;
        vw += v * (double)weights[2 * idx + 1];
    }
    if (table != stack) {
        free(table);
        free(used);
    }
    return vv > 0.0 ? vw / sqrt(vv) : 0.0;
}

static PyObject *z(PyObject *self, PyObject *args) {
    Py_buffer req, hdr, weights;
    int bits;
    double header_scale;
    if (!PyArg_ParseTuple(args, "y*y*y*id", &req, &hdr, &weights, &bits, &header_scale))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t buckets = (Py_ssize_t)1 << (bits > 0 && bits <= MAX_BITS ? bits : 0);
    if (bits <= 0 || bits > MAX_BITS || weights.len != 2 * buckets * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "weights must be a float32 buffer of 2**bits (idf, coef) pairs");
        goto done;
    }
    int failed = 0;
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = block(req.buf, req.len, 0, bits, weights.buf, &failed);
    if (hdr.len > 0)
        total += header_scale * block(hdr.buf, hdr.len, HEADER_SALT_OFFSET, bits, weights.buf, &failed);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyFloat_FromDouble(total);
done:
    PyBuffer_Release(&req);
    PyBuffer_Release(&hdr);
    PyBuffer_Release(&weights);
    return out;
}

static PyMethodDef methods[] = {
    {"z", z, METH_VARARGS,
     "z(request: bytes, headers: bytes, weights, bits: int, header_scale: float) -> float\n\n"
     "weights: float32, C order, shape (2**bits, 2): each bucket's idf and coef side by side (one cache line).\n"
     "block(request) + header_scale * block(headers): Detector's supervised logit without the intercept."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscore", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastscore(void) {
    for (int c = 1; c < LOG_TABLE; c++)
        one_plus_log[c] = 1.0 + log((double)c);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* (K_MIN, K_MAX, P, MIX, SALT_STEP, HEADER_SALT_OFFSET): detector uses this module only if they match. */
    PyObject *c = Py_BuildValue("(iiKKKi)", K_MIN, K_MAX, (unsigned long long)P_HASH, (unsigned long long)MIX,
                                (unsigned long long)SALT_STEP, HEADER_SALT_OFFSET);
    if (c == NULL || PyModule_AddObject(m, "CONSTANTS", c) < 0) {
        Py_XDECREF(c);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
