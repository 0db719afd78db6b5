"""The optimizer: AdamW, linear warmup then a decay, gradient clipping; and label smoothing."""

import jax
import jax.numpy as jnp
import optax


def _constant(peak, warmup_steps, total_steps):
    del total_steps
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)), optax.constant_schedule(peak)],
        [warmup_steps],
    )


def _cosine(peak, warmup_steps, total_steps):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def _inverse_sqrt(peak, warmup_steps, total_steps):
    """peak * min(step / warmup, sqrt(warmup / step)): the schedule of "Attention is all you need"."""
    del total_steps
    warmup = max(warmup_steps, 1)

    def schedule(step):
        step = jnp.maximum(step, 1).astype(jnp.float32)
        return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    return schedule


SCHEDULES = {"constant": _constant, "cosine": _cosine, "inverse_sqrt": _inverse_sqrt}


def learning_rate_schedule(opt_config, total_steps):
    """step -> learning rate, from `opt_config.schedule`, `.learning_rate` and `.warmup_steps`."""
    make = SCHEDULES[opt_config.schedule]
    return make(opt_config.learning_rate, opt_config.warmup_steps, total_steps)


def make_optimizer(opt_config, total_steps):
    """AdamW with the schedule, after clipping the global gradient norm (0 turns clipping off).

    Weight decay skips biases and normalisation scales (every parameter with fewer than 2 dims).
    """
    adamw = optax.adamw(
        learning_rate_schedule(opt_config, total_steps),
        b1=opt_config.b1,
        b2=opt_config.b2,
        eps=opt_config.eps,
        weight_decay=opt_config.weight_decay,
        mask=_matrices,
    )
    if opt_config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), adamw)
    return adamw


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def smooth_labels(targets, num_classes, label_smoothing):
    """Integer targets `[...]` -> target distributions `[..., num_classes]`.

    The true class gets 1 - label_smoothing, the rest is spread evenly over all classes.
    """
    one_hot = jax.nn.one_hot(targets, num_classes)
    return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
