"""The one entry point: train and evaluate an experiment, or sweep all its variants.

    python launch.py --config=experiments/pattern_reach.py:cpu --workdir=/tmp/run
    python launch.py --config=experiments/pattern_reach.py:smoke --config.num_train_steps=20 \\
        --workdir=/tmp/run
    python launch.py --config=experiments/pattern_reach.py:cpu --sweep --workdir=/tmp/sweep

`--config=<file>.py:<arg>` calls the file's `get_config(arg)`: a preset ("smoke", "cpu",
"full") optionally followed by ",<variant>". `--config.<field>=<value>` overrides any field.
Running the same command again resumes from the newest checkpoint in the workdir.

Multi-host: pass --distributed on a Cloud TPU slice (every host runs the same command) and JAX
finds the other processes itself; a SLURM job of several tasks is recognised without it;
elsewhere pass --coordinator_address=host:port, --num_processes and --process_id to every
process (add --cpu_collectives for several CPU processes).
"""

import importlib.util
import logging as python_logging
import os
import sys

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


class _QuietLibraries(python_logging.Filter):
    """Drops the INFO chatter of Orbax and grain (one line per file written), keeps warnings."""

    def filter(self, record):
        noisy = ("/orbax/", "/grain/", "/tensorflow_datasets/")
        return record.levelno >= python_logging.WARNING or not any(
            part in record.pathname for part in noisy
        )


def _experiment():
    """(the --config file's get_config, the arg after its colon)."""
    path, _, arg = FLAGS["config"].config_filename.partition(":")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config, arg


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax  # after flags: JAX reads its own

    from transformer.training import host_allocator, loop, parallel, sweep

    if FLAGS.cpu_collectives:
        parallel.enable_cpu_collectives()
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed
    )
    if jax.default_backend() == "cpu" and host_allocator.install_hint_needed():
        logging.warning(host_allocator.INSTALL_HINT)
    if FLAGS.sweep:
        get_config, arg = _experiment()
        preset = arg.split(",")[0]
        overrides = config_flags.get_override_values(FLAGS["config"])
        records = sweep.run_sweep(get_config, preset, FLAGS.workdir, overrides)
        if records is None:
            sys.exit(143)  # stopped by SIGTERM: the same command resumes
        with open(os.path.join(FLAGS.workdir, "results.md"), encoding="utf-8") as f:
            print(f.read())
        return
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if result.summary["status"] != "completed":
        logging.warning(
            "stopped at step %d; run the same command again to resume.", result.summary["step"]
        )
        sys.exit(143)  # 128 + SIGTERM: a scheduler sees the job did not finish
    final = result.summary["final"]
    print(" ".join(f"{k}={v:.4g}" for k, v in final.items() if k.startswith("eval")))


if __name__ == "__main__":
    from transformer.training.host_allocator import restart_with_tcmalloc

    restart_with_tcmalloc()  # XLA:CPU's buffers kept between steps: 1.1-1.25x faster on CPU
    app.run(main)
