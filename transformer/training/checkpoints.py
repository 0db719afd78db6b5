"""Checkpoints with Orbax: the train state and the data iterator's position, saved together.

`workdir/checkpoints/<step>/` holds "state" (parameters, optimizer state, step, RNG key),
"data" (one JSON file per process with its grain iterator's position) and "digests" (the SHA-256
of every array of "state", with its dtype and shape). Orbax writes each checkpoint into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoints untouched. A restore recomputes the digests: a checkpoint whose arrays changed on disk
counts as unreadable, is moved aside, and the one before it is used. We keep the last `keep`
checkpoints and the best one by a metric. A checkpoint holds whole arrays, whatever the mesh that
wrote it, and restores onto the shardings of the state it is restored into.

`workdir/config.json` records the config a run started with; a restart whose config changes what
the checkpoints mean (model, task, data, optimizer, ...) is refused.
"""

import hashlib
import json
import os
import tempfile

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from transformer.training import parallel
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


class CorruptCheckpointError(ValueError):
    """A checkpoint's arrays do not match the digests recorded when it was saved."""


def digests(state):
    """{tree path: "sha256:<hex> <dtype> <shape>"} of every array of `state`: NumPy, or jax.Arrays
    however sharded. Each is brought whole to the host in turn (a collective when it spans
    hosts), so the host holds one array at a time, and the digest does not depend on the mesh."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        array = np.ascontiguousarray(parallel.fetch(leaf))
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        out[jax.tree_util.keystr(path)] = f"sha256:{digest} {array.dtype} {list(array.shape)}"
    return out


def verify(state, recorded, step):
    """Raises CorruptCheckpointError naming the first array of `state` whose digest differs."""
    found = digests(state)
    if found.keys() != recorded.keys():
        missing = sorted(set(recorded) ^ set(found))[:3]
        raise CorruptCheckpointError(
            f"the checkpoint at step {step} holds other arrays than its digests list ({missing})"
        )
    for path, digest in found.items():
        if digest != recorded[path]:
            raise CorruptCheckpointError(
                f"the checkpoint at step {step} is damaged: array {path} does not match the "
                "digest recorded when it was saved"
            )


def write_json_atomically(path, data):
    """Writes `data` as JSON to `path` through a uniquely named temporary file and a rename, so
    a reader sees the old file or the new one, never a part, and two writers never share a
    temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(
            os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort())
        )


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
            self._directory, item_names=("state", "data", "digests"), options=options
        )

    def all_steps(self):
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step, state, data_iterator, metrics=None):
        """Starts saving `state` (NumPy arrays, or jax.Arrays however sharded); returns once they
        are copied to the host, before they are written when saving asynchronously.

        An array this host holds whole goes as one NumPy copy, which Orbax writes faster than it
        transfers a jax.Array; an array split over several hosts is written by each host, its
        own shards, so that no host needs the whole state in memory.
        """
        state = jax.tree.map(_host_copy_if_whole, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            digests=ocp.args.JsonSave(digests(state)),
        )
        self._manager.save(int(step), args=args, metrics=metrics, force=True)

    def restore_latest(self, like_state, data_iterator):
        """Restores the newest readable checkpoint into a state shaped like `like_state`: NumPy
        arrays where it holds NumPy, and where it holds jax.Arrays, arrays with their shardings
        (each host reads its shards, whatever mesh the checkpoint was written from).

        Sets `data_iterator` to the saved position. Returns the state, or None when there is no
        checkpoint. A checkpoint that cannot be read is reported and the one before it is tried;
        when none can be read, or a checkpoint does not fit `like_state`, it raises: starting
        over would write new checkpoints over the ones a fix could still resume from.
        """
        abstract_state = jax.tree.map(_restore_target, like_state)
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
            _check_shapes(like_state, restored["state"], step)
            try:
                self._verify(step, restored["state"])
            except CorruptCheckpointError as error:
                logging.error("%s; trying the one before it.", error)
                errors.append(f"step {step}: {error}")
                continue
            logging.info("resumed from the checkpoint at step %d (digests verified)", step)
            self._set_aside([s for s in steps if s > step])
            return restored["state"]
        if errors:
            raise IncompatibleCheckpointError(
                "no checkpoint in this workdir can be restored:\n  " + "\n  ".join(errors)
            )
        return None

    def _verify(self, step, state):
        """Checks `state` against the digests saved with checkpoint `step`."""
        if not (self._directory / str(step) / "digests").exists():
            logging.warning(
                "the checkpoint at step %d carries no digests (saved by an older version): its "
                "arrays cannot be verified.",
                step,
            )
            return
        recorded = self._manager.restore(
            step, args=ocp.args.Composite(digests=ocp.args.JsonRestore())
        )["digests"]
        verify(state, recorded, step)

    def _set_aside(self, steps):
        """Moves unreadable checkpoints to `<directory>_unreadable/`, out of the way of new saves
        but kept for inspection."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self._directory.parent / (self._directory.name + "_unreadable")
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():  # set aside before, by an earlier restart
                    target = aside / f"{step}.{suffix}"
                    suffix += 1
                logging.error("moving the unreadable checkpoint %d to %s", step, target)
                (self._directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def _host_copy_if_whole(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return x
    return parallel.fetch(x)


def _restore_target(x):
    """How Orbax restores an array like `x`: onto its sharding, or as NumPy."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.asarray(x)


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
