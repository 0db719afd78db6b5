"""The launcher's restart with tcmalloc: when it happens, and what it changes."""

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from transformer.training.host_allocator import (
    LIBRARY,
    OPT_OUT,
    environment_with_tcmalloc,
    install_hint_needed,
)

TCMALLOC = ctypes.util.find_library(LIBRARY)


def _thp_always():
    """With transparent huge pages "always", glibc's large mmaps fault in 2 MB at a time."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def test_preloads_tcmalloc_and_keeps_other_preloads():
    environ = environment_with_tcmalloc({"PATH": "/bin"}, "libtcmalloc_minimal.so.4")
    assert environ["PATH"] == "/bin"
    assert environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert int(environ["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 1 << 40
    environ = environment_with_tcmalloc({"LD_PRELOAD": "/opt/libother.so"}, "libtcmalloc.so.4")
    assert environ["LD_PRELOAD"] == "/opt/libother.so libtcmalloc.so.4"
    assert not install_hint_needed(environ)
    assert install_hint_needed({}) and not install_hint_needed({OPT_OUT: "system"})


@pytest.mark.parametrize(
    "environ, library",
    [
        ({}, None),  # not installed
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "libtcmalloc_minimal.so.4"),  # already
        ({OPT_OUT: "system"}, "libtcmalloc_minimal.so.4"),  # the user's choice
    ],
)
def test_no_restart_when_it_would_change_nothing(environ, library):
    assert environment_with_tcmalloc(environ, library) is None


_PROGRAM = textwrap.dedent("""
    import os, resource, sys
    from transformer.training.host_allocator import restart_with_tcmalloc
    restart_with_tcmalloc()
    import jax, jax.numpy as jnp
    make = jax.jit(lambda x: jnp.broadcast_to(x, (4096, 4096)) + 1.0)  # a 64 MB result
    x = jnp.ones(4096)
    for _ in range(3):
        make(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        make(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(repr(os.environ.get("LD_PRELOAD")), sys.argv[1:], faults)
""")


def _run(environ):
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, "an", "--argument"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    preload, *arguments, faults = done.stdout.split()
    return preload, " ".join(arguments), int(faults)


@pytest.mark.skipif(
    TCMALLOC is None or not sys.platform.startswith("linux"),
    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)",
)
@pytest.mark.skipif(
    _thp_always(), reason="huge pages 'always': glibc faults too few 4 KB pages for the comparison"
)
def test_restart_preloads_tcmalloc_keeps_arguments_and_stops_page_faults():
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
    preload, arguments, faults = _run(base)
    assert "tcmalloc" in preload
    assert arguments == "['an', '--argument']"
    system_preload, _, system_faults = _run(base | {OPT_OUT: "system"})
    assert system_preload == "None"
    # With glibc, each of ten fresh 64 MB results faults in 16,384 pages of 4 KB; tcmalloc
    # reuses freed memory (it may return some to the system now and then).
    assert system_faults > 10 * 10_000
    assert faults < system_faults / 5
