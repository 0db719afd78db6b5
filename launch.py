"""The one entry point: train and evaluate an experiment, or sweep all its variants.

    python launch.py --config=experiments/pattern_reach.py:cpu --workdir=/tmp/run
    python launch.py --config=experiments/pattern_reach.py:smoke --config.num_train_steps=20 \\
        --workdir=/tmp/run
    python launch.py --config=experiments/pattern_reach.py:cpu --sweep --workdir=/tmp/sweep

`--config=<file>.py:<arg>` calls the file's `get_config(arg)`: a preset ("smoke", "cpu",
"full") optionally followed by ",<variant>". `--config.<field>=<value>` overrides any field.
Running the same command again resumes from the newest checkpoint in the workdir.

A mistake in the config or the command line (a misspelled field, a bad value, a missing file, an
unknown preset or variant, a workdir that cannot be written) is reported in a few lines, with no
traceback and exit status 2, before anything is written to the workdir. `-v 1` shows the
libraries' own log lines, which are otherwise left out.

Multi-host: pass --distributed on a Cloud TPU slice (every host runs the same command) and JAX
finds the other processes itself; a SLURM job of several tasks is recognised without it;
elsewhere pass --coordinator_address=host:port, --num_processes and --process_id to every
process (add --cpu_collectives for several CPU processes).
"""

import ast
import contextlib
import errno
import glob
import importlib.util
import logging as python_logging
import os
import re
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment file and arg: path.py[:arg].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.DEFINE_bool("sweep", False, "Run every variant of the experiment over its seeds.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() and let JAX detect the cluster (Cloud TPU, "
    "SLURM, Open MPI, Kubernetes); SLURM jobs of several tasks are detected anyway.",
)
flags.DEFINE_bool(
    "cpu_collectives",
    False,
    "Use gloo collectives between CPU processes (several processes on CPU).",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

# Library log lines that say nothing to a user of this launcher: TFDS's note for every builder
# config an experiment derives, the folder it then looks in, and JAX's probe for a TPU on a
# machine without one.
_NOISE = (
    "Using custom data configuration",
    "Variant folder",
    "Unable to initialize backend",
)


class _QuietLibraries(python_logging.Filter):
    """Drops the libraries' chatter unless `-v 1` or more: their INFO lines (Orbax and grain log
    one per file written) and the notes in _NOISE; keeps their warnings."""

    def filter(self, record):
        if FLAGS.verbosity >= 1:
            return True
        if record.getMessage().startswith(_NOISE):
            return False
        noisy = ("/orbax/", "/grain/", "/tensorflow_datasets/")
        if not any(part in record.pathname for part in noisy):
            return True
        # A library's error stays one line: the launcher reports the cause itself, once.
        record.exc_info, record.exc_text = None, None
        return record.levelno >= python_logging.WARNING


class _WithoutFollowOnTracebacks:
    """sys.stderr, less the tracebacks that end in "RuntimeError: Event loop is closed".

    After a failed write, TensorStore's callbacks keep arriving at the asyncio loops Orbax has
    already shut down, and TensorStore prints each one's traceback from C++ (no Python hook sees
    them): a hundred tracebacks that say nothing about the cause, which the launcher reports
    once. A traceback is held back until its last line shows what it is; every other text passes
    through unchanged.
    """

    FOLLOW_ON = "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        self._stream = stream
        # Per thread: the text after its last newline (tracebacks arrive in pieces), and the
        # lines of the traceback it is printing, if any. Several threads print at once.
        self._partial = {}
        self._held = {}
        self._lock = threading.Lock()

    def write(self, text):
        thread = threading.get_ident()
        with self._lock:
            lines = (self._partial.pop(thread, "") + text).splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                self._partial[thread] = lines.pop()
            for line in lines:
                self._line(thread, line)
        return len(text)

    def _line(self, thread, line):
        held = self._held.get(thread)
        if held is None and line.startswith("Traceback (most recent call last):"):
            self._held[thread] = [line]
        elif held is not None:
            held.append(line)
            if line.strip() and not line[0].isspace():  # the exception line ends it
                if not line.startswith(self.FOLLOW_ON):
                    self._stream.write("".join(held))
                del self._held[thread]
        else:
            self._stream.write(line)

    def flush(self):
        thread = threading.get_ident()
        with self._lock:
            if thread in self._partial and thread not in self._held:
                self._stream.write(self._partial.pop(thread))  # a progress bar: no newline
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _fail(message):
    """Ends the program with a short message: a mistake in the command, not a crash."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _message(error):
    """An exception's own text, without the quoting that KeyError and AttributeError add."""
    text = str(error.args[0]) if len(error.args) == 1 else str(error)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
    return text.strip()


def _describe(error, argv):
    """What went wrong while parsing `argv`, naming the flag: a missing field's name, the field
    it is in and ml_collections' "Did you mean" suggestion; or a bad value's flag and reason."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    root = chain[-1]
    if isinstance(root, (KeyError, AttributeError)):
        # The innermost error holds only the key; an outer one adds "Did you mean ...".
        texts = [_message(e) for e in chain]
        text = next((t for t in texts if "Did you mean" in t), texts[-1])
        missing, _, hint = text.partition("\n")
        missing = missing.strip("'\"")
        for arg in argv:
            name = arg.partition("=")[0]
            path = name[len("--config.") :].split(".")
            if name.startswith("--config.") and missing in path:
                parent = ".".join(["config"] + path[: path.index(missing)])
                return f"{name}: {parent} has no field {missing!r}. {hint}".strip()
    if isinstance(error, flags.Error) and "Traceback" not in str(error):
        return _message(error)  # absl's own text names the flag and its value
    if isinstance(root, ValueError):
        return _message(root)  # our configs' errors name the field and what is allowed
    return f"{type(root).__name__}: {_message(root)}"


# Failures of a read or write that libraries report as other exceptions, by their errno's text.
_IO_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES)


def _os_error(error):
    """The first failed read or write in `error`'s chain, as an OSError: Python's own, or one that
    a library reports in its message: TensorStore (Orbax's array store) names the path and an
    `os_error_code`, ArrayRecord (TFDS's files) the errno's text and the path."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        text = str(error)
        code = re.search(r"os_error_code='(\d+)'", text)
        codes = [int(code.group(1))] if code else [e for e in _IO_ERRNOS if os.strerror(e) in text]
        if codes:
            path = re.search(r'(?:writing|reading|opening)[^/"]*"?(/[^"\s;]+)', text)
            return OSError(codes[0], os.strerror(codes[0]), path.group(1) if path else None)
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def _failed_io_reported(workdir):
    """Runs the block; a failed read or write inside it is reported in one message and ends the
    process at once: background threads (Orbax's saves, grain's readers) would otherwise print
    tracebacks as they fail in turn. What was written before stays, and the same command resumes
    once the cause is fixed. Any other exception passes through."""
    try:
        yield
    except Exception as exception:
        error = _os_error(exception)
        if error is None:
            raise
        print(
            f"error: {error.strerror} ({error.filename or workdir}). Training stopped; the "
            "checkpoints and logs written before are kept, and the same command resumes once "
            "this is fixed.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(74)  # EX_IOERR


def _config_path(argv):
    for arg in argv:
        if arg.startswith("--config="):
            return arg[len("--config=") :].partition(":")[0]
    return None


def _parse_flags(argv):
    """absl's flag parsing, with config mistakes reported as a few lines instead of a traceback.

    ml_collections loads the config file and applies `--config.<field>` overrides while parsing,
    so a missing file, an unknown preset or a misspelled field surfaces here."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        experiments = sorted(glob.glob(os.path.join("experiments", "*.py")))
        _fail(
            f"--config: the file {path!r} does not exist (relative to {os.getcwd()}). "
            f"Experiments: {', '.join(experiments) or 'none found here'}."
        )
    try:
        return FLAGS(argv)
    except Exception as error:  # whatever parsing raises is a mistake in argv
        if isinstance(error, flags.UnrecognizedFlagError):
            _fail(f"{_message(error)}\nPass --helpshort to see the flags.")
        _fail(_describe(error, argv))


def _experiment():
    """(the --config file's get_config, the arg after its colon)."""
    path, _, arg = FLAGS["config"].config_filename.partition(":")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config, arg


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}; flags start with --.")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if FLAGS.verbosity < 1:
        sys.stderr = _WithoutFollowOnTracebacks(sys.stderr)
    import jax  # after flags: JAX reads its own

    from transformer.training import host_allocator, loop, parallel, sweep, workdir_lock

    if not sys.stderr.isatty():
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # one bar per split generated: noise in a log file
    if FLAGS.cpu_collectives:
        parallel.enable_cpu_collectives()
    try:
        parallel.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed
        )
    except ValueError as error:
        _fail(str(error))
    if jax.default_backend() == "cpu" and host_allocator.install_hint_needed():
        logging.warning(host_allocator.INSTALL_HINT)
    if FLAGS.sweep:
        get_config, arg = _experiment()
        preset = arg.split(",")[0]
        overrides = config_flags.get_override_values(FLAGS["config"])
        try:
            runs = sweep.plan_runs(get_config, preset, FLAGS.workdir, overrides)
        except ValueError as error:
            _fail(str(error))
        with _failed_io_reported(FLAGS.workdir):
            records = sweep.run_planned(runs, FLAGS.workdir)  # shares busy runs with other sweeps
        if records is None:
            sys.exit(143)  # stopped by SIGTERM: the same command resumes
        with open(os.path.join(FLAGS.workdir, "results.md"), encoding="utf-8") as f:
            print(f.read())
        return
    try:
        setup = loop.prepare(FLAGS.config, FLAGS.workdir)
    except ValueError as error:
        _fail(str(error))
    with _failed_io_reported(FLAGS.workdir):
        try:
            result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, setup=setup)
        except workdir_lock.WorkdirBusyError as error:
            _fail(str(error))
    if result.summary["status"] != "completed":
        logging.warning(
            "stopped at step %d; run the same command again to resume.", result.summary["step"]
        )
        sys.exit(143)  # 128 + SIGTERM: a scheduler sees the job did not finish
    final = result.summary["final"]
    print(" ".join(f"{k}={v:.4g}" for k, v in final.items() if k.startswith("eval")))


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # XLA:CPU keeps its buffers between steps under tcmalloc
    app.run(main, flags_parser=_parse_flags)
