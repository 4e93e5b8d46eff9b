# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False, nonecheck=False
"""Compiled reader of plain msgpack scoring bodies (see ``muse/_events.py``).

``read_score_body`` walks a ``/v1/score`` body once, straight from its bytes,
and writes the feature values into a float64 table: no Python dict or float
is made per event, which is most of the cost of decoding a batch with
``msgpack.unpackb`` and then reading the dicts back.

It reads only the plain shape nearly every client sends: a map of
``intent`` (string), ``events`` (array) and maybe ``deadline_ms``; events
that are maps of ``id`` (string, integer or nil) and ``features``; features
keyed by strings, valued by floats, integers within 2**53 of zero, or nil.
Anything else (another type, another key, a duplicate field, trailing bytes,
a batch over the limit, invalid UTF-8) returns None and the caller decodes
the body the general way, which accepts or refuses it with a message that
names the fault.  Returning None is therefore always safe; accepting is
only allowed where the general path would give the same values.

``read_event_dicts`` is the same idea for events that are already Python
mappings (an application embedding the engine): values are read straight
into the matrix, and anything ``build_matrix`` would refuse or coerce
returns None for it to handle.  ``matrix_flags`` checks model input in one
pass.  ``_events_reference.py`` is the pure-Python twin of all three.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_Next
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport NAN, isfinite
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy

import numpy as np

cimport numpy as cnp

cnp.import_array()

# Distinct feature names one body may use before the general path takes
# over; a model has 15, and a table this wide is a client bug, not a batch.
cdef Py_ssize_t MAX_NAMES = 256
# Integers beyond this have no exact float64 (the general path says so).
cdef int64_t MAX_EXACT_INT = 1LL << 53

# What a value reader found.
cdef enum Kind:
    OTHER = -1
    NIL = 0
    NUMBER = 1


cdef struct Reader:
    const unsigned char* data
    Py_ssize_t pos
    Py_ssize_t end


cdef struct Name:
    Py_ssize_t offset  # where the name's bytes sit in the body
    Py_ssize_t size


cdef inline uint64_t _be(const unsigned char* p, int n) noexcept nogil:
    cdef uint64_t value = 0
    cdef int i
    for i in range(n):
        value = (value << 8) | p[i]
    return value


cdef inline Py_ssize_t _container(
    Reader* r, unsigned char fix_low, unsigned char fix_high,
    unsigned char code16, unsigned char code32,
) noexcept nogil:
    """Length of a map or array header (by its codes), or -1."""
    cdef unsigned char c
    if r.pos >= r.end:
        return -1
    c = r.data[r.pos]
    if fix_low <= c <= fix_high:
        r.pos += 1
        return c - fix_low
    if c == code16 and r.end - r.pos >= 3:
        r.pos += 3
        return <Py_ssize_t>_be(r.data + r.pos - 2, 2)
    if c == code32 and r.end - r.pos >= 5:
        r.pos += 5
        return <Py_ssize_t>_be(r.data + r.pos - 4, 4)
    return -1


cdef inline Py_ssize_t _map(Reader* r) noexcept nogil:
    return _container(r, 0x80, 0x8F, 0xDE, 0xDF)


cdef inline Py_ssize_t _array(Reader* r) noexcept nogil:
    return _container(r, 0x90, 0x9F, 0xDC, 0xDD)


cdef inline Py_ssize_t _str(Reader* r, Py_ssize_t* offset) noexcept nogil:
    """Length of a string (its bytes start at ``offset``), or -1."""
    cdef unsigned char c
    cdef Py_ssize_t size, head
    if r.pos >= r.end:
        return -1
    c = r.data[r.pos]
    if 0xA0 <= c <= 0xBF:
        head = 1
        size = c - 0xA0
    elif c == 0xD9 and r.end - r.pos >= 2:
        head = 2
        size = r.data[r.pos + 1]
    elif c == 0xDA and r.end - r.pos >= 3:
        head = 3
        size = <Py_ssize_t>_be(r.data + r.pos + 1, 2)
    elif c == 0xDB and r.end - r.pos >= 5:
        head = 5
        size = <Py_ssize_t>_be(r.data + r.pos + 1, 4)
    else:
        return -1
    if r.end - r.pos - head < size:
        return -1
    offset[0] = r.pos + head
    r.pos += head + size
    return size


cdef inline bint _int(Reader* r, int64_t* out, bint* unsigned_big) noexcept nogil:
    """Read any msgpack integer; False when the next value is not one.

    ``unsigned_big`` is set for a uint64 above INT64_MAX (then ``out`` holds
    its bits).
    """
    cdef unsigned char c
    cdef Py_ssize_t left
    cdef uint64_t u
    if r.pos >= r.end:
        return False
    c = r.data[r.pos]
    left = r.end - r.pos - 1
    unsigned_big[0] = False
    if c <= 0x7F:
        out[0] = c
        r.pos += 1
    elif c >= 0xE0:
        out[0] = <int64_t>c - 256
        r.pos += 1
    elif c == 0xCC and left >= 1:
        out[0] = r.data[r.pos + 1]
        r.pos += 2
    elif c == 0xCD and left >= 2:
        out[0] = <int64_t>_be(r.data + r.pos + 1, 2)
        r.pos += 3
    elif c == 0xCE and left >= 4:
        out[0] = <int64_t>_be(r.data + r.pos + 1, 4)
        r.pos += 5
    elif c == 0xCF and left >= 8:
        u = _be(r.data + r.pos + 1, 8)
        out[0] = <int64_t>u
        unsigned_big[0] = u > <uint64_t>0x7FFFFFFFFFFFFFFF
        r.pos += 9
    elif c == 0xD0 and left >= 1:
        out[0] = <signed char>r.data[r.pos + 1]
        r.pos += 2
    elif c == 0xD1 and left >= 2:
        out[0] = <short>(<unsigned short>_be(r.data + r.pos + 1, 2))
        r.pos += 3
    elif c == 0xD2 and left >= 4:
        out[0] = <int>(<unsigned int>_be(r.data + r.pos + 1, 4))
        r.pos += 5
    elif c == 0xD3 and left >= 8:
        out[0] = <int64_t>_be(r.data + r.pos + 1, 8)
        r.pos += 9
    else:
        return False
    return True


cdef inline Kind _number(Reader* r, double* out) noexcept nogil:
    """A feature value: a float, an exactly representable integer, or nil."""
    cdef unsigned char c
    cdef uint64_t bits
    cdef unsigned int bits32
    cdef float single
    cdef int64_t whole
    cdef bint big
    if r.pos >= r.end:
        return OTHER
    c = r.data[r.pos]
    if c == 0xCB:
        if r.end - r.pos < 9:
            return OTHER
        bits = _be(r.data + r.pos + 1, 8)
        memcpy(out, &bits, 8)
        r.pos += 9
        return NUMBER
    if c == 0xC0:
        r.pos += 1
        out[0] = NAN
        return NIL
    if c == 0xCA:
        if r.end - r.pos < 5:
            return OTHER
        bits32 = <unsigned int>_be(r.data + r.pos + 1, 4)
        memcpy(&single, &bits32, 4)
        out[0] = single
        r.pos += 5
        return NUMBER
    if _int(r, &whole, &big):
        if big or whole > MAX_EXACT_INT or whole < -MAX_EXACT_INT:
            return OTHER
        out[0] = <double>whole
        return NUMBER
    return OTHER


cdef inline bint _is(Reader* r, Py_ssize_t offset, Py_ssize_t size,
                     const char* word, Py_ssize_t word_size) noexcept nogil:
    return size == word_size and memcmp(r.data + offset, word, size) == 0


cdef class _Table:
    """Rows of feature values, one column per name seen, NaN where absent."""

    cdef double* cells
    cdef Py_ssize_t rows
    cdef Py_ssize_t width      # columns allocated per row
    cdef Py_ssize_t used       # columns named so far
    cdef Name* names

    def __cinit__(self, Py_ssize_t rows, Py_ssize_t width):
        self.rows = rows
        self.width = width
        self.used = 0
        self.cells = <double*>PyMem_Malloc(rows * width * sizeof(double))
        self.names = <Name*>PyMem_Malloc(MAX_NAMES * sizeof(Name))
        if self.cells == NULL or self.names == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.cells)
        PyMem_Free(self.names)

    cdef int widen(self) except -1:
        """Double the columns per row, keeping every row's values."""
        cdef Py_ssize_t width = min(self.width * 2, MAX_NAMES)
        cdef Py_ssize_t row, col
        cdef double* cells = <double*>PyMem_Realloc(
            self.cells, self.rows * width * sizeof(double)
        )
        if cells == NULL:
            raise MemoryError()
        self.cells = cells
        # Rows move from the last down, so none is overwritten before it moves.
        for row in range(self.rows - 1, -1, -1):
            for col in range(self.width - 1, -1, -1):
                cells[row * width + col] = cells[row * self.width + col]
            for col in range(self.width, width):
                cells[row * width + col] = NAN
        self.width = width
        return 0

    cdef Py_ssize_t find(self, Reader* r, Py_ssize_t offset, Py_ssize_t size,
                         Py_ssize_t hint) noexcept nogil:
        """The column of a name, trying ``hint`` (same place as last event) first."""
        cdef Py_ssize_t col
        if hint < self.used and self.names[hint].size == size and memcmp(
            r.data + self.names[hint].offset, r.data + offset, size
        ) == 0:
            return hint
        for col in range(self.used):
            if self.names[col].size == size and memcmp(
                r.data + self.names[col].offset, r.data + offset, size
            ) == 0:
                return col
        return -1


def read_score_body(bytes body not None, Py_ssize_t max_events):
    """Read a plain msgpack scoring body, or return None.

    Args:
        body: the whole request body.
        max_events: the batch limit; a larger batch returns None.

    Returns:
        ``(intent, deadline_ms, labels, names, values)``: the intent, the
        deadline (float or None), each event's id (its index where it has
        none), the feature names in first-seen order, and a float64 array
        of shape (events, names) with NaN for absent and nil values.  None
        when the body is not of the plain shape (see the module).
    """
    cdef Reader r
    r.data = <const unsigned char*>PyBytes_AS_STRING(body)
    r.pos = 0
    r.end = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t fields = _map(&r)
    cdef Py_ssize_t i, offset, size
    cdef object intent = None
    cdef object deadline = None
    cdef bint seen_deadline = False
    cdef double number
    cdef Kind kind
    result = None
    if fields < 1 or fields > 3:
        return None
    for i in range(fields):
        size = _str(&r, &offset)
        if size < 0:
            return None
        if _is(&r, offset, size, b"intent", 6):
            if intent is not None:
                return None
            size = _str(&r, &offset)
            if size <= 0:
                return None
            try:
                intent = body[offset:offset + size].decode("utf-8")
            except UnicodeDecodeError:
                return None
        elif _is(&r, offset, size, b"deadline_ms", 11):
            if seen_deadline:
                return None
            seen_deadline = True
            kind = _number(&r, &number)
            if kind == NUMBER:
                if not (number > 0 and isfinite(number)):
                    return None
                deadline = number
            elif kind != NIL:
                return None
        elif _is(&r, offset, size, b"events", 6):
            if result is not None:
                return None
            result = _read_events(&r, body, max_events)
            if result is None:
                return None
        else:
            return None
    if r.pos != r.end or intent is None or result is None:
        return None
    labels, names, values = result
    return intent, deadline, labels, names, values


cdef object _read_events(Reader* r, bytes body, Py_ssize_t max_events):
    cdef Py_ssize_t count = _array(r)
    cdef Py_ssize_t row, col, k, keys, features, offset, size, hint
    cdef _Table table
    cdef int64_t whole
    cdef bint big, seen_id, seen_features
    cdef double value
    cdef Reader first
    if count < 1 or count > max_events:
        return None
    # Size the table on the first event's feature count; clients send the
    # same features in every event, so it rarely has to widen.
    first = r[0]
    table = _Table(count, max(1, min(_first_width(&first), MAX_NAMES)))
    labels = []
    for row in range(count):
        for col in range(table.width):
            table.cells[row * table.width + col] = NAN
        keys = _map(r)
        if keys < 0:
            return None
        seen_id = seen_features = False
        label = row
        for k in range(keys):
            size = _str(r, &offset)
            if size < 0:
                return None
            if _is(r, offset, size, b"id", 2):
                if seen_id:
                    return None
                seen_id = True
                if r.pos < r.end and r.data[r.pos] == 0xC0:
                    r.pos += 1
                    continue
                size = _str(r, &offset)
                if size >= 0:
                    try:
                        label = body[offset:offset + size].decode("utf-8")
                    except UnicodeDecodeError:
                        return None
                elif _int(r, &whole, &big):
                    label = (
                        PyLong_FromUnsignedLongLong(<uint64_t>whole) if big
                        else PyLong_FromLongLong(whole)
                    )
                else:
                    return None
            elif _is(r, offset, size, b"features", 8):
                if seen_features:
                    return None
                seen_features = True
                features = _map(r)
                if features < 0:
                    return None
                for hint in range(features):
                    size = _str(r, &offset)
                    if size < 0:
                        return None
                    col = table.find(r, offset, size, hint)
                    if col < 0:
                        col = _add_name(table, r, body, offset, size)
                        if col < 0:
                            return None
                    if _number(r, &value) == OTHER:
                        return None
                    table.cells[row * table.width + col] = value
            else:
                return None
        if not seen_features:
            return None
        labels.append(label)
    return labels, table_names(table, body), _to_array(table)


cdef Py_ssize_t _first_width(Reader* r) noexcept nogil:
    """How many features the first event has (0 when that is not plain)."""
    cdef Py_ssize_t keys, k, size, offset
    cdef int64_t whole
    cdef bint big
    if _array(r) < 0:
        return 0
    keys = _map(r)
    for k in range(keys):
        size = _str(r, &offset)
        if size < 0:
            return 0
        if _is(r, offset, size, b"features", 8):
            return max(0, _map(r))
        # Skip the id (the only other plain key): nil, string or integer.
        if r.pos < r.end and r.data[r.pos] == 0xC0:
            r.pos += 1
        elif _str(r, &offset) < 0 and not _int(r, &whole, &big):
            return 0
    return 0


cdef Py_ssize_t _add_name(_Table table, Reader* r, bytes body,
                          Py_ssize_t offset, Py_ssize_t size) except -2:
    if table.used == MAX_NAMES:
        return -1
    try:
        body[offset:offset + size].decode("utf-8")
    except UnicodeDecodeError:
        return -1
    if table.used == table.width:
        table.widen()
    table.names[table.used].offset = offset
    table.names[table.used].size = size
    table.used += 1
    return table.used - 1


cdef list table_names(_Table table, bytes body):
    cdef Py_ssize_t col
    return [
        body[table.names[col].offset:table.names[col].offset
             + table.names[col].size].decode("utf-8")
        for col in range(table.used)
    ]


cdef object _to_array(_Table table):
    cdef cnp.ndarray out = np.empty((table.rows, table.used), dtype=np.float64)
    cdef double* dst = <double*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t row
    for row in range(table.rows):
        memcpy(dst + row * table.used, table.cells + row * table.width,
               table.used * sizeof(double))
    return out


# -- checks on model input ------------------------------------------------------

# ``matrix_flags`` bits.
cdef enum:
    _INFINITY = 1
    _MISSING = 2
    _EMPTY_ROW = 4

HAS_INFINITY = _INFINITY
HAS_MISSING = _MISSING
HAS_EMPTY_ROW = _EMPTY_ROW


cdef inline int _value_flags(double value, Py_ssize_t* present) noexcept nogil:
    """The ``matrix_flags`` bits one value sets; a value not missing is
    counted in ``present``."""
    if value != value:
        return _MISSING
    present[0] += 1
    if value - value != 0:  # only infinities give NaN here
        return _INFINITY
    return 0


def matrix_flags(cnp.ndarray matrix not None):
    """What a C-contiguous float64 2-D matrix holds that a model may refuse.

    Returns:
        ``HAS_INFINITY | HAS_MISSING | HAS_EMPTY_ROW`` bits: some value is
        infinite, some is NaN, some row is NaN throughout.  One pass, where
        numpy needs five calls; the caller looks for the culprit only when
        a bit is set.
    """
    if (
        cnp.PyArray_TYPE(matrix) != cnp.NPY_DOUBLE
        or cnp.PyArray_NDIM(matrix) != 2
        or not cnp.PyArray_IS_C_CONTIGUOUS(matrix)
    ):
        raise ValueError("expected a C-contiguous float64 2-D array")
    cdef const double* cells = <const double*>cnp.PyArray_DATA(matrix)
    cdef Py_ssize_t rows = cnp.PyArray_DIM(matrix, 0)
    cdef Py_ssize_t cols = cnp.PyArray_DIM(matrix, 1)
    cdef Py_ssize_t row, col, present
    cdef int flags = 0
    with nogil:
        for row in range(rows):
            present = 0
            for col in range(cols):
                flags |= _value_flags(cells[row * cols + col], &present)
            if present == 0:
                flags |= _EMPTY_ROW
    return flags


# -- events already decoded ----------------------------------------------------------


def read_event_dicts(events, tuple names not None):
    """Model input from events that are Python dicts, or None.

    Args:
        events: a list or tuple of ``{"id": ..., "features": {...}}`` dicts.
        names: the feature names, in the model's column order.

    Returns:
        ``(labels, matrix, flags)``: each event's id (its index where it has
        none or nil), a float64 matrix with NaN for absent, nil and NaN
        values, and the matrix's ``matrix_flags``, found on the way.  None
        when any event is not of the plain shape (a dict with string keys
        whose ``features`` is a dict with string keys, an id that is a
        string, an integer or nil, and a float, nil or exactly representable
        integer under each of ``names``): ``build_matrix`` then decides.
    """
    if type(events) is not list and type(events) is not tuple:
        return None
    cdef Py_ssize_t count = len(events), width = len(names)
    cdef Py_ssize_t row, col, pos, present
    cdef PyObject* key
    cdef PyObject* item
    cdef PyObject* found
    cdef int overflow
    cdef int flags = 0
    cdef long long whole
    cdef double value
    cdef cnp.npy_intp dims[2]
    dims[0] = count
    dims[1] = width
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)
    cdef double* cells = <double*>cnp.PyArray_DATA(out)
    labels = []
    for row in range(count):
        event = events[row]
        if type(event) is not dict:
            return None
        pos = 0
        while PyDict_Next(event, &pos, &key, &item):
            if type(<object>key) is not str:
                return None
        label = row
        found = PyDict_GetItem(event, "id")
        if found != NULL and <object>found is not None:
            if type(<object>found) is not str and type(<object>found) is not int:
                return None
            label = <object>found
        found = PyDict_GetItem(event, "features")
        if found == NULL or type(<object>found) is not dict:
            return None
        features = <object>found
        pos = 0
        while PyDict_Next(features, &pos, &key, &item):
            if type(<object>key) is not str:
                return None
        present = 0
        for col in range(width):
            found = PyDict_GetItem(features, names[col])
            if found == NULL or <object>found is None:
                value = NAN
            elif type(<object>found) is float:
                value = PyFloat_AS_DOUBLE(<object>found)
            elif type(<object>found) is int:
                whole = PyLong_AsLongLongAndOverflow(<object>found, &overflow)
                if overflow or whole > MAX_EXACT_INT or whole < -MAX_EXACT_INT:
                    return None
                value = <double>whole
            else:
                return None
            flags |= _value_flags(value, &present)
            cells[row * width + col] = value
        if present == 0:
            flags |= _EMPTY_ROW
        labels.append(label)
    return labels, out, flags
