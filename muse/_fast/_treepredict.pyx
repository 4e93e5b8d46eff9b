# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False, nonecheck=False
"""Compiled loop over a model library built by ``muse/_compile.py``.

The library is tl2cgen's generated C after MUSE's patch; besides tl2cgen's
``predict`` it exports the three pieces ``predict`` is made of:
``muse_init(result)`` (zero, then the base score), one
``predict_unit<k>(entries, result)`` per group of trees, and
``muse_finish(result, pred_margin)`` (averaging, postprocessor unless a
margin is asked for).  ``TreeKernel`` receives their addresses from ctypes
and runs them over blocks of rows: every unit runs over the whole block
before the next unit starts, so a unit's machine code is fetched once per
block rather than once per row.  Each row still sees exactly the operations
``predict`` would perform, in the same order, so results are bit-identical
to calling ``predict`` row by row (what the ctypes twin in ``_compile.py``
does).

Rows reach the library as tl2cgen's ``union Entry``: after the patch that
union holds only ``fvalue`` (float for XGBoost models, double otherwise) and
NaN is the only missing value; nothing here writes a sentinel.  LightGBM
predictor reads any |x| <= 1e-35 as 0.0, and zero_as_missing features read
it as missing; rows are filled the same way.

The loop holds no Python object, allocates nothing per row and releases the
GIL.  The entry point reads its array through the numpy C-API rather than a
typed memoryview: acquiring a memoryview costs a few hundred nanoseconds,
which is a large share of a single-row call.
"""

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport NAN, fabs
from libc.stdint cimport uintptr_t

import numpy as np

cnp.import_array()

# Rows per block.  The longer a unit runs over consecutive rows, the better
# its code and branch history stay warm: on a 200-tree XGBoost model a
# block of 64 rows took 2.4 us/row, 1024 rows 1.7, 4096 rows 1.6; a
# 63-leaf LightGBM model went from 3.9 to 2.8.  The rows' Entry buffers are
# read in order, so prefetching hides them even outside L1; the bytes cap
# keeps a block of very wide rows within L2.
cdef Py_ssize_t BLOCK_BYTES = 256 * 1024
cdef Py_ssize_t MIN_BLOCK_ROWS = 64
cdef Py_ssize_t MAX_BLOCK_ROWS = 4096

# LightGBM's kZeroThreshold: the float 1e-35f widened to double.  LightGBM's
# IsZero is -kZeroThreshold <= x <= kZeroThreshold.
cdef double ZERO_THRESHOLD = 1.0000000180025095e-35
# Modes of ``zeros`` (see ``_compile.py``): 1 reads tiny values as 0.0.
cdef unsigned char ZEROS_ARE_MISSING = 2

ctypedef fused entry_t:
    float
    double

# The generated functions take ``union Entry*`` and ``float*`` or
# ``double*``; passed as void* here, which the C ABI treats alike.
ctypedef void (*init_fn)(void* result) noexcept nogil
ctypedef void (*unit_fn)(void* entries, void* result) noexcept nogil
ctypedef void (*finish_fn)(void* result, int pred_margin) noexcept nogil


cdef struct Library:
    init_fn init
    finish_fn finish
    unit_fn* units
    Py_ssize_t num_units
    Py_ssize_t num_feature
    Py_ssize_t result_size
    Py_ssize_t out_index
    const unsigned char* zeros   # NULL, or a ZEROS_* mode per feature


cdef inline void _fill(
    const Library* lib, const double* row, entry_t* entries
) noexcept nogil:
    """entries[j] = row[j] in the library's precision, zeros as LightGBM's."""
    cdef Py_ssize_t j
    cdef double value
    for j in range(lib.num_feature):
        value = row[j]
        if lib.zeros != NULL and lib.zeros[j] and fabs(value) <= ZERO_THRESHOLD:
            value = NAN if lib.zeros[j] == ZEROS_ARE_MISSING else 0.0
        entries[j] = <entry_t>value


cdef void _run_block(
    const Library* lib,
    const double* rows,
    Py_ssize_t count,
    bint margin,
    entry_t* entries,
    entry_t* results,
    double* out,
) noexcept nogil:
    """Predict ``count`` consecutive rows (one block) into ``out``."""
    cdef Py_ssize_t r, u
    cdef Py_ssize_t nf = lib.num_feature, rs = lib.result_size
    for r in range(count):
        _fill(lib, rows + r * nf, entries + r * nf)
        lib.init(results + r * rs)
    for u in range(lib.num_units):
        for r in range(count):
            lib.units[u](entries + r * nf, results + r * rs)
    for r in range(count):
        lib.finish(results + r * rs, margin)
        out[r] = <double>results[r * rs + lib.out_index]


cdef void _run(
    const Library* lib,
    const double* rows,
    Py_ssize_t n,
    Py_ssize_t block,
    bint margin,
    entry_t* entries,
    entry_t* results,
    double* out,
) noexcept nogil:
    """Predict ``n`` rows, ``block`` rows at a time."""
    cdef Py_ssize_t start = 0, count
    while start < n:
        count = min(block, n - start)
        _run_block(
            lib,
            rows + start * lib.num_feature,
            count,
            margin,
            entries,
            results,
            out + start,
        )
        start += count


cdef class TreeKernel:
    """Runs one compiled model library over float64 rows.

    Args:
        init, finish: addresses of ``muse_init`` and ``muse_finish``.
        units: addresses of ``predict_unit0`` ... in order.
        float32: whether the library's Entry and result are float (XGBoost)
            rather than double.
        num_feature: columns every row must have.
        result_size: length of the library's result vector.
        out_index: which result element is the positive class.
        zeros: None, or bytes with one mode per feature for values within
            ZERO_THRESHOLD of 0: 0 kept, 1 read as 0.0 (LightGBM), 2 read
            as missing (LightGBM ``zero_as_missing``).
        owner: the object that keeps the library loaded (its ctypes
            handle); held for as long as the kernel lives.
    """

    cdef Library lib
    cdef bint float32
    cdef bytes zero_modes
    cdef object owner

    def __cinit__(
        self,
        uintptr_t init,
        uintptr_t finish,
        tuple units,
        bint float32,
        Py_ssize_t num_feature,
        Py_ssize_t result_size,
        Py_ssize_t out_index,
        bytes zeros=None,
        object owner=None,
    ):
        cdef Py_ssize_t u
        if init == 0 or finish == 0 or len(units) == 0:
            raise ValueError("a library needs muse_init, muse_finish and units")
        if not 0 <= out_index < result_size:
            raise ValueError(
                f"out_index {out_index} outside a result of {result_size}"
            )
        if zeros is not None and len(zeros) != num_feature:
            raise ValueError(
                f"zeros has {len(zeros)} modes for {num_feature} features"
            )
        self.lib.units = <unit_fn*>PyMem_Malloc(len(units) * sizeof(unit_fn))
        if self.lib.units == NULL:
            raise MemoryError()
        for u in range(len(units)):
            if <uintptr_t>units[u] == 0:
                raise ValueError(f"unit {u} has a null address")
            self.lib.units[u] = <unit_fn><uintptr_t>units[u]
        self.lib.num_units = len(units)
        self.lib.init = <init_fn>init
        self.lib.finish = <finish_fn>finish
        self.lib.num_feature = num_feature
        self.lib.result_size = result_size
        self.lib.out_index = out_index
        self.float32 = float32
        self.owner = owner
        # Keep the bytes alive: the loop reads the flags through a pointer.
        self.zero_modes = zeros
        self.lib.zeros = NULL
        if zeros is not None:
            self.lib.zeros = <const unsigned char*>zeros

    def __dealloc__(self):
        PyMem_Free(self.lib.units)

    def run(self, cnp.ndarray X, bint margin):
        """Margins (``margin``) or postprocessed outputs, one per row of X.

        Args:
            X: C-contiguous float64 array of shape (n, num_feature).
            margin: skip the postprocessor (sigmoid) when true.

        Returns:
            float64 array of shape (n,).

        Raises:
            ValueError: X is not a C-contiguous float64 2-D array of the
                right width.
        """
        self._check(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0)
        cdef cnp.npy_intp dims[1]
        dims[0] = n
        cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
        if n == 0:
            return out
        cdef Py_ssize_t width = 8 if not self.float32 else 4
        cdef Py_ssize_t block = BLOCK_BYTES // (width * max(1, self.lib.num_feature))
        block = min(n, max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, block)))
        cdef void* entries = PyMem_Malloc(
            block * self.lib.num_feature * width
        )
        cdef void* results = PyMem_Malloc(block * self.lib.result_size * width)
        if entries == NULL or results == NULL:
            PyMem_Free(entries)
            PyMem_Free(results)
            raise MemoryError()
        cdef const double* rows = <const double*>cnp.PyArray_DATA(X)
        cdef double* dest = <double*>cnp.PyArray_DATA(out)
        try:
            with nogil:
                if self.float32:
                    _run[float](
                        &self.lib, rows, n, block, margin,
                        <float*>entries, <float*>results, dest,
                    )
                else:
                    _run[double](
                        &self.lib, rows, n, block, margin,
                        <double*>entries, <double*>results, dest,
                    )
        finally:
            PyMem_Free(entries)
            PyMem_Free(results)
        return out

    cdef int _check(self, cnp.ndarray X) except -1:
        if (
            cnp.PyArray_TYPE(X) != cnp.NPY_DOUBLE
            or cnp.PyArray_NDIM(X) != 2
            or not cnp.PyArray_IS_C_CONTIGUOUS(X)
        ):
            raise ValueError(
                "expected a C-contiguous float64 2-D array, got "
                f"{X.dtype} with shape {(<object>X).shape}"
            )
        if cnp.PyArray_DIM(X, 1) != self.lib.num_feature:
            raise ValueError(
                f"expected {self.lib.num_feature} columns, "
                f"got {cnp.PyArray_DIM(X, 1)}"
            )
        return 0
