"""One writer per workdir: a run holds an exclusive lock on its workdir for its whole life.

Two processes training into one workdir would resume from each other's checkpoints, overwrite
them, and interleave their metrics. The lock is `fcntl.flock` on `workdir/.lock`: the operating
system releases it when the process ends, however it ends, so a lock left by a dead process never
blocks a restart. The file's content only says who holds it (pid, host, start time, command), for
the message a second process gets.

Only process 0 of a multi-process job takes the lock; the others write nothing the lock guards.
`flock` is advisory and local to one machine's view of a file system: it guards against a second
launch on the same machine, not against a second job on another host sharing the workdir.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir."""


def _holder(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def acquire(workdir):
    """Locks `workdir` (created if missing) and returns the open lock file; raises
    WorkdirBusyError naming the process that holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        holder = _holder(path)
        who = (
            f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')} ({holder.get('command', '?')})"
            if holder
            else "another process"
        )
        raise WorkdirBusyError(
            f"the workdir {workdir} is in use by {who}. Two runs in one workdir would overwrite "
            "each other's checkpoints: wait for it to finish, stop it, or use another --workdir."
        ) from None
    handle.seek(0)
    handle.truncate()
    json.dump(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        },
        handle,
    )
    handle.flush()
    return handle


def release(handle):
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()


@contextlib.contextmanager
def held(workdir, enabled=True):
    """`with held(workdir):` the block runs holding the workdir's lock (when `enabled`)."""
    handle = acquire(workdir) if enabled else None
    try:
        yield
    finally:
        if handle is not None:
            release(handle)
