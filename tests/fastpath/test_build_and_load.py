"""How the fast path is built and chosen: the debug build's switches, the picows version guard of the
compiled listener, and the compiled codec's ownership of the strings it hands out."""

import gc
import importlib
import logging
import os
import runpy
import sys
import types
from importlib.metadata import version
from pathlib import Path

import msgpack
import pytest

import rccs._fastpath

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"

if os.environ.get("RCCS_PUREPYTHON") == "1":
    cy_codec = pytest.importorskip("rccs._fastpath._codec")
    cy_listener = pytest.importorskip("rccs._fastpath._listener")
else:
    # Without RCCS_PUREPYTHON=1 the compiled modules must exist: fail loudly, never skip.
    from rccs._fastpath import _codec as cy_codec
    from rccs._fastpath import _listener as cy_listener

py_codec = importlib.import_module("rccs._fastpath.codec")
py_listener = importlib.import_module("rccs._fastpath.listener")
COMMON_STRINGS_AT_IMPORT = tuple(cy_codec._COMMON_STRINGS)  # before any test rebinds the global


# ---- setup.py ---------------------------------------------------------------------------------------


def build_configuration(monkeypatch, debug):
    """Run setup.py as a build would, with Cython and setuptools replaced by recorders: what would it compile?"""
    recorded = {}

    def cythonize(extensions, compiler_directives):
        recorded["extensions"] = {ext.name: ext for ext in extensions}
        recorded["directives"] = compiler_directives
        return []

    cython_build = types.ModuleType("Cython.Build")
    cython_build.cythonize = cythonize
    monkeypatch.setitem(sys.modules, "Cython", types.ModuleType("Cython"))
    monkeypatch.setitem(sys.modules, "Cython.Build", cython_build)
    monkeypatch.setattr("setuptools.setup", lambda **kwargs: None)
    monkeypatch.delenv("RCCS_PUREPYTHON", raising=False)
    if debug:
        monkeypatch.setenv("RCCS_CYTHON_DEBUG", "1")
    else:
        monkeypatch.delenv("RCCS_CYTHON_DEBUG", raising=False)
    runpy.run_path(str(SETUP_PY))
    return recorded


def test_debug_build_compiles_line_tracing_in(monkeypatch):
    # linetrace alone only generates the trace calls; CYTHON_TRACE(_NOGIL) must be defined or the C
    # compiler drops them and "debug" builds trace nothing.
    recorded = build_configuration(monkeypatch, debug=True)
    directives = recorded["directives"]
    assert directives["linetrace"] and directives["boundscheck"] and directives["wraparound"]
    assert set(recorded["extensions"]) == {"rccs._fastpath._codec", "rccs._fastpath._routing",
                                           "rccs._fastpath._listener", "rccs._fastpath._idmemory"}
    for extension in recorded["extensions"].values():
        macros = dict(extension.define_macros)
        assert macros["CYTHON_TRACE"] == "1" and macros["CYTHON_TRACE_NOGIL"] == "1", extension.name
        assert "-O0" in extension.extra_compile_args


def test_release_build_has_no_tracing(monkeypatch):
    recorded = build_configuration(monkeypatch, debug=False)
    assert not recorded["directives"]["linetrace"] and not recorded["directives"]["boundscheck"]
    for extension in recorded["extensions"].values():
        assert "CYTHON_TRACE" not in dict(extension.define_macros)
        assert extension.extra_compile_args == []


def test_build_records_the_picows_version_in_the_listener(monkeypatch):
    extensions = build_configuration(monkeypatch, debug=False)["extensions"]
    macros = dict(extensions["rccs._fastpath._listener"].define_macros)
    assert macros["RCCS_PICOWS_BUILD_VERSION"] == f'"{version("picows")}"'


# ---- picows version guard ---------------------------------------------------------------------------


def test_compiled_listener_knows_the_picows_it_was_built_against():
    assert version("picows") == cy_listener.PICOWS_BUILD_VERSION


@pytest.mark.parametrize(("built_with", "installed", "refused"), [
    ("2.3.1", "2.3.1", False),
    ("2.3.1", "2.3.2", True),
    ("2.3.1", "2.4.0", True),
    ("2.3.1", None, True),
    ("", "2.3.1", True),  # built outside setup.py: the version is unknown, so not trusted
])
def test_picows_mismatch(built_with, installed, refused):
    reason = rccs._fastpath.picows_mismatch(built_with, installed)
    assert (reason is not None) == refused
    if refused and built_with:
        assert built_with in reason and str(installed or "(not installed)") in reason


def test_listener_built_for_another_picows_falls_back_loudly(monkeypatch, caplog):
    monkeypatch.delenv("RCCS_PUREPYTHON", raising=False)
    with caplog.at_level(logging.WARNING, "rccs.fastpath"), \
            pytest.warns(RuntimeWarning, match=r"pure-Python listener .* built against picows .* 0\.0\.1 is installed"):
        codec, routing, listener, implementation = rccs._fastpath._load(picows_version="0.0.1")
    assert listener is py_listener
    assert codec is cy_codec and routing.__name__ == "rccs._fastpath._routing"  # only the listener falls back
    assert implementation == "cython+python-listener"
    assert any("pure-Python listener" in record.getMessage() for record in caplog.records)


def test_listener_built_for_the_installed_picows_is_used(monkeypatch, recwarn):
    monkeypatch.delenv("RCCS_PUREPYTHON", raising=False)
    _, _, listener, implementation = rccs._fastpath._load()
    assert listener is cy_listener and implementation == "cython"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# ---- compiled codec: strings it hands out -----------------------------------------------------------


def test_rebinding_common_strings_cannot_break_decoding(monkeypatch):
    # The compiled codec hands out cached str objects for common header strings. They must be owned by
    # the module itself: rebinding the Python-visible tuple (and collecting it) must change nothing.
    common = list(COMMON_STRINGS_AT_IMPORT)
    header = {text: text for text in common if text != "body"}
    header["body"] = common
    frame = msgpack.packb(header)
    expected = py_codec.decode_envelope(frame)
    monkeypatch.setattr(cy_codec, "_COMMON_STRINGS", tuple("".join(list(text)) for text in common))
    gc.collect()
    monkeypatch.setattr(cy_codec, "_COMMON_STRINGS", None)
    gc.collect()
    for _ in range(3):
        decoded = cy_codec.decode_envelope(frame)
        assert decoded == expected
        assert all(type(key) is str and type(value) is str and key == value
                   for key, value in decoded[0].items())
    gc.collect()
    assert cy_codec.decode_envelope(frame) == expected
