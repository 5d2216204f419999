/* BPE-dropout of captions, in C: the loop of CaptionTokenizer._bpe_dropout
 * (preprocessing/text_tokenizer.py), where its rule and its draws are written down. In Python it
 * cost a few operations per word and per pair looked at, most of a training sample's cost
 * (benchmarks/README.md, "data.py"); here a micro-batch of captions is one call.
 *
 * Merger(keys, values, chars, unk, capacity)
 *     The merge table, from ``keys``, uint64 (left id << 32 | right id), every two pieces whose
 *     concatenation is a piece, and ``values``, uint64 (rank << 32 | merged id), rank the merged
 *     piece's place among the scores, best first, equal scores equal ranks: an open-addressing
 *     hash table at most half full (the paper's 49,808 pieces make about 100,000 pairs: 4 MB).
 *     ``chars`` maps each one-character piece to its id (a character that is none is ``unk``,
 *     and in no pair). A word's plain BPE (its pieces and merge count) is made the first time
 *     the word is seen and kept, up to ``capacity`` words (all dropped when there would be more),
 *     keyed by the word's UTF-8 bytes, in one arena: a word costs two memory reads to find.
 * Merger.dropout(words, seed, threshold) -> piece ids (list)
 *     BPE-dropout of a caption's words (str). Draw j is the j-th little-endian 16-bit word of
 *     SHAKE-128(``seed``), squeezed as far as the words need; it drops its pair when below
 *     ``threshold``. A word takes the draws after the previous one's. A run of ``unk`` pieces
 *     becomes one.
 * Merger.encode(out, texts, seeds, threshold, length, pad, offset) -> rows left
 *     ``dropout`` of a batch's captions written into ``out`` (a writable buffer of integers of 2, 4
 *     or 8 bytes, ``length`` a row): each caption's first ``length`` pieces, then ``pad``, all plus
 *     ``offset``. Only captions (str or bytes) of printable ASCII without '&' are done here, the
 *     ones the tokenizer's normalisation leaves as they are but for whitespace (the caller checks
 *     that of its model): their words are a U+2581 and each run of non-spaces. The rows of the
 *     other captions are left as they were and returned, for the caller to do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* SHAKE-128 (FIPS 202): Keccak-f[1600] on 25 little-endian 64-bit lanes, rate 168 bytes. */

#define RATE 168

static const uint64_t ROUND_CONSTANTS[24] = {
    0x0000000000000001ull, 0x0000000000008082ull, 0x800000000000808Aull, 0x8000000080008000ull,
    0x000000000000808Bull, 0x0000000080000001ull, 0x8000000080008081ull, 0x8000000000008009ull,
    0x000000000000008Aull, 0x0000000000000088ull, 0x0000000080008009ull, 0x000000008000000Aull,
    0x000000008000808Bull, 0x800000000000008Bull, 0x8000000000008089ull, 0x8000000000008003ull,
    0x8000000000008002ull, 0x8000000000000080ull, 0x000000000000800Aull, 0x800000008000000Aull,
    0x8000000080008081ull, 0x8000000000008080ull, 0x0000000080000001ull, 0x8000000080008008ull,
};

static const int ROTATIONS[25] = {  /* of lane x + 5y */
    0, 1, 62, 28, 27, 36, 44, 6, 55, 20, 3, 10, 43, 25, 39, 41, 45, 15, 21, 8, 18, 2, 61, 56, 14,
};

static const int PI[25] = {  /* where lane (x, y) goes: (y, 2x + 3y) */
    0, 10, 20, 5, 15, 16, 1, 11, 21, 6, 7, 17, 2, 12, 22, 23, 8, 18, 3, 13, 14, 24, 9, 19, 4,
};

static inline uint64_t rotl(uint64_t v, int n) { return n ? (v << n) | (v >> (64 - n)) : v; }

/* The loops over lanes are unrolled, their tables folded into constants. */
static void keccak(uint64_t a[25]) {
    uint64_t c[5], b[25];
    for (int round = 0; round < 24; round++) {
#pragma GCC unroll 5
        for (int x = 0; x < 5; x++)  /* theta */
            c[x] = a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20];
#pragma GCC unroll 25
        for (int i = 0; i < 25; i++)  /* theta's sums, then rho and pi */
            b[PI[i]] = rotl(a[i] ^ c[(i + 4) % 5] ^ rotl(c[(i + 1) % 5], 1), ROTATIONS[i]);
#pragma GCC unroll 25
        for (int i = 0; i < 25; i++)  /* chi */
            a[i] = b[i] ^ (~b[i - i % 5 + (i + 1) % 5] & b[i - i % 5 + (i + 2) % 5]);
        a[0] ^= ROUND_CONSTANTS[round];  /* iota */
    }
}

static void xor_byte(uint64_t a[25], Py_ssize_t i, unsigned char v) { a[i / 8] ^= (uint64_t)v << (8 * (i % 8)); }

/* The state after absorbing ``msg`` and SHAKE's padding, ready to squeeze. */
static void shake_absorb(uint64_t a[25], const unsigned char *msg, Py_ssize_t len) {
    memset(a, 0, 25 * sizeof *a);
    for (; len >= RATE; msg += RATE, len -= RATE) {
        for (Py_ssize_t i = 0; i < RATE; i++)
            xor_byte(a, i, msg[i]);
        keccak(a);
    }
    for (Py_ssize_t i = 0; i < len; i++)
        xor_byte(a, i, msg[i]);
    xor_byte(a, len, 0x1F);
    xor_byte(a, RATE - 1, 0x80);
}

/* ------------------------------------------------------------------------------------------ */
/* A caption's draws: SHAKE-128 of its seed, squeezed a block at a time as they are needed and
 * kept, so a word can be merged again with the draws it had. ``plain`` keeps every pair. */

typedef struct {
    uint64_t state[25];
    unsigned char *bytes;  /* the stream squeezed so far: ``filled`` of ``cap`` */
    Py_ssize_t filled, cap, pos;
    unsigned threshold;
    int plain;
} Draws;

enum { KEPT = 0, DROPPED = 1, NO_MEMORY = -1 };

static void draws_start(Draws *d, const unsigned char *seed, Py_ssize_t len) {
    shake_absorb(d->state, seed, len);
    d->filled = d->pos = 0;
}

static int draw(Draws *d) {
    if (d->plain) {
        d->pos++;
        return KEPT;
    }
    while (2 * d->pos + 2 > d->filled) {
        if (d->filled + RATE > d->cap) {
            Py_ssize_t cap = 2 * d->cap + 4 * RATE;
            unsigned char *grown = realloc(d->bytes, cap);
            if (!grown)
                return NO_MEMORY;
            d->bytes = grown, d->cap = cap;
        }
        keccak(d->state);  /* the padded last block's permutation, then one a block */
        for (Py_ssize_t i = 0; i < RATE; i++)
            d->bytes[d->filled + i] = (unsigned char)(d->state[i / 8] >> (8 * (i % 8)));
        d->filled += RATE;
    }
    const unsigned char *w = d->bytes + 2 * d->pos++;
    return (unsigned)(w[0] | (w[1] << 8)) < d->threshold ? DROPPED : KEPT;
}

/* ------------------------------------------------------------------------------------------ */
/* The merge table */

typedef struct {  /* open addressing: 2^bits slots of (key, value), EMPTY keys free */
    uint64_t *slots;
    int bits;
} Table;

#define EMPTY UINT64_MAX  /* no pair's key: piece ids are below 2^32 - 1 */

static Py_ssize_t slot_of(uint64_t key, int bits) {
    return (Py_ssize_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - bits));
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
 * Returns 0, or -1 out of memory (an exception set). */
static int merge_word(const Table *t, uint32_t *sym, Py_ssize_t *len, Draws *d) {
    Py_ssize_t n = *len;
    if (n < 2)
        return 0;
    int64_t *pair = malloc(n * sizeof *pair);  /* pair[i]: symbols i and i+1, or -1 */
    char *looked = malloc(n);                 /* pairs dropped in this step */
    int status = 0;
    if (!pair || !looked)
        goto out_of_memory;
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
            if (r == NO_MEMORY)
                goto out_of_memory;
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
    goto done;
out_of_memory:
    PyErr_NoMemory();
    status = -1;
done:
    free(pair);
    free(looked);
    *len = n;
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* A caption's piece ids, a run of unknown pieces as one, up to ``limit`` of them */

typedef struct {
    uint32_t *v;
    Py_ssize_t n, cap, limit;
    int64_t unk;
} Ids;

/* Appends ``id``; 1 when the ids are full (``limit``), -1 out of memory. */
static int push(Ids *ids, uint32_t id) {
    if (id == ids->unk && ids->n && ids->v[ids->n - 1] == id)
        return 0;
    if (ids->n == ids->cap) {
        Py_ssize_t cap = 2 * ids->cap + 64;
        uint32_t *grown = realloc(ids->v, cap * sizeof *grown);
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        ids->v = grown, ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return ids->n >= ids->limit;
}

static int push_all(Ids *ids, const uint32_t *sym, Py_ssize_t len) {
    int r = 0;
    for (Py_ssize_t i = 0; i < len && r == 0; i++)
        r = push(ids, sym[i]);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* The merger: the merge table and the cache of words' plain BPE */

typedef struct {
    PyObject_HEAD
    Table pairs;
    uint32_t ascii[128];  /* the piece id of each ASCII character (unk: none) */
    PyObject *chars;      /* one-character pieces: str -> id */
    uint32_t unk;
    /* The words' cache: open addressing, 2^bits slots of (hash, where its entry is; hash 0 a free
     * slot), the entries one after another in ``arena`` (uint32s): the key's length in bytes, the
     * word's symbols, plain pieces and merges, the key (padded to 4 bytes), the symbols, the pieces. */
    uint64_t *slots;
    int bits;
    Py_ssize_t words, capacity;
    uint32_t *arena;
    Py_ssize_t used, room;
} Merger;

enum { KEY_LEN, SYMBOLS, PLAIN, MERGES, HEADER };

static uint64_t hash_of(const char *key, Py_ssize_t len) {  /* FNV-1a, never 0 */
    uint64_t h = 0xcbf29ce484222325ull;
    for (Py_ssize_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)key[i]) * 0x100000001b3ull;
    return h ? h : 1;
}

static const uint32_t *symbols_of(const uint32_t *e) { return e + HEADER + (e[KEY_LEN] + 3) / 4; }

/* A new entry for ``key`` in the arena (its offset), or -1 on an error (an exception set): the
 * key's characters as pieces, and plain BPE of them. */
static Py_ssize_t make_entry(Merger *m, const char *key, Py_ssize_t len) {
    PyObject *text = PyUnicode_DecodeUTF8(key, len, "strict");
    if (!text)
        return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), need = HEADER + (len + 3) / 4 + 2 * n;
    if (m->used + need > m->room) {
        Py_ssize_t room = 2 * (m->used + need) + 4096;
        uint32_t *grown = realloc(m->arena, room * sizeof *grown);
        if (!grown) {
            Py_DECREF(text);
            PyErr_NoMemory();
            return -1;
        }
        m->arena = grown, m->room = room;
    }
    uint32_t *e = m->arena + m->used;
    e[KEY_LEN] = (uint32_t)len, e[SYMBOLS] = (uint32_t)n;
    memset(e + HEADER, 0, (len + 3) / 4 * 4);
    memcpy(e + HEADER, key, len);
    uint32_t *sym = (uint32_t *)symbols_of(e);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ_CHAR(text, i);
        if (c < 128) {
            sym[i] = m->ascii[c];
            continue;
        }
        PyObject *one = PyUnicode_Substring(text, i, i + 1), *id = one ? PyDict_GetItemWithError(m->chars, one) : NULL;
        Py_XDECREF(one);
        if (!id && PyErr_Occurred()) {
            Py_DECREF(text);
            return -1;
        }
        sym[i] = id ? (uint32_t)PyLong_AsUnsignedLong(id) : m->unk;
    }
    Py_DECREF(text);
    uint32_t *plain = sym + n;
    Py_ssize_t pieces = n;
    Draws d = {.plain = 1};
    memcpy(plain, sym, n * sizeof *sym);
    if (merge_word(&m->pairs, plain, &pieces, &d) < 0)
        return -1;
    e[PLAIN] = (uint32_t)pieces, e[MERGES] = (uint32_t)d.pos;
    Py_ssize_t at = m->used;
    m->used += HEADER + (len + 3) / 4 + n + pieces;
    return at;
}

/* The entry of the word ``key`` (UTF-8), made when the cache has none; NULL on an error. The
 * pointer holds until the next call. */
static const uint32_t *entry_of(Merger *m, const char *key, Py_ssize_t len) {
    uint64_t h = hash_of(key, len), mask = ((uint64_t)1 << m->bits) - 1;
    Py_ssize_t i = (Py_ssize_t)(h >> (64 - m->bits));
    for (; m->slots[2 * i]; i = (i + 1) & mask) {
        const uint32_t *e = m->arena + m->slots[2 * i + 1];
        if (m->slots[2 * i] == h && e[KEY_LEN] == len && !memcmp(e + HEADER, key, len))
            return e;
    }
    if (m->words >= m->capacity) {  /* full: start again */
        memset(m->slots, 0, ((size_t)16) << m->bits);
        m->words = m->used = 0;
        i = (Py_ssize_t)(h >> (64 - m->bits));
    }
    Py_ssize_t at = make_entry(m, key, len);
    if (at < 0)
        return NULL;
    m->slots[2 * i] = h, m->slots[2 * i + 1] = (uint64_t)at;
    m->words++;
    return m->arena + at;
}

/* One word's pieces appended to ``ids``: plain BPE's merges take the next ``merges`` draws, one
 * each, and when none drops the plain pieces are the word's; after a drop the word is merged
 * again from its characters, the same draws deciding. 0, 1 when the ids are full, -1 on an
 * error (an exception set). */
static int word(Merger *m, const char *key, Py_ssize_t len, Draws *d, Ids *ids) {
    const uint32_t *e = entry_of(m, key, len);
    if (!e)
        return -1;
    const uint32_t *sym = symbols_of(e), *plain = sym + e[SYMBOLS];
    Py_ssize_t start = d->pos, n = e[SYMBOLS];
    int r = KEPT;
    for (uint32_t j = 0; j < e[MERGES] && (r = draw(d)) == KEPT; j++)
        ;
    if (r == NO_MEMORY) {
        PyErr_NoMemory();
        return -1;
    }
    if (r == KEPT)
        return push_all(ids, plain, e[PLAIN]);
    uint32_t *merged = malloc((n ? n : 1) * sizeof *merged);
    if (!merged) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(merged, sym, n * sizeof *merged);
    d->pos = start;
    r = merge_word(&m->pairs, merged, &n, d);
    if (r == 0)
        r = push_all(ids, merged, n);
    free(merged);
    return r;
}

static int Merger_init(Merger *m, PyObject *args, PyObject *kwds) {
    static char *names[] = {"keys", "values", "chars", "unk", "capacity", NULL};
    Py_buffer keys, values;
    PyObject *chars;
    unsigned long unk;
    Py_ssize_t capacity;
    if (m->slots) {
        PyErr_SetString(PyExc_RuntimeError, "_bpe.Merger is made once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*O!kn", names, &keys, &values, &PyDict_Type, &chars, &unk,
                                     &capacity))
        return -1;
    int status = -1;
    Py_ssize_t n = keys.len / 8;
    if (keys.len != values.len || keys.len % 8 || capacity < 1) {
        PyErr_SetString(PyExc_ValueError, "_bpe.Merger: keys and values are uint64 of one length; capacity >= 1");
        goto done;
    }
    for (m->pairs.bits = 1; ((Py_ssize_t)1 << m->pairs.bits) < 2 * n; m->pairs.bits++)  /* at most half full */
        ;
    for (m->bits = 1; ((Py_ssize_t)1 << m->bits) < 2 * capacity; m->bits++)
        ;
    m->pairs.slots = malloc((size_t)16 << m->pairs.bits);
    m->slots = calloc((size_t)2 << m->bits, sizeof *m->slots);
    if (!m->pairs.slots || !m->slots) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t mask = ((uint64_t)1 << m->pairs.bits) - 1, *slots = m->pairs.slots;
    const uint64_t *k = keys.buf, *v = values.buf;
    for (Py_ssize_t i = 0; i <= (Py_ssize_t)mask; i++)
        slots[2 * i] = EMPTY;
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t i = slot_of(k[j], m->pairs.bits);
        while (slots[2 * i] != EMPTY && slots[2 * i] != k[j])
            i = (i + 1) & mask;
        slots[2 * i] = k[j];
        slots[2 * i + 1] = v[j];
    }
    m->unk = (uint32_t)unk, m->capacity = capacity;
    Py_INCREF(chars);
    m->chars = chars;
    for (int c = 0; c < 128; c++) {
        char one[1] = {(char)c};
        PyObject *key = PyUnicode_FromStringAndSize(one, 1), *id = key ? PyDict_GetItemWithError(chars, key) : NULL;
        Py_XDECREF(key);
        if (!id && PyErr_Occurred())
            goto done;
        m->ascii[c] = id ? (uint32_t)PyLong_AsUnsignedLong(id) : m->unk;
    }
    status = PyErr_Occurred() ? -1 : 0;
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&values);
    return status;
}

static void Merger_dealloc(Merger *m) {
    free(m->pairs.slots);
    free(m->slots);
    free(m->arena);
    Py_XDECREF(m->chars);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int ready(Merger *m) {
    if (!m->slots)
        PyErr_SetString(PyExc_RuntimeError, "_bpe.Merger was not initialised");
    return m->slots != NULL;
}

static PyObject *Merger_dropout(Merger *m, PyObject *args) {
    PyObject *words, *result = NULL;
    Py_buffer seed;
    unsigned threshold;
    if (!ready(m) || !PyArg_ParseTuple(args, "O!y*I", &PyList_Type, &words, &seed, &threshold))
        return NULL;
    Draws d = {.threshold = threshold};
    Ids ids = {.limit = PY_SSIZE_T_MAX, .unk = m->unk};
    draws_start(&d, seed.buf, seed.len);
    for (Py_ssize_t w = 0; w < PyList_GET_SIZE(words); w++) {
        Py_ssize_t len;
        PyObject *item = PyList_GET_ITEM(words, w);
        const char *key = PyUnicode_Check(item) ? PyUnicode_AsUTF8AndSize(item, &len) : NULL;
        if (!key) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "_bpe.Merger.dropout: the words are str");
            goto done;
        }
        if (word(m, key, len, &d, &ids) < 0)
            goto done;
    }
    if (!(result = PyList_New(ids.n)))
        goto done;
    for (Py_ssize_t i = 0; i < ids.n; i++) {
        PyObject *id = PyLong_FromUnsignedLong(ids.v[i]);
        if (!id) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, id);
    }
done:
    free(ids.v);
    free(d.bytes);
    PyBuffer_Release(&seed);
    return result;
}

/* The caption's characters when ``encode`` does it (printable ASCII without '&'), else NULL. */
static const char *plain_ascii(PyObject *text, Py_ssize_t *len) {
    const char *s;
    if (PyBytes_Check(text)) {
        s = PyBytes_AS_STRING(text), *len = PyBytes_GET_SIZE(text);
    } else if (PyUnicode_Check(text) && PyUnicode_IS_COMPACT_ASCII(text)) {
        s = (const char *)PyUnicode_1BYTE_DATA(text), *len = PyUnicode_GET_LENGTH(text);
    } else {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *len; i++)
        if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '&')
            return NULL;
    return s;
}

static void store(char *out, int itemsize, Py_ssize_t i, uint64_t v) {
    if (itemsize == 2)
        ((uint16_t *)out)[i] = (uint16_t)v;
    else if (itemsize == 4)
        ((uint32_t *)out)[i] = (uint32_t)v;
    else
        ((uint64_t *)out)[i] = v;
}

static const char BLOCK[] = "\xe2\x96\x81";  /* U+2581 in UTF-8: what starts a word */

static PyObject *Merger_encode(Merger *m, PyObject *args) {
    PyObject *out_obj, *texts, *seeds, *left = NULL;
    Py_buffer out = {0};
    unsigned threshold;
    Py_ssize_t length;
    unsigned long long pad, offset;
    if (!ready(m) || !PyArg_ParseTuple(args, "OO!O!InKK", &out_obj, &PyList_Type, &texts, &PyList_Type, &seeds, &threshold,
                          &length, &pad, &offset))
        return NULL;
    Py_ssize_t rows = PyList_GET_SIZE(texts), room = 0;
    Draws d = {.threshold = threshold};
    Ids ids = {.limit = length, .unk = m->unk};
    char *key = NULL;  /* a word's key: U+2581 and its characters */
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    int itemsize = (int)out.itemsize;
    if ((itemsize != 2 && itemsize != 4 && itemsize != 8) || out.len != rows * length * itemsize
        || PyList_GET_SIZE(seeds) != rows || length < 1) {
        PyErr_Format(PyExc_ValueError, "_bpe.Merger.encode: %zd texts and seeds of %zd ids each need a buffer of "
                     "as many integers of 2, 4 or 8 bytes", rows, length);
        goto done;
    }
    if (!(left = PyList_New(0)))
        goto done;
    for (Py_ssize_t row = 0; row < rows; row++) {
        Py_ssize_t len;
        PyObject *seed = PyList_GET_ITEM(seeds, row);
        const char *s = plain_ascii(PyList_GET_ITEM(texts, row), &len);
        if (!s || !PyBytes_Check(seed)) {
            PyObject *r = PyLong_FromSsize_t(row);
            int failed = !r || PyList_Append(left, r) < 0;
            Py_XDECREF(r);
            if (failed)
                goto error;
            continue;
        }
        draws_start(&d, (const unsigned char *)PyBytes_AS_STRING(seed), PyBytes_GET_SIZE(seed));
        ids.n = 0;
        for (Py_ssize_t i = 0; i < len && ids.n < length;) {
            while (i < len && s[i] == ' ')
                i++;
            Py_ssize_t j = i;
            while (j < len && s[j] != ' ')
                j++;
            if (j == i)
                break;
            if (j - i + 3 > room) {
                char *grown = realloc(key, room = 2 * (j - i + 3) + 64);
                if (!grown) {
                    PyErr_NoMemory();
                    goto error;
                }
                key = grown;
            }
            memcpy(key, BLOCK, 3);
            memcpy(key + 3, s + i, j - i);
            if (word(m, key, j - i + 3, &d, &ids) < 0)
                goto error;
            i = j;
        }
        char *dst = (char *)out.buf + row * length * itemsize;
        for (Py_ssize_t i = 0; i < length; i++)
            store(dst, itemsize, i, (i < ids.n ? ids.v[i] : pad) + offset);
    }
    goto done;
error:
    Py_CLEAR(left);
done:
    free(key);
    free(ids.v);
    free(d.bytes);
    PyBuffer_Release(&out);
    return left;
}

static PyObject *Merger_words(Merger *m, void *Py_UNUSED(closure)) { return PyLong_FromSsize_t(m->words); }

static PyMethodDef merger_methods[] = {
    {"dropout", (PyCFunction)Merger_dropout, METH_VARARGS, "BPE-dropout of a caption's words: piece ids."},
    {"encode", (PyCFunction)Merger_encode, METH_VARARGS,
     "BPE-dropout of a batch of plain ASCII captions into a buffer: the rows left."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef merger_getset[] = {
    {"words", (getter)Merger_words, NULL, "Words whose plain BPE is cached.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MergerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lverse.preprocessing._bpe.Merger",
    .tp_basicsize = sizeof(Merger),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BPE-dropout's merge table and cache of words' plain BPE (see _bpe.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Merger_init,
    .tp_dealloc = (destructor)Merger_dealloc,
    .tp_methods = merger_methods,
    .tp_getset = merger_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bpe(void) {
    if (PyType_Ready(&MergerType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddObjectRef(mod, "Merger", (PyObject *)&MergerType) < 0)
        Py_CLEAR(mod);
    return mod;
}
