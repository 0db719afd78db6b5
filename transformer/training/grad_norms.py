"""Gradient norms per layer: how much of the loss's gradient reaches each layer of a stack, at
initialisation and after some steps of training.

The claim it tests: residual connections and layer normalisation let gradients flow through
depth. `layer_grad_norms(config, at_steps=(0, 50))` builds the experiment's model and data from
its config, trains it with the config's optimizer (one device, no checkpoints: a measurement,
not a run) and, at each step of `at_steps`, measures the gradient of the mean training loss on
one fixed batch, as the norm of the gradient of each layer's parameters.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer.training import loop, tasks
from transformer.training.optimizer import make_optimizer

_LAYER = re.compile(r"^layers_(\d+)$")


def per_layer(grads):
    """`[num_layers]`: the global norm of the gradients of each `layers_<i>` subtree (the layers
    of a stack, wherever it sits in the model)."""
    squares = {}
    for path, grad in traverse_util.flatten_dict(grads).items():
        layer = next((int(m.group(1)) for p in path if (m := _LAYER.match(p))), None)
        if layer is not None:
            squares[layer] = squares.get(layer, 0.0) + jnp.sum(jnp.square(grad.astype(jnp.float32)))
    if not squares:
        raise ValueError("the model has no parameters under 'layers_<i>'.")
    return jnp.sqrt(jnp.stack([squares[i] for i in range(max(squares) + 1)]))


def layer_grad_norms(config, at_steps):
    """{step: np.ndarray [num_layers]} for each step in `at_steps` (0 = at initialisation).

    config: an experiment's config (its model, data, task, optimizer, seed, global_batch_size,
    num_train_steps, label_smoothing and data_dir are read). The gradients are measured on the
    first training batch; training goes on from the next one.
    """
    at_steps = sorted(set(at_steps))
    if not at_steps or at_steps[0] < 0:
        raise ValueError(f"at_steps must be steps >= 0; got {at_steps}.")
    model = loop.build_model(loop.with_data_fields(config))
    task = tasks.get_task(config.task)
    optimizer = make_optimizer(config.optimizer, config.num_train_steps)
    data = loop.training_data(config)
    probe = next(data)
    params = jax.jit(model.init)(jax.random.key(config.seed), *task.model_inputs(probe))["params"]
    opt_state = optimizer.init(params)

    def loss(params, batch):
        logits = model.apply({"params": params}, *task.model_inputs(batch), train=True)
        total, count = tasks.loss_sum(
            logits, batch["targets"], task.weights(batch), config.label_smoothing
        )
        return total / jnp.maximum(count, 1.0)

    @jax.jit
    def norms(params):
        return per_layer(jax.grad(loss)(params, probe))

    @jax.jit
    def train_step(params, opt_state, batch):
        updates, opt_state = optimizer.update(jax.grad(loss)(params, batch), opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    results = {}
    for step in range(at_steps[-1] + 1):
        if step in at_steps:
            results[step] = np.asarray(norms(params))
        if step < at_steps[-1]:
            params, opt_state = train_step(params, opt_state, next(data))
    return results


def plot(curves, path, title=""):
    """curves: {label: {step: [num_layers] norms}} -> one panel per step, norm (log scale)
    against layer index, a line per label; written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({step for by_step in curves.values() for step in by_step})
    figure, axes = plt.subplots(
        1, len(steps), figsize=(4.5 * len(steps), 3.8), squeeze=False, sharey=True
    )
    for ax, step in zip(axes[0], steps):
        for label, by_step in curves.items():
            if step in by_step:
                ax.plot(np.arange(len(by_step[step])), by_step[step], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("layer index (0 = nearest the embeddings)")
        ax.set_title(f"{title}, step {step}" if title else f"step {step}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("gradient norm of the layer's parameters")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
