/* BPE-dropout of a caption, in C: the loop of CaptionTokenizer._bpe_dropout
 * (preprocessing/text_tokenizer.py), where its rule and its draws are written down. In Python it
 * cost a few operations per word and per pair looked at, most of a training sample's cost
 * (benchmarks/README.md, "data.py"); here a caption is one call.
 *
 * table(keys, values) -> the merge table (bytes) the other two take as ``pairs``
 *     From ``keys``, uint64 (left id << 32 | right id), every two pieces whose concatenation is a
 *     piece, and ``values``, uint64 (rank << 32 | merged id), rank the merged piece's place among
 *     the scores, best first, equal scores equal ranks: an open-addressing hash table at most
 *     half full (the paper's 49,808 pieces make about 100,000 pairs: 4 MB).
 * A word's ``symbols`` are uint32 piece ids of its characters (the unknown id for a character that
 * is no piece, which is in no pair).
 *
 * plain(pairs, symbols) -> (piece ids, merges)
 *     Plain BPE of one word: its pieces and how many merges it made.
 * dropout(words, plain, pairs, digest, threshold, unk) -> piece ids, or None
 *     BPE-dropout of a caption's words (str), each looked up in the mapping ``plain`` as
 *     (symbols, plain pieces, merges): a dict whose __missing__ makes an entry. Draw j is the
 *     j-th little-endian 16-bit word of ``digest``; it drops its pair when below ``threshold``.
 *     A word takes the draws after the previous one's. A run of ``unk`` pieces becomes one. None
 *     when the words need more draws than ``digest`` holds (ask again with a longer one).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {  /* open addressing: 2^bits slots of (key, value), EMPTY keys free */
    const uint64_t *slots;
    int bits;
} Table;

#define EMPTY UINT64_MAX  /* no pair's key: piece ids are below 2^32 - 1 */

static Py_ssize_t slot_of(uint64_t key, int bits) {
    return (Py_ssize_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

typedef struct {  /* the caption's draws; ``plain`` keeps every pair */
    const unsigned char *digest;
    Py_ssize_t count, pos;
    unsigned threshold;
    int plain;
} Draws;

enum { KEPT = 0, DROPPED = 1, NO_DRAWS = 2 };

static int draw(Draws *d) {
    if (d->plain) {
        d->pos++;
        return KEPT;
    }
    if (d->pos >= d->count)
        return NO_DRAWS;
    const unsigned char *w = d->digest + 2 * d->pos++;
    return (unsigned)(w[0] | (w[1] << 8)) < d->threshold ? DROPPED : KEPT;
}

static int64_t lookup(const Table *t, uint32_t left, uint32_t right) {
    uint64_t key = ((uint64_t)left << 32) | right, mask = ((uint64_t)1 << t->bits) - 1;
    for (Py_ssize_t i = slot_of(key, t->bits);; i = (i + 1) & mask) {
        if (t->slots[2 * i] == key)
            return (int64_t)t->slots[2 * i + 1];
        if (t->slots[2 * i] == EMPTY)
            return -1;
    }
}

/* Merges sym[0..*len) in place. Each step looks at the mergeable pairs from the best (rank, then
 * position) on, one draw each, and merges the first kept; a step that keeps none ends the word.
 * Returns 0, -1 when out of draws, -2 out of memory. */
static int merge_word(const Table *t, uint32_t *sym, Py_ssize_t *len, Draws *d) {
    Py_ssize_t n = *len;
    if (n < 2)
        return 0;
    int64_t *pair = malloc(n * sizeof *pair);  /* pair[i]: symbols i and i+1, or -1 */
    char *looked = malloc(n);                 /* pairs dropped in this step */
    int status = 0;
    if (!pair || !looked) {
        status = -2;
        goto done;
    }
    for (Py_ssize_t i = 0; i + 1 < n; i++)
        pair[i] = lookup(t, sym[i], sym[i + 1]);
    while (n > 1) {
        memset(looked, 0, n - 1);
        Py_ssize_t kept = -1;
        for (;;) {
            Py_ssize_t best = -1;
            for (Py_ssize_t i = 0; i + 1 < n; i++)
                if (pair[i] >= 0 && !looked[i] && (best < 0 || (pair[i] >> 32) < (pair[best] >> 32)))
                    best = i;
            if (best < 0)
                break;
            int r = draw(d);
            if (r == NO_DRAWS) {
                status = -1;
                goto done;
            }
            if (r == KEPT) {
                kept = best;
                break;
            }
            looked[best] = 1;
        }
        if (kept < 0)
            break;
        sym[kept] = (uint32_t)(pair[kept] & 0xffffffffu);
        memmove(sym + kept + 1, sym + kept + 2, (n - kept - 2) * sizeof *sym);
        memmove(pair + kept, pair + kept + 1, (n - kept - 2) * sizeof *pair);
        n--;
        if (kept > 0)
            pair[kept - 1] = lookup(t, sym[kept - 1], sym[kept]);
        if (kept + 1 < n)
            pair[kept] = lookup(t, sym[kept], sym[kept + 1]);
    }
done:
    free(pair);
    free(looked);
    *len = n;
    return status;
}

static int table_of(Py_buffer *buf, Table *t) {
    Py_ssize_t slots = buf->len / 16;
    int bits = 0;
    while (((Py_ssize_t)1 << bits) < slots)
        bits++;
    if (buf->len % 16 || slots < 2 || ((Py_ssize_t)1 << bits) != slots) {
        PyErr_SetString(PyExc_ValueError, "_bpe: the merge table is not one made by _bpe.table");
        return -1;
    }
    t->slots = buf->buf;
    t->bits = bits;
    return 0;
}

static PyObject *table(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer keys, values;
    if (!PyArg_ParseTuple(args, "y*y*", &keys, &values))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = keys.len / 8;
    int bits = 1;
    while (((Py_ssize_t)1 << bits) < 2 * n)  /* at most half full */
        bits++;
    if (keys.len != values.len || keys.len % 8) {
        PyErr_SetString(PyExc_ValueError, "_bpe.table: keys and values must be uint64 of one length");
        goto done;
    }
    if (!(result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)16 << bits)))
        goto done;
    uint64_t *slots = (uint64_t *)PyBytes_AS_STRING(result), mask = ((uint64_t)1 << bits) - 1;
    const uint64_t *k = keys.buf, *v = values.buf;
    for (Py_ssize_t i = 0; i < ((Py_ssize_t)1 << bits); i++)
        slots[2 * i] = EMPTY;
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t i = slot_of(k[j], bits);
        while (slots[2 * i] != EMPTY && slots[2 * i] != k[j])
            i = (i + 1) & mask;
        slots[2 * i] = k[j];
        slots[2 * i + 1] = v[j];
    }
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&values);
    return result;
}

/* Whether piece ``id`` would repeat the unknown piece that ids ends with (a run of unknown
 * pieces is one, as in SentencePiece). */
static int repeats_unk(PyObject *ids, long id, long unk) {
    Py_ssize_t size = PyList_GET_SIZE(ids);
    return id == unk && size && PyLong_AsLong(PyList_GET_ITEM(ids, size - 1)) == unk;
}

/* Appends sym[0..len) to ids, a run of unk pieces as one. */
static int append_ids(PyObject *ids, const uint32_t *sym, Py_ssize_t len, long unk) {
    for (Py_ssize_t i = 0; i < len; i++) {
        if (repeats_unk(ids, (long)sym[i], unk))
            continue;
        PyObject *id = PyLong_FromUnsignedLong(sym[i]);
        if (!id || PyList_Append(ids, id) < 0) {
            Py_XDECREF(id);
            return -1;
        }
        Py_DECREF(id);
    }
    return 0;
}

static PyObject *plain(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer pairs, symbols;
    if (!PyArg_ParseTuple(args, "y*y*", &pairs, &symbols))
        return NULL;
    PyObject *result = NULL, *ids = NULL;
    Table t;
    Py_ssize_t len = symbols.len / 4;
    uint32_t *sym = malloc((len ? len : 1) * sizeof *sym);
    Draws d = {NULL, 0, 0, 0, 1};
    if (!sym) {
        PyErr_NoMemory();
        goto done;
    }
    if (table_of(&pairs, &t) < 0)
        goto done;
    memcpy(sym, symbols.buf, len * sizeof *sym);
    if (merge_word(&t, sym, &len, &d) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(ids = PyList_New(0)) || append_ids(ids, sym, len, -1) < 0)
        goto done;
    result = Py_BuildValue("(On)", ids, d.pos);
done:
    Py_XDECREF(ids);
    free(sym);
    PyBuffer_Release(&pairs);
    PyBuffer_Release(&symbols);
    return result;
}

static PyObject *dropout(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *words, *cache, *result = NULL, *ids = NULL, *entry = NULL;
    Py_buffer pairs, digest;
    unsigned threshold;
    long unk;
    if (!PyArg_ParseTuple(args, "O!Oy*y*Il", &PyList_Type, &words, &cache, &pairs,
                          &digest, &threshold, &unk))
        return NULL;
    Table t;
    Draws d = {digest.buf, digest.len / 2, 0, threshold, 0};
    uint32_t *sym = NULL;
    if (table_of(&pairs, &t) < 0 || !(ids = PyList_New(0)))
        goto done;
    for (Py_ssize_t w = 0; w < PyList_GET_SIZE(words); w++) {
        Py_XDECREF(entry);  /* the previous word's */
        entry = PyObject_GetItem(cache, PyList_GET_ITEM(words, w));  /* its __missing__ makes one */
        if (!entry)
            goto done;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
            PyErr_SetString(PyExc_TypeError, "_bpe.dropout: a plain entry is (bytes, list, int)");
            goto done;
        }
        PyObject *symbols = PyTuple_GET_ITEM(entry, 0), *word_ids = PyTuple_GET_ITEM(entry, 1);
        Py_ssize_t merges = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 2));
        if (!PyBytes_Check(symbols) || !PyList_Check(word_ids) || merges < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "_bpe.dropout: a plain entry is (bytes, list, int)");
            goto done;
        }
        /* Plain BPE's merges take the next `merges` draws, one each, while none drops. */
        Py_ssize_t start = d.pos, j = 0;
        int r = KEPT;
        for (; j < merges && (r = draw(&d)) == KEPT; j++)
            ;
        if (r == NO_DRAWS) {
            result = Py_None;
            goto done;
        }
        if (r == KEPT) {
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(word_ids); i++) {
                PyObject *id = PyList_GET_ITEM(word_ids, i);
                if (repeats_unk(ids, PyLong_AsLong(id), unk))
                    continue;
                if (PyList_Append(ids, id) < 0)
                    goto done;
            }
            continue;
        }
        /* A drop: the word again from its characters, the same draws deciding. */
        Py_ssize_t len = PyBytes_GET_SIZE(symbols) / 4;
        free(sym);
        if (!(sym = malloc((len ? len : 1) * sizeof *sym))) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(sym, PyBytes_AS_STRING(symbols), len * sizeof *sym);
        d.pos = start;
        int status = merge_word(&t, sym, &len, &d);
        if (status == -1) {
            result = Py_None;
            goto done;
        }
        if (status < 0) {
            PyErr_NoMemory();
            goto done;
        }
        if (append_ids(ids, sym, len, unk) < 0)
            goto done;
    }
    result = ids;
done:
    if (result == Py_None)
        Py_INCREF(Py_None);
    else if (result == ids)
        ids = NULL;
    Py_XDECREF(ids);
    Py_XDECREF(entry);
    free(sym);
    PyBuffer_Release(&pairs);
    PyBuffer_Release(&digest);
    return result;
}

static PyMethodDef methods[] = {
    {"table", table, METH_VARARGS, "The merge table of keys and values."},
    {"plain", plain, METH_VARARGS, "Plain BPE of one word: (piece ids, merges)."},
    {"dropout", dropout, METH_VARARGS, "BPE-dropout of a caption's words: piece ids, or None for more draws."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bpe(void) { return PyModule_Create(&module); }
