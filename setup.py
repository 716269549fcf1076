"""Build the Cython fast path. Metadata lives in pyproject.toml.

RCCS_PUREPYTHON=1 at build time skips the extensions (a pure-Python install);
RCCS_CYTHON_DEBUG=1 builds a debug fast path: bounds, wraparound and initialization
checks on typed indexing, and line tracing that is really compiled in (coverage and
profilers see .pyx lines), without optimization so a debugger shows every variable.

What the debug build cannot check: the codec and the listener read frames through raw
``const unsigned char*`` pointers, which ``boundscheck`` does not cover. Those reads are
guarded by explicit length checks instead (``_need`` in ``_codec.pyx`` before every read;
picows' ``payload_size`` in ``_listener.pyx``). What checks those checks is the differential
tests in tests/fastpath/test_parity.py: the compiled codec against its pure-Python twin (whose
reads are ordinary bounds-checked indexing) on every truncation of every golden envelope and on
random bytes, which a missing or off-by-one length check turns into a different result.
"""

import os
from importlib.metadata import version

from setuptools import Extension, setup


def fastpath_extensions(debug: bool) -> tuple[list[Extension], dict[str, object]]:
    """The four extensions and the Cython directives, for a release or a debug build."""
    directives: dict[str, object] = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
        "embedsignature": True,
        "linetrace": debug,
    }
    # The linetrace directive only generates the trace calls; the C macros switch them on.
    # Without CYTHON_TRACE they are compiled out and the debug build silently traces nothing.
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if debug else []
    compile_args = ["-O0", "-g"] if debug else []
    # The compiled listener subclasses picows' cdef WSListener and reads picows' C fields: it records
    # the picows version it was compiled against, and rccs._fastpath refuses to load it under another.
    picows_macro = [("RCCS_PICOWS_BUILD_VERSION", f'"{version("picows")}"')]

    def extension(name: str, extra_macros: list[tuple[str, str]]) -> Extension:
        return Extension(f"rccs._fastpath.{name}", [f"rccs/_fastpath/{name}.pyx"],
                         define_macros=macros + extra_macros, extra_compile_args=compile_args)

    return ([extension("_codec", []), extension("_routing", []), extension("_listener", picows_macro),
             extension("_idmemory", [])], directives)


ext_modules = []
if os.environ.get("RCCS_PUREPYTHON") != "1":
    from Cython.Build import cythonize

    extensions, directives = fastpath_extensions(os.environ.get("RCCS_CYTHON_DEBUG") == "1")
    ext_modules = cythonize(extensions, compiler_directives=directives)

setup(ext_modules=ext_modules)
