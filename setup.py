"""Build the Cython hot path: chunker, xxh3 hashing, NVMe I/O.

FASTCACHE_DEBUG=1 builds with -O0 -g and bounds checks for debugging.
"""

import os

import numpy
from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - a checkout without Cython
    raise SystemExit("Cython is required to build fastcache: pip install Cython") from exc

DEBUG = os.environ.get("FASTCACHE_DEBUG") == "1"

CFLAGS = ["-Wall", "-Wextra", "-Wno-unused-function", "-Wno-unreachable-code"]
CFLAGS += ["-O0", "-g"] if DEBUG else ["-O3", "-march=x86-64-v2"]

DIRECTIVES = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}


def ext(name: str, source: str, libraries: list[str] | None = None) -> Extension:
    return Extension(
        name,
        [source],
        include_dirs=[numpy.get_include()],
        libraries=libraries or [],
        extra_compile_args=CFLAGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


EXTENSIONS = [
    ext("fastcache._chunker", "ext/chunker.pyx"),
    ext("fastcache._xxh", "ext/xxh.pyx", libraries=["xxhash"]),
    ext("fastcache._nvme", "ext/nvme.pyx"),
]

setup(
    ext_modules=cythonize(EXTENSIONS, compiler_directives=DIRECTIVES, nthreads=2),
)
