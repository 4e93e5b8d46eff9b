# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False, nonecheck=False
"""Compiled kernels for the score transformation (see ``muse/_transform.py``).

Two entry points per kernel, both over the same ``nogil`` loop:

* ``apply`` / ``correct_posterior`` / ``correct_margin`` take real numbers of
  any shape, read C-contiguous float64 and float32 arrays in place through
  the array C-API, and raise ``ValueError`` naming the first bad value.
  Acquiring a typed memoryview costs about 250 ns per argument here, more
  than mapping 64 scores, so the entry point the server calls on every
  request avoids it.
* ``*_into`` take typed memoryviews (``const floating[::1]`` in,
  ``double[::1]`` out), accept any 1-D buffer, and return the index of the
  first bad value, or -1.

Loops run on raw pointers, allocate nothing and touch no Python object.  They
count bad inputs (NaN, or a score outside [0, 1]) without branching on them,
and a second, cold pass finds the first one so Python can raise naming it.
``_reference.py`` is the pure-numpy twin; it also builds the segment table
used here, so the two share every constant.
"""

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cython cimport floating
from libc.math cimport exp, log

from muse._fast._reference import segment_table

cnp.import_array()

# Below this many values the GIL is kept: releasing and retaking it costs
# about as much as mapping a few hundred scores.
cdef Py_ssize_t NOGIL_MIN = 2048


cdef struct Segment:
    double x0
    double y0
    double slope
    double cap


cdef inline double _map_one(
    const double* bounds, Py_ssize_t nbounds, const Segment* segments, double x
) noexcept nogil:
    """min(y0 + slope * (x - x0), cap) on x's segment; x clamped into [0, 1]."""
    cdef Py_ssize_t j, s = 0
    # NaN lands on 0 here; the caller has already counted it.
    x = x if x > 0.0 else 0.0
    x = x if x < 1.0 else 1.0
    # Branch-free count of the bounds at or below x: with a handful of
    # knots this beats a binary search, whose branches mispredict on
    # unsorted scores.
    for j in range(nbounds):
        s += x >= bounds[j]
    cdef double y = segments[s].y0 + segments[s].slope * (x - segments[s].x0)
    return y if y < segments[s].cap else segments[s].cap


cdef Py_ssize_t _map_loop(
    const double* bounds,
    Py_ssize_t nbounds,
    const Segment* segments,
    const floating* x,
    double* out,
    Py_ssize_t n,
) noexcept nogil:
    """out[i] = map(x[i]); returns the number of NaN inputs."""
    cdef Py_ssize_t i, bad = 0
    cdef double v
    for i in range(n):
        v = x[i]
        bad += v != v
        out[i] = _map_one(bounds, nbounds, segments, v)
    return bad


cdef Py_ssize_t _posterior_loop(
    const floating* x, double beta, double* out, Py_ssize_t n
) noexcept nogil:
    """out[i] = 1 / (1 + (1 - y) / (beta * y)); returns the count outside [0, 1]."""
    cdef Py_ssize_t i, bad = 0
    cdef double y
    if beta == 1.0:
        # The formula is the identity only up to rounding; beta 1 is exact.
        for i in range(n):
            y = x[i]
            bad += not ((y >= 0.0) & (y <= 1.0))
            out[i] = y
        return bad
    for i in range(n):
        y = x[i]
        bad += not ((y >= 0.0) & (y <= 1.0))
        # y == 0 divides by zero: (1 - 0) / 0 is inf and the result 0.
        out[i] = 1.0 / (1.0 + (1.0 - y) / (beta * y))
    return bad


cdef Py_ssize_t _margin_loop(
    const floating* x, double log_beta, double* out, Py_ssize_t n
) noexcept nogil:
    """out[i] = 1 / (1 + exp(-(x[i] + log(beta)))); returns the NaN count."""
    cdef Py_ssize_t i, bad = 0
    cdef double z
    for i in range(n):
        z = x[i]
        bad += z != z
        out[i] = 1.0 / (1.0 + exp(-(z + log_beta)))
    return bad


cdef Py_ssize_t _first_bad(const floating* x, Py_ssize_t n, bint unit) noexcept nogil:
    """Index of the first NaN (or, if unit, the first value outside [0, 1])."""
    cdef Py_ssize_t i
    for i in range(n):
        if x[i] != x[i] or (unit and not (0.0 <= x[i] <= 1.0)):
            return i
    return -1


cdef cnp.ndarray _input(object values, str name):
    """values as a C-contiguous float64 (or float32) array, of any shape."""
    cdef cnp.ndarray array = <cnp.ndarray>(
        values if cnp.PyArray_Check(values) else cnp.PyArray_FROM_O(values)
    )
    cdef int kind = cnp.PyArray_TYPE(array)
    if (
        (kind == cnp.NPY_DOUBLE or kind == cnp.NPY_FLOAT)
        and cnp.PyArray_ISCARRAY_RO(array)
    ):
        return array
    # Strings parse as numbers under a plain cast; scores must be numbers.
    if kind == cnp.NPY_BOOL or not cnp.PyArray_CanCastSafely(kind, cnp.NPY_DOUBLE):
        raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
    return <cnp.ndarray>cnp.PyArray_FROMANY(
        array, cnp.NPY_DOUBLE, 0, 0, cnp.NPY_ARRAY_CARRAY_RO
    )


cdef cnp.ndarray _output(object out, cnp.ndarray like):
    """out checked against like's shape, or a new float64 array of it."""
    if out is None:
        return cnp.PyArray_EMPTY(
            cnp.PyArray_NDIM(like), cnp.PyArray_DIMS(like), cnp.NPY_DOUBLE, 0
        )
    if (
        not cnp.PyArray_Check(out)
        or not cnp.PyArray_ISCARRAY(<cnp.ndarray>out)
        or cnp.PyArray_TYPE(<cnp.ndarray>out) != cnp.NPY_DOUBLE
    ):
        raise TypeError("out must be a writeable C-contiguous float64 array")
    if not cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, like):
        raise ValueError(
            f"out has shape {out.shape}, expected {(<object>like).shape}"
        )
    return <cnp.ndarray>out


cdef inline Py_ssize_t _same_length(Py_ssize_t n, Py_ssize_t m) except -1:
    if n != m:
        raise ValueError(f"out has length {m}, expected {n}")
    return n


cdef inline int _check_beta(double beta) except -1:
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    return 0


cdef class MappingTable:
    """A piecewise-linear map through (0, 0), (knot, edge)..., (1, 1).

    Args:
        knots: raw-score knots, strictly increasing inside (0, 1).
        edges: mapped value at each knot, strictly increasing inside (0, 1).

    Raises:
        ValueError: as ``segment_table``.
    """

    cdef double* bounds
    cdef Segment* segments
    cdef Py_ssize_t nbounds
    cdef readonly tuple knots
    cdef readonly tuple edges

    def __cinit__(self):
        self.bounds = NULL
        self.segments = NULL

    def __init__(self, knots, edges):
        bounds, segments = segment_table(knots, edges)
        # __init__ may run again on the same object; drop the old table.
        PyMem_Free(self.bounds)
        PyMem_Free(self.segments)
        self.segments = NULL
        self.bounds = <double*>PyMem_Malloc(len(bounds) * sizeof(double))
        self.segments = <Segment*>PyMem_Malloc(len(segments) * sizeof(Segment))
        if self.bounds == NULL or self.segments == NULL:
            PyMem_Free(self.bounds)
            PyMem_Free(self.segments)
            self.bounds = self.segments = NULL
            raise MemoryError()
        for j, b in enumerate(bounds):
            self.bounds[j] = b
        for j, (x0, y0, slope, cap) in enumerate(segments):
            self.segments[j] = Segment(x0, y0, slope, cap)
        self.nbounds = len(bounds)
        self.knots = tuple([float(k) for k in knots])
        self.edges = tuple([float(e) for e in edges])

    def __dealloc__(self):
        PyMem_Free(self.bounds)
        PyMem_Free(self.segments)

    def __reduce__(self):
        return (MappingTable, (self.knots, self.edges))

    def apply(self, scores, out=None):
        """Map scores; scores outside [0, 1] (infinities too) clamp to 0 or 1.

        Args:
            scores: real numbers, any shape; C-contiguous float64 and float32
                arrays are read in place, anything else is converted.
            out: float64 array of the same shape to write into, or None.

        Returns:
            ``out``, or a new float64 array of the scores' shape.

        Raises:
            TypeError: ``scores`` are not real numbers, or ``out`` is not a
                writeable C-contiguous float64 array.
            ValueError: shapes differ, or a score is NaN (the message names
                the first, by flat index).
        """
        self._check_ready()
        cdef cnp.ndarray x = _input(scores, "scores")
        cdef cnp.ndarray result = _output(out, x)
        cdef double* y = <double*>cnp.PyArray_DATA(result)
        cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
        cdef Py_ssize_t index
        if cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE:
            index = _map(self, <const double*>cnp.PyArray_DATA(x), y, n)
        else:
            index = _map(self, <const float*>cnp.PyArray_DATA(x), y, n)
        if index >= 0:
            raise ValueError(f"score at index {index} is NaN")
        return result

    def apply_into(self, const floating[::1] scores, double[::1] out):
        """``apply`` for any 1-D buffers; returns the first NaN's index or -1."""
        self._check_ready()
        cdef Py_ssize_t n = _same_length(scores.shape[0], out.shape[0])
        if n == 0:
            return -1
        return _map(self, &scores[0], &out[0], n)

    cdef int _check_ready(self) except -1:
        # Only MappingTable.__new__ without __init__ (or a failed re-init)
        # leaves no table; the loop must never see that.
        if self.segments == NULL:
            raise ValueError("MappingTable has no table: __init__ did not complete")
        return 0


cdef Py_ssize_t _map(
    MappingTable table, const floating* x, double* out, Py_ssize_t n
) noexcept:
    """out = table's map of x; returns the first NaN's index or -1."""
    cdef Py_ssize_t bad
    if n < NOGIL_MIN:
        bad = _map_loop(table.bounds, table.nbounds, table.segments, x, out, n)
    else:
        with nogil:
            bad = _map_loop(table.bounds, table.nbounds, table.segments, x, out, n)
    return _first_bad(x, n, False) if bad else -1


def correct_posterior(scores, double beta, out=None):
    """``beta*y / (beta*y + (1 - y))``, as ``1 / (1 + (1 - y) / (beta*y))``.

    Every step of the second form is a monotone rounding of a monotone
    function, so the result never decreases as ``y`` grows, and 0 and 1 map
    to exactly 0 and 1.  ``beta == 1`` copies the scores unchanged.

    Args:
        scores: real numbers in [0, 1], any shape (as ``MappingTable.apply``).
        beta: share of negatives kept at training, in (0, 1].
        out: float64 array of the same shape to write into, or None.

    Returns:
        ``out``, or a new float64 array of the scores' shape.

    Raises:
        TypeError: as ``MappingTable.apply``.
        ValueError: ``beta`` is outside (0, 1], shapes differ, or a score is
            NaN or outside [0, 1] (the message names the first, by flat
            index).
    """
    _check_beta(beta)
    cdef cnp.ndarray x = _input(scores, "scores")
    cdef cnp.ndarray result = _output(out, x)
    cdef double* y = <double*>cnp.PyArray_DATA(result)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
    cdef Py_ssize_t index
    if cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE:
        index = _posterior(<const double*>cnp.PyArray_DATA(x), beta, y, n)
    else:
        index = _posterior(<const float*>cnp.PyArray_DATA(x), beta, y, n)
    if index >= 0:
        value = float(x.reshape(-1)[index])
        raise ValueError(f"score at index {index} is {value!r}, not in [0, 1]")
    return result


def correct_posterior_into(const floating[::1] scores, double beta, double[::1] out):
    """``correct_posterior`` for any 1-D buffers; returns the first bad index or -1."""
    _check_beta(beta)
    cdef Py_ssize_t n = _same_length(scores.shape[0], out.shape[0])
    if n == 0:
        return -1
    return _posterior(&scores[0], beta, &out[0], n)


cdef Py_ssize_t _posterior(
    const floating* x, double beta, double* out, Py_ssize_t n
) noexcept:
    cdef Py_ssize_t bad
    if n < NOGIL_MIN:
        bad = _posterior_loop(x, beta, out, n)
    else:
        with nogil:
            bad = _posterior_loop(x, beta, out, n)
    return _first_bad(x, n, True) if bad else -1


def correct_margin(margins, double beta, out=None):
    """``sigmoid(margin + log(beta))``: the corrected score from a raw margin.

    Exact where the probability has already rounded to 1: a margin of 40
    still tells events apart that ``sigmoid`` would tie.

    Args:
        margins: real numbers, any shape; infinities allowed.
        beta: share of negatives kept at training, in (0, 1].
        out: float64 array of the same shape to write into, or None.

    Returns:
        ``out``, or a new float64 array of the margins' shape.

    Raises:
        TypeError: as ``MappingTable.apply``.
        ValueError: ``beta`` is outside (0, 1], shapes differ, or a margin
            is NaN (the message names the first, by flat index).
    """
    _check_beta(beta)
    cdef cnp.ndarray x = _input(margins, "margins")
    cdef cnp.ndarray result = _output(out, x)
    cdef double* y = <double*>cnp.PyArray_DATA(result)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
    cdef Py_ssize_t index
    if cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE:
        index = _margin(<const double*>cnp.PyArray_DATA(x), log(beta), y, n)
    else:
        index = _margin(<const float*>cnp.PyArray_DATA(x), log(beta), y, n)
    if index >= 0:
        raise ValueError(f"margin at index {index} is NaN")
    return result


def correct_margin_into(const floating[::1] margins, double beta, double[::1] out):
    """``correct_margin`` for any 1-D buffers; returns the first NaN's index or -1."""
    _check_beta(beta)
    cdef Py_ssize_t n = _same_length(margins.shape[0], out.shape[0])
    if n == 0:
        return -1
    return _margin(&margins[0], log(beta), &out[0], n)


cdef Py_ssize_t _margin(
    const floating* x, double log_beta, double* out, Py_ssize_t n
) noexcept:
    cdef Py_ssize_t bad
    if n < NOGIL_MIN:
        bad = _margin_loop(x, log_beta, out, n)
    else:
        with nogil:
            bad = _margin_loop(x, log_beta, out, n)
    return _first_bad(x, n, False) if bad else -1
