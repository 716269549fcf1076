"""Build the Cython fast path. Metadata lives in pyproject.toml.

RCCS_PUREPYTHON=1 at build time skips the extensions (a pure-Python install);
RCCS_CYTHON_DEBUG=1 builds with bounds checks and line tracing for debugging.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("RCCS_PUREPYTHON") != "1":
    from Cython.Build import cythonize

    debug = os.environ.get("RCCS_CYTHON_DEBUG") == "1"
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
        "embedsignature": True,
        "linetrace": debug,
    }
    ext_modules = cythonize(
        [
            Extension("rccs._fastpath._codec", ["rccs/_fastpath/_codec.pyx"]),
            Extension("rccs._fastpath._routing", ["rccs/_fastpath/_routing.pyx"]),
            # Subclasses picows' cdef WSListener: needs picows (its .pxd) at build time, and the same
            # picows version at run time (pinned in pyproject.toml).
            Extension("rccs._fastpath._listener", ["rccs/_fastpath/_listener.pyx"]),
        ],
        compiler_directives=directives,
    )

setup(ext_modules=ext_modules)
