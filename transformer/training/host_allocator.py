"""A caching allocator for XLA:CPU's buffers: the launcher restarts itself once with tcmalloc.

XLA:CPU allocates every step's buffers with malloc. glibc serves each allocation above 32 MB with
a fresh `mmap` and unmaps it when it is freed, so every training step faults its whole working
set back in, 4 KB at a time, and the kernel zeroes every page: for a long-sequence model, a large
share of each step is spent in the kernel. tcmalloc keeps freed memory for the next step. The
`LD_PRELOAD` variable is read only when a process starts, hence the restart. The page faults and
the speed with and without it are measured in docs/experiments.md ("The allocator's share").

tcmalloc comes from the system: `apt-get install libtcmalloc-minimal4` on Debian and Ubuntu. Set
`TRANSFORMER_MALLOC=system` to keep the C library's allocator. Accelerator memory is not
affected; host memory is, in every process that calls `restart_with_tcmalloc`.
"""

import ctypes.util
import os
import sys

LIBRARY = "tcmalloc_minimal"
OPT_OUT = "TRANSFORMER_MALLOC"
INSTALL_HINT = (
    "tcmalloc is not installed, so XLA:CPU's buffers are page-faulted back in on "
    "every step, which slows training on CPU (docs/experiments.md); install it with `apt-get "
    f"install libtcmalloc-minimal4`, or set {OPT_OUT}=system to silence this."
)


def environment_with_tcmalloc(environ, library):
    """The environment to restart with, or None when there is nothing to change.

    Pure, for tests: `environ` is a mapping like `os.environ`; `library` is tcmalloc's file name
    as `ctypes.util.find_library` gives it, or None when it is not installed.
    """
    if library is None or not install_hint_needed(environ):
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    return dict(
        environ,
        LD_PRELOAD=" ".join(filter(None, [preloaded, library])),
        # tcmalloc reports every allocation above 1 GB on stderr by default.
        TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=environ.get(
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 62)
        ),
    )


def install_hint_needed(environ=os.environ):
    """Whether to warn: no tcmalloc preloaded, and the user did not choose the system allocator."""
    return "tcmalloc" not in environ.get("LD_PRELOAD", "") and environ.get(OPT_OUT) != "system"


def restart_with_tcmalloc():
    """Re-executes this Python program with tcmalloc preloaded, once; returns when it cannot.

    Call it first thing in a program's entry point (it replaces the process, keeping its pid).
    `sys.orig_argv` keeps the interpreter's own options (`-u`, `-X ...`) across the restart.
    """
    if not sys.platform.startswith("linux") or not install_hint_needed():
        return  # not Linux, already preloaded, or opted out: no library search
    environ = environment_with_tcmalloc(os.environ, ctypes.util.find_library(LIBRARY))
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
