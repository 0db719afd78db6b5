"""Transparent huge pages for XLA:CPU's buffers: the launcher restarts itself once with them on.

XLA:CPU allocates every step's buffers with malloc, and glibc serves each large one with a fresh
`mmap` that it unmaps when the buffer is freed. Every step therefore faults its whole working set
back in, 4 KB at a time: about 1.1 million page faults per training step of train_speed's
BigBird model at 4,096 tokens, and a quarter of its time in the kernel. glibc 2.35 and later
can back those mappings with 2 MB transparent huge pages (the `glibc.malloc.hugetlb=1`
tunable), which cuts the faults about 500-fold. Tunables are read only when a process starts,
hence the restart. The speed-up is measured in README.md ("Training speed").

Set `GLIBC_TUNABLES` yourself (for example `glibc.malloc.hugetlb=0`) to keep your own setting;
nothing is restarted then. Accelerator memory is not affected, only host memory.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version():
    """(major, minor) of the C library, or None when it is not glibc (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def _thp_setting():
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), or None."""
    try:
        with open(_THP_SETTING) as f:
            return next((word[1:-1] for word in f.read().split() if word.startswith("[")), None)
    except OSError:
        return None


def environment_with_huge_pages(environ, glibc_version, thp_setting):
    """The environment to restart with, or None when a restart would change nothing.

    Pure, for tests: `environ` is a mapping like `os.environ`; `glibc_version` (major, minor) or
    None; `thp_setting` as `_thp_setting` returns it.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:  # the user chose (on or off)
        return None
    if glibc_version is None or glibc_version < (2, 35):  # the tunable does not exist
        return None
    if thp_setting not in ("always", "madvise"):  # huge pages are off in this kernel
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, f"{TUNABLE}=1"])))


def restart_with_huge_pages():
    """Re-executes this Python program with huge pages on, once; returns if nothing to change.

    Call it first thing in a program's entry point (it replaces the process). `sys.orig_argv`
    keeps the interpreter's own options (`-u`, `-X ...`) across the restart.
    """
    environ = environment_with_huge_pages(os.environ, _glibc_version(), _thp_setting())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
