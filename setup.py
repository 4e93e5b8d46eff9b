"""Build the Cython kernels in muse/_fast; everything else is in pyproject.toml."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _extension(name: str) -> Extension:
    return Extension(
        f"muse._fast.{name}",
        [f"muse/_fast/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


setup(
    ext_modules=cythonize(
        [_extension(name) for name in ("_mapping", "_treepredict", "_events")],
        compiler_directives={"language_level": "3"},
    ),
)
