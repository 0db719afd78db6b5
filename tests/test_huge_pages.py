"""The launcher's restart with glibc's huge-page tunable: when it happens, and what it changes."""

import os
import subprocess
import sys
import textwrap

import pytest

from transformer import huge_pages
from transformer.huge_pages import TUNABLE, environment_with_huge_pages

SUPPORTED = (huge_pages._glibc_version() or (0, 0)) >= (2, 35) and huge_pages._thp_setting() in (
    "always", "madvise")
needs_support = pytest.mark.skipif(
    not SUPPORTED, reason="needs glibc >= 2.35 and transparent huge pages enabled in the kernel")


def test_adds_the_tunable():
    environ = environment_with_huge_pages({"PATH": "/bin"}, (2, 36), "madvise")
    assert environ == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}


def test_keeps_other_tunables():
    environ = environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                          (2, 39), "always")
    assert environ["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize("environ, glibc, thp", [
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, (2, 36), "madvise"),  # the user's choice stands
    ({"GLIBC_TUNABLES": f"{TUNABLE}=1"}, (2, 36), "madvise"),  # already restarted
    ({}, (2, 31), "madvise"),  # glibc too old for the tunable
    ({}, None, "madvise"),  # not glibc
    ({}, (2, 36), "never"),  # huge pages off in the kernel
    ({}, (2, 36), None),  # no transparent huge pages at all
])
def test_no_restart_when_it_would_change_nothing(environ, glibc, thp):
    assert environment_with_huge_pages(environ, glibc, thp) is None


_PROGRAM = textwrap.dedent("""
    import os, resource, sys
    from transformer.huge_pages import restart_with_huge_pages
    restart_with_huge_pages()
    import jax, jax.numpy as jnp
    make = jax.jit(lambda x: jnp.broadcast_to(x, (4096, 4096)) + 1.0)  # a 64 MB result
    x = jnp.ones(4096)
    make(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        make(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], faults)
""")


def _run(environ):
    result = subprocess.run([sys.executable, "-c", _PROGRAM, "an", "--argument"], env=environ,
                            capture_output=True, text=True, check=True)
    tunables, *rest = result.stdout.split()
    return tunables, " ".join(rest[:-1]), int(rest[-1])


@needs_support
def test_restart_sets_the_tunable_keeps_arguments_and_cuts_page_faults():
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    tunables, arguments, faults = _run(base)
    assert tunables == f"{TUNABLE}=1"
    assert arguments == "['an', '--argument']"
    opted_out, _, faults_4k = _run(base | {"GLIBC_TUNABLES": f"{TUNABLE}=0"})
    assert opted_out == f"{TUNABLE}=0"
    # Five 64 MB results fault in 16,384 pages of 4 KB each without huge pages, 32 with.
    assert faults_4k > 5 * 10_000
    assert faults < faults_4k / 10
