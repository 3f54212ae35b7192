/*
 * Prompt token ids at C speed (nanovllm/inputs.py loads this through ctypes.PyDLL: the GIL is
 * held and Python exceptions pass through). A long prompt given as a list of ints costs the
 * host one Python-level check and one conversion per token otherwise (about 60 ns a token:
 * 60 ms for 512 prompts of 2,048 tokens, all before the first step); here both are one pass.
 *
 *   token_bytes(list, vocab)  the items as native int64 bytes if every one is an exact int in
 *                             [0, vocab), else None
 *   untrack(list)             take a list of exact ints out of the cyclic garbage collector's
 *                             sight (1 if it did): ints cannot form a cycle, and every pass of
 *                             the collector would walk each element (a million for 512
 *                             prompts of 2,048 tokens; see utils/collector.py). CPython does
 *                             the same for tuples and dicts of atomic values by itself. Used
 *                             on the engine's own copies of token ids.
 *   copy_ids(list)            a new list of the same items, untracked, if every item is an
 *                             exact int, else None: the check, the copy and untrack in one
 *                             pass (each pass touches every int object: a few ms for 512
 *                             prompts of 2,048 tokens, before the first step).
 * Anything else (tuples, numpy integers, bools, out-of-range ids) is left to the Python path,
 * which accepts or names it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* 1 if every item is an exact int (not a bool or other subclass), else 0 (untrack's check). */
static int exact_ints(PyObject *list) {
    if (!PyList_CheckExact(list))
        return 0;
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyLong_CheckExact(PyList_GET_ITEM(list, i)))
            return 0;
    return 1;
}

/* An exact int's value when it fits one internal digit (every token id does), read directly;
 * else through the API (about 3x slower a token, measured on 512 prompts of 2,048 ids). */
static inline long long int_value(PyObject *item, int *overflow) {
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)item))
        return (long long)PyUnstable_Long_CompactValue((PyLongObject *)item);
#else
    Py_ssize_t size = Py_SIZE(item);
    if (size == 0)
        return 0;
    if (size == 1)
        return (long long)((PyLongObject *)item)->ob_digit[0];
    if (size == -1)
        return -(long long)((PyLongObject *)item)->ob_digit[0];
#endif
    return PyLong_AsLongLongAndOverflow(item, overflow);
}

PyObject *token_bytes(PyObject *list, int64_t vocab) {
    if (!PyList_CheckExact(list))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (out == NULL)
        return NULL;
    int64_t *dst = (int64_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        int overflow = 0;
        if (!PyLong_CheckExact(item))
            goto refuse;
        long long v = int_value(item, &overflow);
        if (overflow || v < 0 || v >= vocab)  /* (an exact int sets no error) */
            goto refuse;
        dst[i] = (int64_t)v;
    }
    return out;
refuse:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

int untrack(PyObject *list) {
    if (!PyList_CheckExact(list) || !PyObject_GC_IsTracked(list) || !exact_ints(list))
        return 0;
    PyObject_GC_UnTrack(list);
    return 1;
}

PyObject *copy_ids(PyObject *list) {
    if (!PyList_CheckExact(list))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *out = PyList_New(n);  /* items NULL until set: freed fine if refused midway */
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyLong_CheckExact(item)) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        Py_INCREF(item);
        PyList_SET_ITEM(out, i, item);
    }
    PyObject_GC_UnTrack(out);
    return out;
}
