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
 * proba(feature, ...) is Detector.supervised_proba of one feature string in one call: the split into request and
 * header section (detector.split_headers), the UTF-8 encoding and the logistic function as well.
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

/* The header section's marker (detector._HSEC, SEP + "h ") and SEP, in UTF-8: SEP is U+2016. */
static const char HSEC[] = "\xe2\x80\x96h ";
static const char SEP_UTF8[] = "\xe2\x80\x96";

static Py_ssize_t find(const char *s, Py_ssize_t n, Py_ssize_t from, const char *what, Py_ssize_t len) {
    for (Py_ssize_t i = from; i + len <= n; i++) {
        const char *hit = memchr(s + i, what[0], n - len + 1 - i);
        if (hit == NULL)
            return -1;
        i = hit - s;
        if (memcmp(s + i, what, len) == 0)
            return i;
    }
    return -1;
}

static Py_ssize_t rstrip_spaces(const char *s, Py_ssize_t n) {
    while (n > 0 && s[n - 1] == ' ')
        n--;
    return n;
}

/* proba(feature: str, weights, bits, header_scale, intercept, header_block) -> float | None: Detector's
 * supervised probability of one feature string, detector.split_headers and the UTF-8 encoding included
 * (UTF-8 is self-synchronising: the byte offsets of the markers are those of the characters). None for a
 * string UTF-8 cannot encode (a lone surrogate): the caller then takes its own path. */
static PyObject *proba(PyObject *self, PyObject *args) {
    PyObject *feature, *encoded = NULL;
    Py_buffer weights;
    int bits, header_block;
    double header_scale, intercept;
    if (!PyArg_ParseTuple(args, "Uy*iddp", &feature, &weights, &bits, &header_scale, &intercept, &header_block))
        return NULL;
    PyObject *out = NULL;
    char *joined = NULL;
    Py_ssize_t buckets = (Py_ssize_t)1 << (bits > 0 && bits <= MAX_BITS ? bits : 0);
    if (bits <= 0 || bits > MAX_BITS || weights.len != 2 * buckets * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "weights must be a float32 buffer of 2**bits (idf, coef) pairs");
        goto done;
    }
    const char *s;
    Py_ssize_t n;
    if (PyUnicode_IS_ASCII(feature)) { /* no copy: the string's own bytes */
        s = (const char *)PyUnicode_DATA(feature);
        n = PyUnicode_GET_LENGTH(feature);
    } else {
        encoded = PyUnicode_AsUTF8String(feature); /* a temporary copy: nothing cached on the string */
        if (encoded == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                goto done;
            PyErr_Clear();
            out = Py_NewRef(Py_None);
            goto done;
        }
        s = PyBytes_AS_STRING(encoded);
        n = PyBytes_GET_SIZE(encoded);
    }
    const char *req = s, *hdr = NULL;
    Py_ssize_t req_len = n, hdr_len = 0;
    Py_ssize_t i = header_block ? find(s, n, 0, HSEC, 5) : -1;
    if (i >= 0) {
        Py_ssize_t j = find(s, n, i + 3, SEP_UTF8, 3);
        hdr = s + i;
        if (j < 0) {
            req_len = rstrip_spaces(s, i);
            hdr_len = n - i;
        } else { /* feature[:i] + feature[j:] */
            hdr_len = rstrip_spaces(s + i, j - i);
            req_len = i + (n - j);
            joined = malloc(req_len > 0 ? req_len : 1);
            if (joined == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(joined, s, i);
            memcpy(joined + i, s + j, n - j);
            req = joined;
        }
    }
    int failed = 0;
    double total;
    total = block((const unsigned char *)req, req_len, 0, bits, weights.buf, &failed);
    if (hdr_len > 0)
        total += header_scale * block((const unsigned char *)hdr, hdr_len, HEADER_SALT_OFFSET, bits, weights.buf, &failed);
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    double z = intercept + total, p; /* the same operations as Detector.supervised_proba */
    if (z >= 0) {
        p = 1.0 / (1.0 + exp(-z));
    } else {
        double e = exp(z);
        p = e / (1.0 + e);
    }
    out = PyFloat_FromDouble(p);
done:
    free(joined);
    Py_XDECREF(encoded);
    PyBuffer_Release(&weights);
    return out;
}

/* ---- featurize.normalise for plain ASCII text ---- */

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* featurize._normalise of the ASCII text s[0:n] (already cut to limit * 4), in place, when its only encodings are
 * %XX (to ASCII) and `+`: the same bounded decoding rounds, lower case, control characters and whitespace runs as
 * one space. Returns the length of the result (at most limit), or -1 for anything else (a byte >= 0x80 once
 * decoded, `&`, a backslash, `%u`, a `%` left after the rounds, a comment, NUL): featurize's own code decides.
 * Every step is the Python one restricted to ASCII (NFKC and casefold of ASCII are identity and lower). */
#define DECODE_ROUNDS 4
static Py_ssize_t norm_ascii(char *s, Py_ssize_t n, int plus, Py_ssize_t limit) {
    for (int round = 0; round < DECODE_ROUNDS; round++) {
        int changed = 0;
        Py_ssize_t j = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            char c = s[i];
            if (c == '+' && plus) {
                c = ' ';
                changed = 1;
            } else if (c == '\\' || c == '&') {
                return -1; /* \uXXXX, HTML entities */
            } else if (c == '%') {
                if (i + 1 < n && s[i + 1] == 'u')
                    return -1; /* %uXXXX (a `%` left would send it back anyway) */
                int hi = i + 2 < n ? hexval(s[i + 1]) : -1, lo = hi >= 0 ? hexval(s[i + 2]) : -1;
                if (lo >= 0) {
                    c = (char)(hi << 4 | lo);
                    if ((unsigned char)c >= 0x80)
                        return -1; /* not ASCII once decoded (UTF-8 or Latin-1 text) */
                    i += 2;
                    changed = 1;
                }
            }
            s[j++] = c;
        }
        n = j;
        /* Python looks for entities after this round's decoding (and escapes in the next round, if any): what
         * decoding revealed, the last round included. */
        for (Py_ssize_t i = 0; i < n; i++)
            if (s[i] == '&' || s[i] == '\\')
                return -1;
        if (!changed)
            break;
    }
    if (memchr(s, '%', n) != NULL || memchr(s, '\0', n) != NULL)
        return -1; /* one more decoding pass in Python; NUL becomes " <nul> " */
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'Z')
            s[i] = c + ('a' - 'A');
        else if ((c >= 0x01 && c <= 0x08) || (c >= 0x0b && c <= 0x1f) || c == 0x7f)
            s[i] = ' ';
    }
    for (Py_ssize_t i = 0; i + 1 < n; i++) {
        if (s[i] == '/' && s[i + 1] == '*')
            return -1;
        if (s[i] == '<' && i + 3 < n && memcmp(s + i, "<!--", 4) == 0)
            return -1;
    }
    Py_ssize_t j = 0;
    int space = 1; /* collapse runs of space, tab and newline; none at the start */
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '\t' || c == '\n') {
            if (!space)
                s[j++] = ' ';
            space = 1;
        } else {
            s[j++] = c;
            space = 0;
        }
    }
    if (j > 0 && s[j - 1] == ' ')
        j--;
    return j < limit ? j : limit;
}

/* normalise_ascii(text: str, plus: bool, limit: int) -> str | None: norm_ascii of text[: limit * 4]. */
static PyObject *normalise_ascii(PyObject *self, PyObject *args) {
    PyObject *text;
    int plus;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "Upn", &text, &plus, &limit))
        return NULL;
    if (!PyUnicode_IS_ASCII(text) || limit < 0 || limit > PY_SSIZE_T_MAX / 4)
        Py_RETURN_NONE;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (n > limit * 4)
        n = limit * 4; /* s[: limit * 4] */
    char stack[1024];
    char *s = n < (Py_ssize_t)sizeof(stack) ? stack : malloc(n + 1);
    if (s == NULL)
        return PyErr_NoMemory();
    memcpy(s, PyUnicode_DATA(text), n);
    Py_ssize_t len = norm_ascii(s, n, plus, limit);
    PyObject *out = len < 0 ? Py_NewRef(Py_None) : PyUnicode_DecodeASCII(s, len, NULL);
    if (s != stack)
        free(s);
    return out;
}

/* pairs_ascii(raw: str, sep: str, limit: int, max_pairs: int) -> str | None: featurize._pairs of ASCII text,
 * each name and value through norm_ascii; None if any of them is not for norm_ascii (featurize's own code
 * then takes the whole text). */
static PyObject *pairs_ascii(PyObject *self, PyObject *args) {
    PyObject *raw;
    int sep;
    Py_ssize_t limit, max_pairs;
    if (!PyArg_ParseTuple(args, "UCnn", &raw, &sep, &limit, &max_pairs))
        return NULL;
    if (!PyUnicode_IS_ASCII(raw) || sep <= 0 || sep >= 128 || limit < 0 || limit > PY_SSIZE_T_MAX / 8 || max_pairs < 0 ||
        max_pairs > PY_SSIZE_T_MAX / 8)
        Py_RETURN_NONE;
    const char *src = (const char *)PyUnicode_DATA(raw);
    Py_ssize_t n = PyUnicode_GET_LENGTH(raw);
    if (n > limit * 4)
        n = limit * 4; /* raw[: limit * 4] */
    char stack[2048];
    char *buf = 3 * n + 2 <= (Py_ssize_t)sizeof(stack) ? stack : malloc(3 * n + 2);
    if (buf == NULL)
        return PyErr_NoMemory();
    char *out = buf, *piece = buf + 2 * n + 1; /* a normalised piece is never longer than it was */
    Py_ssize_t o = 0, pairs = 0, size = 0, parts = 0, start = 0;
    PyObject *result = NULL;
    /* raw.split(sep, 4 * max_pairs)[: 4 * max_pairs]: at most that many parts, the rest dropped */
    while (start <= n && parts < 4 * max_pairs) {
        const char *end = memchr(src + start, sep, n - start);
        Py_ssize_t stop = end ? end - src : n;
        parts++;
        if (stop > start) {
            if (pairs >= max_pairs)
                break;
            const char *eq = memchr(src + start, '=', stop - start);
            Py_ssize_t name_len = eq ? eq - (src + start) : stop - start;
            memcpy(piece, src + start, name_len);
            Py_ssize_t len = norm_ascii(piece, name_len, 1, limit);
            if (len < 0)
                goto bail;
            Py_ssize_t text = len;
            if (pairs)
                out[o++] = ' ';
            memcpy(out + o, piece, len);
            o += len;
            if (eq) {
                Py_ssize_t value_len = stop - (eq - src) - 1;
                memcpy(piece, eq + 1, value_len);
                len = norm_ascii(piece, value_len, 1, limit);
                if (len < 0)
                    goto bail;
                out[o++] = '=';
                memcpy(out + o, piece, len);
                o += len;
                text += 1 + len;
            }
            pairs++;
            size += text + 1;
            if (size >= limit)
                break;
        }
        if (end == NULL)
            break;
        start = stop + 1;
    }
    result = PyUnicode_DecodeASCII(out, o < limit ? o : limit, NULL); /* " ".join(out)[:limit] */
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    if (buf != stack)
        free(buf);
    return result;
}

/* ---- featurize.ai_markers' substring prefilter ---- */

#define MAX_LITERALS 64
#define MAX_SETS 31
typedef struct {
    int n;                            /* literals */
    int n_sets;
    Py_UCS4 chars[MAX_LITERALS][32];  /* each literal, ASCII, at most 32 characters */
    Py_ssize_t len[MAX_LITERALS];
    int set[MAX_LITERALS];            /* which set (pattern) it belongs to */
    signed char first[128][MAX_LITERALS + 1]; /* literals by first character, -1 terminated */
} literals_t;
static literals_t lits, next_lits;    /* next_lits: built by set_literals, copied to lits once all is valid */

/* set_literals(sets: tuple[tuple[str, ...], ...]) -> None: the literal sets literal_hits tests. */
static PyObject *set_literals(PyObject *self, PyObject *args) {
    PyObject *sets;
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &sets))
        return NULL;
    Py_ssize_t n_sets = PyTuple_GET_SIZE(sets);
    if (n_sets > MAX_SETS) {
        PyErr_SetString(PyExc_ValueError, "too many literal sets");
        return NULL;
    }
    literals_t *t = &next_lits;
    int n = 0;
    memset(t->first, -1, sizeof(t->first));
    int n_first[128] = {0};
    for (Py_ssize_t k = 0; k < n_sets; k++) {
        PyObject *set = PyTuple_GET_ITEM(sets, k);
        if (!PyTuple_Check(set)) {
            PyErr_SetString(PyExc_TypeError, "each literal set must be a tuple of str");
            return NULL;
        }
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(set); j++) {
            PyObject *lit = PyTuple_GET_ITEM(set, j);
            if (!PyUnicode_Check(lit) || !PyUnicode_IS_ASCII(lit) || PyUnicode_GET_LENGTH(lit) < 1 ||
                PyUnicode_GET_LENGTH(lit) > 32 || n >= MAX_LITERALS) {
                PyErr_SetString(PyExc_ValueError, "literals must be ASCII str of 1 to 32 characters, 64 at most");
                return NULL;
            }
            t->len[n] = PyUnicode_GET_LENGTH(lit);
            for (Py_ssize_t c = 0; c < t->len[n]; c++)
                t->chars[n][c] = PyUnicode_READ_CHAR(lit, c);
            t->set[n] = (int)k;
            Py_UCS4 f = t->chars[n][0];
            t->first[f][n_first[f]++] = (signed char)n;
            n++;
        }
    }
    t->n = n;
    t->n_sets = (int)n_sets;
    lits = *t;
    Py_RETURN_NONE;
}

/* literal_hits(text: str) -> int: bit k set iff some literal of set k is a substring of text. */
static PyObject *literal_hits(PyObject *self, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "literal_hits needs a str");
        return NULL;
    }
    int kind = PyUnicode_KIND(arg);
    const void *data = PyUnicode_DATA(arg);
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    unsigned long mask = 0, all = (1UL << lits.n_sets) - 1;
    for (Py_ssize_t i = 0; i < n && mask != all; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= 128)
            continue;
        for (const signed char *l = lits.first[c]; *l >= 0; l++) {
            int k = *l;
            if (mask >> lits.set[k] & 1 || i + lits.len[k] > n)
                continue;
            Py_ssize_t m = 1;
            while (m < lits.len[k] && PyUnicode_READ(kind, data, i + m) == lits.chars[k][m])
                m++;
            if (m == lits.len[k])
                mask |= 1UL << lits.set[k];
        }
    }
    return PyLong_FromUnsignedLong(mask);
}

static PyMethodDef methods[] = {
    {"z", z, METH_VARARGS,
     "z(request: bytes, headers: bytes, weights, bits: int, header_scale: float) -> float\n\n"
     "weights: float32, C order, shape (2**bits, 2): each bucket's idf and coef side by side (one cache line).\n"
     "block(request) + header_scale * block(headers): Detector's supervised logit without the intercept."},
    {"normalise_ascii", normalise_ascii, METH_VARARGS,
     "normalise_ascii(text: str, plus: bool, limit: int) -> str | None\n\n"
     "featurize._normalise of ASCII text whose only encodings are %XX and '+'; None for anything else."},
    {"set_literals", set_literals, METH_VARARGS,
     "set_literals(sets: tuple[tuple[str, ...], ...]) -> None: the ASCII literal sets literal_hits looks for."},
    {"literal_hits", literal_hits, METH_O,
     "literal_hits(text: str) -> int: bit k set iff a literal of set k (set_literals) is a substring of text."},
    {"pairs_ascii", pairs_ascii, METH_VARARGS,
     "pairs_ascii(raw: str, sep: str, limit: int, max_pairs: int) -> str | None\n\n"
     "featurize._pairs of ASCII text whose names and values normalise_ascii takes; None for anything else."},
    {"proba", proba, METH_VARARGS,
     "proba(feature: str, weights, bits: int, header_scale: float, intercept: float, header_block: bool) -> float | None\n\n"
     "Detector.supervised_proba of one feature string, split into request and header section (header_block) here;\n"
     "None when the string cannot be encoded as UTF-8 (a lone surrogate)."},
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
    /* detector uses proba only if its header-section marker is this one */
    if (PyModule_AddObject(m, "HEADER_MARK", PyBytes_FromStringAndSize(HSEC, sizeof(HSEC) - 1)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* featurize uses the normaliser only if its DECODE_ROUNDS is this one */
    if (PyModule_AddIntConstant(m, "DECODE_ROUNDS", DECODE_ROUNDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
