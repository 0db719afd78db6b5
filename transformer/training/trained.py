"""A finished (or stopped) run, loaded for analysis: its model and parameters from its workdir.

    run = trained.load(get_config("cpu,no_causal_mask"), "/tmp/ablations/runs/no_causal_mask/seed_0")
    logits = run.model.apply({"params": run.params}, inputs)

The config must be the one the run trained with, as a restart's must: the fields the checkpoints
depend on are compared with the workdir's config.json, and a difference is an error naming them.
The newest readable checkpoint is restored, with the checks a resumed run makes (shapes, digests).
"""

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from transformer.training import loop
from transformer.training.checkpoints import Checkpointer
from transformer.training.optimizer import make_optimizer


class TrainedRun(NamedTuple):
    model: Any  # the Flax module the config builds
    params: Any  # its parameters, host NumPy arrays
    step: int  # the training step of the restored checkpoint


def load(config, workdir):
    """The model of `config` and the parameters of `workdir`'s newest readable checkpoint.

    Raises ValueError for a config that does not check out or does not match the workdir's
    checkpoints, and FileNotFoundError when `workdir` holds no checkpoint.
    """
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{workdir} holds no checkpoints/ folder: it is not a run's workdir."
        )
    setup = loop.prepare(config, workdir)
    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    data = loop.training_data(config)  # the checkpoint holds its position; restored with it
    template = loop.make_init(setup.model, setup.task, optimizer)(config.seed, next(data))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        state = checkpointer.restore_latest(jax.tree.map(np.asarray, template), data)
    finally:
        checkpointer.close()
    if state is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint to load.")
    return TrainedRun(setup.model, state.params, int(state.step))
