"""Checkpoints with Orbax: the train state and the data iterator's position, saved together.

`workdir/checkpoints/<step>/` holds "state" (parameters, optimizer state, step, RNG key) and
"data" (one JSON file per process with its grain iterator's position). Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoints untouched. We keep the last `keep` checkpoints and the best one by a metric.

`workdir/config.json` records the config a run started with; a restart whose config changes what
the checkpoints mean (model, task, data, optimizer, ...) is refused.
"""

import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from transformer.training.config_schema import differences

# Fields of the config that a checkpoint depends on. Anything else (number of steps, how often to
# evaluate or log, parallel mode, ...) may change between a run and its restart.
COMPATIBILITY_FIELDS = (
    "task",
    "model",
    "data",
    "train_mixture",
    "seed",
    "global_batch_size",
    "optimizer",
    "label_smoothing",
)


class IncompatibleCheckpointError(ValueError):
    """The workdir holds checkpoints of a different model or setup."""


def check_resumable(config, workdir):
    """Raises IncompatibleCheckpointError when `workdir` holds checkpoints of a run whose config
    differs from `config` in a field they depend on. Reads only.

    A workdir without checkpoints holds nothing a new config could misread: any config may start
    there, so a run that failed before its first checkpoint can be corrected and started again.
    """
    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and _has_checkpoints(workdir)):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    current = json.loads(config.to_json_best_effort())
    changed = differences(
        {f: saved.get(f) for f in COMPATIBILITY_FIELDS},
        {f: current.get(f) for f in COMPATIBILITY_FIELDS},
    )
    if changed:
        details = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changed)
        raise IncompatibleCheckpointError(
            f"{workdir} holds checkpoints of a run with a different config ({details}). Use "
            "a new --workdir, or restore these fields to resume it."
        )


def check_compatible_config(config, workdir):
    """`check_resumable`, then writes `workdir/config.json` unless checkpoints already hold it."""
    check_resumable(config, workdir)
    if _has_checkpoints(workdir) and os.path.exists(os.path.join(workdir, "config.json")):
        return
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
        os.replace(path + ".tmp", path)


def _has_checkpoints(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class Checkpointer:
    """Periodic asynchronous saves and exact restores of (train state, data iterator)."""

    def __init__(self, directory, *, keep=2, best_metric=None, best_mode="max", async_save=True):
        """`best_metric` names a key of the metrics given to `save`; its best checkpoint is kept."""
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._directory = epath.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self._directory, item_names=("state", "data"), options=options
        )

    def all_steps(self):
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step, state, data_iterator, metrics=None):
        """Starts saving; returns before the arrays are written when saving asynchronously."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        )
        self._manager.save(int(step), args=args, metrics=metrics, force=True)

    def restore_latest(self, abstract_state, data_iterator):
        """Restores the newest readable checkpoint into a state shaped like `abstract_state`.

        Sets `data_iterator` to the saved position. Returns the state, or None when there is no
        checkpoint. A checkpoint that cannot be read is reported and the one before it is tried;
        when none can be read, or a checkpoint does not fit `abstract_state`, it raises: starting
        over would write new checkpoints over the ones a fix could still resume from.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except Exception as error:  # Orbax raises many kinds; any means "unreadable".
                logging.error(
                    "checkpoint at step %d cannot be read (%s: %s); trying the one before it.",
                    step,
                    type(error).__name__,
                    error,
                )
                errors.append(f"step {step}: {type(error).__name__}: {error}")
                continue
            _check_shapes(abstract_state, restored["state"], step)
            logging.info("resumed from the checkpoint at step %d", step)
            self._set_aside([s for s in steps if s > step])
            return restored["state"]
        if errors:
            raise IncompatibleCheckpointError(
                "no checkpoint in this workdir can be restored:\n  " + "\n  ".join(errors)
            )
        return None

    def _set_aside(self, steps):
        """Moves unreadable checkpoints to `<directory>_unreadable/`, out of the way of new saves
        but kept for inspection."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self._directory.parent / (self._directory.name + "_unreadable")
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                logging.error("moving the unreadable checkpoint %d to %s", step, aside)
                (self._directory / str(step)).rename(aside / str(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def _check_shapes(expected, restored, step):
    expected_shapes = jax.tree.map(np.shape, expected)
    restored_shapes = jax.tree.map(np.shape, restored)
    if expected_shapes != restored_shapes:
        raise IncompatibleCheckpointError(
            f"the checkpoint at step {step} holds arrays of other shapes than this config's model "
            f"(e.g. {_first_difference(expected_shapes, restored_shapes)})."
        )


def _first_difference(expected, restored):
    flat_e = jax.tree_util.tree_leaves_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))
    flat_r = jax.tree_util.tree_leaves_with_path(restored, is_leaf=lambda x: isinstance(x, tuple))
    for (path, e), (_, r) in zip(flat_e, flat_r):
        if e != r:
            return f"{jax.tree_util.keystr(path)}: expected {e}, found {r}"
    return "different parameter trees"
